"""A route change reaching another control plane: two `serve --db` on one PostgreSQL database
(the second with the first's tokens and no worker of its own), a container with two versions,
and rollbacks through the first, each timed until a call through the first answers from the
version it names, then until a call through the second does. Without the notification (LISTEN/NOTIFY raising the other process's routing
hint) a process trusts the route it holds for ROUTE_MAX_AGE_S: that is the baseline."""

from __future__ import annotations

import time

from dockyard.app.invoke.execute import ROUTE_MAX_AGE_S

from .load import percentile
from .servers import NOOP, Dockyard, package

GIVE_UP_S = 30.0


def _serving(server: Dockyard, container: str) -> str | None:
    answer = server.http.post(f"{server.url}/invoke/{container}/f", json={}, timeout=30)
    return answer.headers.get("X-Dockyard-Version") if answer.status_code == 200 else None


def _seen(server: Dockyard, container: str, version: str) -> None:
    deadline = time.monotonic() + GIVE_UP_S
    while _serving(server, container) != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{container}@{version} not served through {server.url} "
                               f"within {GIVE_UP_S:g}s")


def route_change(results: dict, first: Dockyard, db_url: str, serve_args: list[str],
                 quick: bool) -> None:
    """Rows "route_first_p50_ms" (activation to the first plane serving the version: the
    worker starts it), then "route_lag_p50_ms" / "route_lag_max_ms" (the first plane serving
    it to the second one serving it), beside "route_max_age_ms"."""
    other = Dockyard([*serve_args, "--db", db_url, "--no-local-worker"],
                     prefix="dockyard-bench-pg2-", tokens_of=first)
    try:
        for version in ("1", "2"):
            first.deploy(package("flip", NOOP, '[functions]\nf = "main:f"\n', version=version))
        _seen(other, "flip", "2")
        served, lag = [], []
        for i in range(10 if quick else 40):
            version = "1" if i % 2 == 0 else "2"
            started = time.monotonic()
            first.http.post(f"{first.url}/api/containers/flip/activate",
                            json={"version": version}, timeout=30).raise_for_status()
            _seen(first, "flip", version)
            through_first = time.monotonic()
            _seen(other, "flip", version)
            served.append(through_first - started)
            lag.append(time.monotonic() - through_first)
        results["route_first_p50_ms"] = round(percentile(served, 0.5) * 1000, 1)
        results["route_lag_p50_ms"] = round(percentile(lag, 0.5) * 1000, 1)
        results["route_lag_max_ms"] = round(max(lag) * 1000, 1)
        results["route_max_age_ms"] = ROUTE_MAX_AGE_S * 1000
    finally:
        other.stop()

"""Route changes made by other control planes, heard on this host (PostgreSQL only).

A write that changes a route raises the routing hint of its own host at commit (db.py); the
other hosts hear of it through the database: the routing triggers NOTIFY `dockyard_routes`
(schema_pg.py), and one thread per `serve` LISTENs and raises this host's hint, so every web
process here looks its routes up again on its next call. Kept routes expire within a second
anyway (invoke/execute.py), so a lost connection delays a change by at most that."""

from __future__ import annotations

import logging
import threading

from .db import bump_hint
from .engine import DbUrl, redacted
from .schema_pg import ROUTES_CHANNEL

log = logging.getLogger("dockyard.routes")

RECONNECT_S = (0.5, 1, 2, 5)


class RouteListener:
    def __init__(self, target: DbUrl):
        self.target = target
        self.stopping = threading.Event()
        self.heard = 0          # notifications heard
        self.thread = threading.Thread(target=self._run, name="route-listener", daemon=True)
        self.conn = None

    def start(self) -> "RouteListener":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=3)

    def _run(self) -> None:
        import psycopg

        failures = 0
        while not self.stopping.is_set():
            try:
                with psycopg.connect(str(self.target), autocommit=True,
                                     application_name="dockyard routes",
                                     connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {ROUTES_CHANNEL}")
                    if failures:
                        log.info("listening for route changes again")
                    failures = 0
                    bump_hint(self.target)   # whatever changed while no one listened
                    while not self.stopping.is_set():
                        burst = sum(1 for _ in conn.notifies(timeout=0.5, stop_after=64))
                        if burst:
                            # One bump for a burst: the web processes look once either way.
                            self.heard += burst
                            bump_hint(self.target)
            except Exception as exc:  # noqa: BLE001 - keep listening whatever broke
                if self.stopping.is_set():
                    return
                delay = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
                if failures == 0:
                    log.warning("route changes of other control planes are not heard "
                                "(%s: %s); kept routes expire within a second meanwhile",
                                redacted(self.target), str(exc).strip().splitlines()[0]
                                if str(exc).strip() else type(exc).__name__)
                failures += 1
                self.stopping.wait(delay)

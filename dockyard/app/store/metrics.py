"""The figures /metrics reports, read from the store (so every web process answers the same)."""

from __future__ import annotations

from .engine import Database

from ...common.protocol import FAILED_STATUSES, Status
from .db import now
from .routing import shares
from .workers import WORKER_TTL_S

FAILED = FAILED_STATUSES   # what counts as a failed call on a worker


def invocation_totals(db: Database) -> list[dict]:
    """Per container, version (None: never routed) and status: the number of invocations and
    their summed duration (ms)."""
    return list(db.query("SELECT container, version, status, count(*) AS n, "
                         "coalesce(sum(duration_ms), 0) AS ms FROM invocations "
                         "GROUP BY container, version, status"))


def traffic_shares(db: Database) -> list[dict]:
    """Per container with a serving version: each version's share of its unpinned calls."""
    out = []
    splits: dict[int, dict[str, float]] = {}
    for cid, version, weight in db.execute(
            "SELECT t.container_id, v.version, t.weight FROM traffic_splits t "
            "JOIN versions v ON v.id = t.version_id").fetchall():
        splits.setdefault(cid, {})[version] = weight
    for cid, name, serving in db.execute(
            "SELECT c.id, c.name, v.version FROM containers c JOIN versions v "
            "ON v.id = c.serving_version_id").fetchall():
        out.extend({"container": name, "version": version, "share": share}
                   for version, share in shares(serving, splits.get(cid, {})).items())
    return out


def container_count(db: Database) -> int:
    return db["containers"].count


def worker_version_states(db: Database) -> list[dict]:
    return list(db.query("SELECT state, count(*) AS n FROM worker_versions GROUP BY state"))


def worker_figures(db: Database) -> list[dict]:
    """Per registered worker: its name and id, its state (an `up` worker whose heartbeat is
    stale is `lost`), whether it is up, the calls in flight its last heartbeat reported, and
    the calls recorded as run on it, with the failed ones."""
    failed = f"sum(CASE WHEN status IN ({', '.join('?' * len(FAILED))}) THEN 1 ELSE 0 END)"
    calls = {r["worker_id"]: r for r in db.query(
        f"SELECT worker_id, count(*) AS n, {failed} AS failed "
        "FROM invocations WHERE worker_id IS NOT NULL AND status NOT IN (?, ?) "
        "GROUP BY worker_id", [*FAILED, Status.QUEUED, Status.RUNNING])}
    cutoff = now() - WORKER_TTL_S
    out = []
    for w in db.query("SELECT id, name, state, last_seen, in_flight FROM workers "
                      "ORDER BY registered_at"):
        fresh = w["last_seen"] > cutoff
        up = w["state"] == "up" and fresh
        done = calls.get(w["id"]) or {}
        out.append({"id": w["id"], "name": w["name"] or w["id"],
                    "state": w["state"] if w["state"] != "up" or fresh else "lost",
                    "up": up, "in_flight": (w["in_flight"] or 0) if up else 0,
                    "calls": done.get("n") or 0, "failures": done.get("failed") or 0})
    return out

"""Where a call goes: the serving (or pinned) version of a container and the live workers that
report it ready: one indexed query answers both questions. Each process keeps the answer in
memory until the routing hint moves (see routing_hint.py)."""

from __future__ import annotations

import time

from .engine import Database

from ...errors import NotFound
from .db import routing_generation
from .workers import ROUTABLE, WORKER_TTL_S

_ROUTE_SQL = (
    "SELECT v.id, v.version, v.manifest, w.id, w.address FROM containers c JOIN versions v "
    "ON {join} LEFT JOIN worker_versions wv ON wv.version_id = v.id "
    "AND wv.state IN (" + ", ".join(f"'{state}'" for state in ROUTABLE) + ") "
    "LEFT JOIN workers w ON w.id = wv.worker_id "
    "AND w.state = 'up' AND w.last_seen > ? WHERE c.name = ?{extra}")
_SERVING_SQL = _ROUTE_SQL.format(
    join="v.id = coalesce(c.serving_version_id, c.active_version_id)", extra="")
_PINNED_SQL = _ROUTE_SQL.format(join="v.container_id = c.id", extra=" AND v.version = ?")


def route(db: Database, container: str, version: str | None
          ) -> tuple[tuple[int, str, str], list[dict]] | None:
    """((version id, version name, manifest text), [{"id", "address"} of ready workers]), or
    None when the container or version does not exist (see `missing`)."""
    cutoff = time.time() - WORKER_TTL_S
    if version is None:
        rows = db.execute(_SERVING_SQL, [cutoff, container]).fetchall()
    else:
        rows = db.execute(_PINNED_SQL, [cutoff, container, version]).fetchall()
    if not rows:
        return None
    vid, name, manifest, _, _ = rows[0]
    return (vid, name, manifest), [{"id": r[3], "address": r[4]} for r in rows
                                   if r[3] is not None]


def split(db: Database, container: str) -> tuple[tuple[str, float], ...]:
    """The container's traffic split: ((version, share), ...) of the versions other than the
    serving one that take a share of its unpinned calls (see traffic.py)."""
    return tuple((r[0], float(r[1])) for r in db.execute(
        "SELECT v.version, t.weight FROM traffic_splits t JOIN containers c "
        "ON c.id = t.container_id JOIN versions v ON v.id = t.version_id WHERE c.name = ? "
        "ORDER BY v.version", [container]).fetchall())


def shares(serving: str | None, split: dict[str, float]) -> dict[str, float]:
    """Every version's share of a container's unpinned calls: the split's, and the rest the
    serving version's (first)."""
    if serving is None:
        return dict(split)
    return {serving: round(max(0.0, 1.0 - sum(split.values())), 9), **split}


def version_states(db: Database, version_id: int) -> list[dict]:
    """What each live worker reports about one version ({"worker", "state", "error"}): why a
    call found no ready instance of it."""
    return [{"worker": r[0], "state": r[1], "error": r[2]} for r in db.execute(
        "SELECT wv.worker_id, wv.state, wv.error FROM worker_versions wv JOIN workers w "
        "ON w.id = wv.worker_id AND w.state = 'up' AND w.last_seen > ? "
        "WHERE wv.version_id = ? ORDER BY wv.worker_id", [time.time() - WORKER_TTL_S, version_id])]


def generation(db: Database) -> int:
    """The routing generation: the counter the triggers bump on every route change (what
    transaction() compares to bump the routing hint)."""
    return routing_generation(db)


def missing(db: Database, container: str, version: str | None) -> NotFound:
    """Why `route` found nothing, as the error to raise."""
    if not db["containers"].count_where("name = ?", [container]):
        return NotFound(f"no container named '{container}'; `dockyard ls` lists them")
    if version is not None:
        return NotFound(f"container '{container}' has no version '{version}'; "
                        f"`dockyard versions {container}` lists them")
    return NotFound(f"container '{container}' has no active version; deploy one")

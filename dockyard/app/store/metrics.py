"""The figures /metrics reports, read from the store (so every web process answers the same)."""

from __future__ import annotations

import sqlite_utils


def invocation_totals(db: sqlite_utils.Database) -> list[dict]:
    """Per container and status: the number of invocations and their summed duration (ms)."""
    return list(db.query("SELECT container, status, count(*) AS n, "
                         "coalesce(sum(duration_ms), 0) AS ms FROM invocations "
                         "GROUP BY container, status"))


def container_count(db: sqlite_utils.Database) -> int:
    return db["containers"].count


def worker_version_states(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT state, count(*) AS n FROM worker_versions GROUP BY state"))

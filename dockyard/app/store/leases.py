"""A lease row in the database that makes exactly one process the holder of a role (the async
dispatcher, the scheduler), with a fencing number that grows on every takeover."""

from __future__ import annotations

from .engine import Database

from .db import now, transaction


def acquire(db: Database, name: str, holder: str, ttl_s: float) -> int | None:
    """Take or renew the lease. Returns the fencing number while we hold it, None if another
    live holder has it. A changed number means we just took over."""
    with transaction(db) as conn:
        row = conn.execute("SELECT holder, fencing, expires_at FROM leases WHERE name = ?",
                           [name]).fetchone()
        t = now()
        if row is None:
            conn.execute("INSERT INTO leases (name, holder, fencing, expires_at) "
                         "VALUES (?, ?, 1, ?)", [name, holder, t + ttl_s])
            return 1
        current, fencing, expires = row
        if current == holder:
            conn.execute("UPDATE leases SET expires_at = ? WHERE name = ?", [t + ttl_s, name])
            return fencing
        if expires < t:
            conn.execute("UPDATE leases SET holder = ?, fencing = ?, expires_at = ? "
                         "WHERE name = ?", [holder, fencing + 1, t + ttl_s, name])
            return fencing + 1
        return None


def retry_in(db: Database, name: str, period_s: float) -> float:
    """How long one that did not get the lease waits to try again: until just after the
    holder's lease runs out, and at most `period_s` (a holder that died is succeeded as its
    lease ends, not up to a whole retry period later)."""
    row = db.execute("SELECT expires_at FROM leases WHERE name = ?", [name]).fetchone()
    if row is None:
        return 0.0
    return min(period_s, max(0.05, row[0] - now() + 0.05))


def release(db: Database, name: str, holder: str) -> None:
    db.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?",
                    [name, holder])


class LeaseLost(Exception):
    """Another holder took the lease over (this one stalled past its expiry): whatever this
    holder meant to write is not written."""


class holding(transaction):
    """`with holding(db, name, holder, fencing):` a write transaction that commits only while
    `holder` still holds the lease with that fencing number; otherwise it rolls back and
    raises LeaseLost. A holder that was paused past its expiry (a stopped process, a long GC)
    and woke up cannot write over its successor: the check and the writes are one
    transaction under the write lock, which a takeover (acquire) needs too."""

    def __init__(self, db: Database, name: str, holder: str, fencing: int):
        super().__init__(db)
        self.name, self.holder, self.fencing = name, holder, fencing

    def __enter__(self):
        conn = super().__enter__()
        row = conn.execute("SELECT holder, fencing, expires_at FROM leases WHERE name = ?",
                           [self.name]).fetchone()
        if row is None or row[0] != self.holder or row[1] != self.fencing or row[2] < now():
            error = LeaseLost(f"the {self.name} lease is no longer held with fencing "
                              f"{self.fencing} (now: {row[1] if row else 'none'})")
            super().__exit__(LeaseLost, error, None)
            raise error
        return conn

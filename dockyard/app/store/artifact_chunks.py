"""Package files kept in the database, in chunks (PostgreSQL: every control plane serves them
from there; see artifacts.py), and the lock that keeps retention from removing one an upload
is about to use, across hosts."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from .engine import WRITE_LOCK, Database

CHUNK = 1 << 20
ARTIFACTS_LOCK = WRITE_LOCK - 3


def has(db: Database, sha256: str) -> bool:
    return db.execute("SELECT 1 FROM artifact_chunks WHERE sha256 = ? AND n = 0",
                      [sha256]).fetchone() is not None


def put(db: Database, sha256: str, path: Path) -> None:
    """Store the file's bytes under its hash (once: the same bytes again change nothing)."""
    if has(db, sha256):
        return
    with open(path, "rb") as f:
        db.execute("BEGIN")
        try:
            n = 0
            while True:
                chunk = f.read(CHUNK)
                if not chunk and n:
                    break
                db.execute("INSERT INTO artifact_chunks (sha256, n, data) VALUES (?, ?, ?) "
                           "ON CONFLICT DO NOTHING", [sha256, n, chunk])
                n += 1
                if not chunk:
                    break
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def copy_to(db: Database, sha256: str, out: IO[bytes]) -> bool:
    """Write the stored bytes to `out`; False when none are stored."""
    n, found = 0, False
    while True:
        row = db.execute("SELECT data FROM artifact_chunks WHERE sha256 = ? AND n = ?",
                         [sha256, n]).fetchone()
        if row is None:
            return found
        found = True
        out.write(bytes(row[0]))
        n += 1


def remove(db: Database, sha256: str) -> None:
    db.execute("DELETE FROM artifact_chunks WHERE sha256 = ?", [sha256])


def lock(db: Database, exclusive: bool) -> None:
    db.execute(f"SELECT pg_advisory_lock{'' if exclusive else '_shared'}(?)", [ARTIFACTS_LOCK])


def unlock(db: Database, exclusive: bool) -> None:
    db.execute(f"SELECT pg_advisory_unlock{'' if exclusive else '_shared'}(?)",
               [ARTIFACTS_LOCK])

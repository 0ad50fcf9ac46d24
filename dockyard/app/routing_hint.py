"""A page in the data dir that says, without a database query, whether a route may have
changed: every write transaction that changes the routing generation (SQLite triggers count
each deploy, activation, removal and change of a worker's state; see db.py) raises it to the
new generation once it has committed, and a web process compares it on every call (an 8-byte
read of shared memory, where even a primary-key read of SQLite costs a read transaction that
contends with the record writers of every web process: ~40 µs of CPU per call under load).

It only ever grows (raised under a lock to the largest generation committed), so a process
that kept a route with the value it read before looking the route up sees any change
committed since. SQLite stays the truth: a route is looked up there whenever the hint moved,
and at least once a second anyway."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from pathlib import Path

_VALUE = struct.Struct("=Q")
_hints: dict[str, "RoutingHint"] = {}
_lock = threading.Lock()


class RoutingHint:
    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size < mmap.PAGESIZE:
                os.ftruncate(fd, mmap.PAGESIZE)
            self.map = mmap.mmap(fd, mmap.PAGESIZE)
        finally:
            os.close(fd)
        self.path = path

    def value(self) -> int:
        return _VALUE.unpack_from(self.map)[0]

    def raise_to(self, generation: int) -> None:
        with open(self.path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if generation > self.value():
                _VALUE.pack_into(self.map, 0, generation)


def routing_hint(db_path: str) -> RoutingHint:
    """The hint beside the database at `db_path` (one mapping per process)."""
    hint = _hints.get(db_path)
    if hint is None:
        with _lock:
            hint = _hints.get(db_path)
            if hint is None:
                hint = _hints[db_path] = RoutingHint(Path(db_path).with_name("routing.hint"))
    return hint


def _forget_after_fork() -> None:
    # A mapping made before a fork is shared with the parent, which is what is wanted; the
    # lock is fresh in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)

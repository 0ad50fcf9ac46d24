"""A page in the data dir that says, without a database query, whether a route may have
changed: every write transaction that changes the routing generation (SQLite triggers count
each deploy, activation, removal and change of a worker's state; see db.py) bumps it once it
has committed, and a web process compares it on every call (an 8-byte read of shared memory,
where even a primary-key read of SQLite costs a read transaction that contends with the
record writers of every web process: ~40 µs of CPU per call under load).

A counter bumped under a lock: a process that kept a route with the value it read before
looking the route up sees any change committed since (whatever happens to the database: a
restored one does not stall it). The database stays the truth: a route is looked up there whenever
the hint moved, and at least once a second anyway."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from pathlib import Path

from .engine import DbUrl, hint_path

_VALUE = struct.Struct("=Q")
_hints: dict[str, "RoutingHint"] = {}
_lock = threading.Lock()


class RoutingHint:
    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(self.fd).st_size < mmap.PAGESIZE:
                os.ftruncate(self.fd, mmap.PAGESIZE)
            self.map = mmap.mmap(self.fd, mmap.PAGESIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self.lock = threading.Lock()     # flock excludes other processes, not threads

    def value(self) -> int:
        return _VALUE.unpack_from(self.map)[0]

    def bump(self) -> None:
        with self.lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)   # against the other processes
            try:
                _VALUE.pack_into(self.map, 0, (self.value() + 1) % (1 << 64))
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


def routing_hint(target) -> RoutingHint:
    """The hint of the database `target` (engine.hint_path: beside a SQLite file, in the
    data dir for PostgreSQL), one mapping per process."""
    key = str(target.hint_path) if isinstance(target, DbUrl) else str(target)
    hint = _hints.get(key)
    if hint is None:
        with _lock:
            hint = _hints.get(key)
            if hint is None:
                hint = _hints[key] = RoutingHint(hint_path(target))
    return hint


def _forget_after_fork() -> None:
    # A forked process opens the file again: an inherited descriptor shares its flock with
    # the parent, which would then not exclude it.
    global _lock
    _lock = threading.Lock()
    _hints.clear()


os.register_at_fork(after_in_child=_forget_after_fork)

"""What `serve` and its web processes tell each other while serve stops, through one page of
shared memory: serve creates it (an anonymous file: nothing is left on disk) and hands it to
gunicorn, whose processes inherit it. Serve writes its state (serving, stopping, halting);
each web process writes one line: its pid, the calls it has in flight, when the last of
them is due to end and when it wrote that.

A web process reads the state on every call (8 bytes of shared memory), and writes its line
only while serve stops (see app/stopping.py)."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from dataclasses import dataclass

SERVING, STOPPING, HALTING = 0, 1, 2
# The page's descriptor in a web process (serve passes it to gunicorn).
FD_ENV = "DOCKYARD_SERVE_STATE_FD"

PAGE = mmap.PAGESIZE
_STATE = struct.Struct("=Q")
_LINE = struct.Struct("=IIIIdd")     # pid, state seen, calls, -, last deadline, written (epoch)
LINES_AT = 64
LINES = (PAGE - LINES_AT) // _LINE.size


@dataclass(frozen=True)
class InFlight:
    """Calls in flight: how many, and when the last of them is due to end (epoch seconds;
    None when no deadline is known)."""

    calls: int = 0
    last_deadline: float | None = None

    def __add__(self, other: "InFlight") -> "InFlight":
        deadlines = [d for d in (self.last_deadline, other.last_deadline) if d is not None]
        return InFlight(self.calls + other.calls, max(deadlines) if deadlines else None)


class ServeState:
    def __init__(self, fd: int):
        self.fd = fd
        self.map = mmap.mmap(fd, PAGE)
        self.line: int | None = None       # this process's line, once it has one
        self.line_pid = 0

    @classmethod
    def create(cls) -> "ServeState":
        """A new page (serve's), state SERVING."""
        fd = os.memfd_create("dockyard-serve-state", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGE)
        return cls(fd)

    @classmethod
    def inherited(cls) -> "ServeState | None":
        """The page serve handed this process, if it runs under serve."""
        try:
            fd = int(os.environ[FD_ENV])
            if os.fstat(fd).st_size < PAGE:
                return None
        except (KeyError, ValueError, OSError):
            return None
        return cls(fd)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    # -- serve's side -------------------------------------------------------------------------

    def set(self, state: int) -> None:
        _STATE.pack_into(self.map, 0, state)

    def in_flight(self, pids: list[int], since: float) -> tuple[InFlight, list[int]]:
        """What the web processes `pids` have in flight, from the lines they wrote at or after
        `since`; and the pids that wrote none since then (not known yet)."""
        total, unknown = InFlight(), []
        lines = {}
        for i in range(LINES):
            pid, _, calls, _, deadline, written = _LINE.unpack_from(self.map,
                                                                    LINES_AT + i * _LINE.size)
            if pid and written >= since:
                lines[pid] = InFlight(calls, deadline if calls and deadline > 0 else None)
        for pid in pids:
            if pid in lines:
                total += lines[pid]
            else:
                unknown.append(pid)
        return total, unknown

    # -- a web process's side -----------------------------------------------------------------

    def state(self) -> int:
        return _STATE.unpack_from(self.map, 0)[0]

    def report(self, state: int, in_flight: InFlight) -> None:
        """Write this process's line (it takes a free one the first time)."""
        pid = os.getpid()
        if self.line is None or self.line_pid != pid:
            self.line, self.line_pid = self._claim(pid), pid
        if self.line < 0:
            return
        _LINE.pack_into(self.map, LINES_AT + self.line * _LINE.size, pid, state,
                        in_flight.calls, 0, in_flight.last_deadline or 0.0, time.time())

    def _claim(self, pid: int) -> int:
        """A line for `pid`: its own, or one that is free or whose process is gone (-1 if
        none is). A POSIX lock on the page keeps two processes off the same line."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            free = -1
            for i in range(LINES):
                holder = _LINE.unpack_from(self.map, LINES_AT + i * _LINE.size)[0]
                if holder == pid:
                    return i
                if free < 0 and (holder == 0 or not _alive(holder)):
                    free = i
            if free >= 0:
                _LINE.pack_into(self.map, LINES_AT + free * _LINE.size, pid, 0, 0, 0, 0.0, 0.0)
            return free
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_inherited: tuple[int, ServeState | None] | None = None


def current() -> ServeState | None:
    """This process's view of the page serve handed it (None outside serve): one mapping per
    process."""
    global _inherited
    if _inherited is None or _inherited[0] != os.getpid():
        _inherited = (os.getpid(), ServeState.inherited())
    return _inherited[1]


def stopping() -> bool:
    """Whether the serve this process runs under is stopping."""
    page = current()
    return page is not None and page.state() != SERVING

"""The direct channel to a one-at-a-time process: what the worker agent, serve's web processes
and the function process share so that a warm call goes from a web process straight to the
function process and back, with no hop through the agent.

- *Channels*: each web thread gets its own socket to each process of a version (the agent makes
  the pair and hands one end to the process, the other to the thread). The process serves its
  request socket and every channel one call at a time, in the order they come; calls waiting
  for it wait in their sockets. A call carries `start_by` (monotonic): a process that reaches
  it later answers `not_started` instead of running it (the caller waited its queue time).
- A *pool page* per version, which the web processes and the agent map and no function process
  ever gets: an epoch the agent bumps whenever a process joins or leaves, and whether the
  version still takes calls (a web thread compares the epoch before each call and fetches its
  channels again when it moved); then the *call ledger*, a line per channel: the agent writes
  which channel and process a line is for, the web thread that holds the channel writes each
  call it sends down it (its id, when, its queue time and timeout) and when its answer came.
  This is what the agent knows of direct calls: it times them, arms and checks the CPU budget,
  drains and judges the process's slot against it.
- A *slot* per process: a page the agent makes and hands to the process, which writes there
  the call in hand and when it started, how many it served and when the last ended. The
  function runs in that process and can write the page too, so the slot is the process's word:
  web threads read its busy flag to pick a free process, and the agent compares it with the
  ledger (a slot that claims a call nobody sent is a broken protocol); no timeout, budget,
  kill or log line rests on it.

Standard library only; sandbox/bootstrap.py keeps a copy of the slot's layout."""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import struct
import threading
import time
from typing import NamedTuple

PAGE = mmap.PAGESIZE
# A slot: busy, unused, served, started (monotonic), last ended (monotonic), call id length.
_SLOT = struct.Struct("=IIQddI")
_CALL_ID_AT = _SLOT.size
CALL_ID_MAX = 128

# The pool page: epoch, accepting; then the ledger's lines from LEDGER_AT.
_POOL = struct.Struct("=QI")
LEDGER_AT = 64
# A ledger line. The agent writes the first two fields (the channel's inode on the web
# thread's side, 0 for a free line; the process's number); the web thread all the others:
# flags (ADOPTED once it found its line), calls sent, calls answered, when the last was sent,
# its start_by and timeout, when the last answer came (monotonic), and the last call's id.
_LINE = struct.Struct("=QIIQQddddI32s")
LINE_SIZE = 128
POOL_PAGE_SIZE = 64 * PAGE
LINES = (POOL_PAGE_SIZE - LEDGER_AT) // LINE_SIZE
ADOPTED = 1
# Where the web thread's fields start in a line.
_FLAGS, _SENT, _ANSWERED, _SEND_TIMES, _ANSWER_TIME, _CALL = 12, 16, 24, 32, 56, 64

# The format of an invocation id (app/store/invocations.py new_id): what a call id from a
# function process must look like before it is logged or compared with anything.
CALL_ID = re.compile(r"inv_[0-9a-f]{24}")


def call_id_ok(value) -> bool:
    return isinstance(value, str) and CALL_ID.fullmatch(value) is not None


def _memfd(name: str, size: int = PAGE) -> int:
    """Shared memory whose size nobody can change: a function process that got hold of its
    slot's descriptor and shrank it would crash whoever reads the page (SIGBUS)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Line(NamedTuple):
    """One ledger line as the agent reads it."""

    inode: int
    number: int
    adopted: bool
    sent: int
    answered: int
    sent_at: float
    start_by: float
    timeout: float
    answered_at: float
    call_id: str


class PoolPage:
    def __init__(self, fd: int | None = None):
        self.fd = _memfd("dockyard-pool", POOL_PAGE_SIZE) if fd is None else fd
        self.map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        self.lines = (len(self.map) - LEDGER_AT) // LINE_SIZE
        self._free: list[int] | None = None    # the agent's: lines it may issue (made on use)
        self._resting: list[tuple[float, int]] = []    # lines freed later (monotonic, line)
        self._lock = threading.Lock()

    def read(self) -> tuple[int, bool]:
        """(epoch, whether the version takes direct calls)."""
        epoch, accepting = _POOL.unpack_from(self.map)
        return epoch, bool(accepting)

    def set(self, epoch: int, accepting: bool) -> None:
        _POOL.pack_into(self.map, 0, epoch, int(accepting))

    # -- the agent's side of the ledger ---------------------------------------------------

    def issue(self, inode: int, number: int) -> int | None:
        """A line for a new channel (`inode`: its web thread's end) to process `number`; None
        when every line is taken (the channel then goes unwitnessed)."""
        with self._lock:
            if self._free is None:
                self._free = list(range(self.lines - 1, -1, -1))
            now = time.monotonic()
            for item in [item for item in self._resting if item[0] <= now]:
                self._resting.remove(item)
                self._free.append(item[1])
            if not self._free:
                return None
            line = self._free.pop()
        at = LEDGER_AT + line * LINE_SIZE
        self.map[at:at + LINE_SIZE] = bytes(LINE_SIZE)
        struct.pack_into("=QI", self.map, at, inode, number)
        return line

    def retire(self, line: int, rest: float = 0.0) -> None:
        """Free a line; `rest`: not issued again for that long (a web thread may still write
        it: its channel is still open)."""
        struct.pack_into("=Q", self.map, LEDGER_AT + line * LINE_SIZE, 0)
        with self._lock:
            if rest > 0:
                self._resting.append((time.monotonic() + rest, line))
            elif self._free is not None:
                self._free.append(line)

    def line(self, line: int) -> Line:
        """A line as it stands: read until two reads agree (its web thread writes it field by
        field)."""
        at = LEDGER_AT + line * LINE_SIZE
        raw = bytes(self.map[at:at + _LINE.size])
        for _ in range(3):
            again = bytes(self.map[at:at + _LINE.size])
            if again == raw:
                break
            raw = again
        inode, number, flags, sent, answered, sent_at, start_by, timeout, answered_at, size, \
            call_id = _LINE.unpack(raw)
        return Line(inode, number, bool(flags & ADOPTED), sent, answered, sent_at, start_by,
                    timeout, answered_at, call_id[:min(size, 32)].decode("ascii", "replace"))

    # -- the web thread's side ------------------------------------------------------------

    def entry(self, channel_fd: int) -> "LedgerEntry | None":
        """The line the agent issued for the channel `channel_fd` (the web thread's end),
        marked adopted: from now on the agent counts on it. None if there is none."""
        key = struct.pack("=Q", os.fstat(channel_fd).st_ino)
        at = self.map.find(key, LEDGER_AT)
        while at >= 0 and (at - LEDGER_AT) % LINE_SIZE:
            at = self.map.find(key, at + 1)
        if at < 0:
            return None
        struct.pack_into("=I", self.map, at + _FLAGS, ADOPTED)
        return LedgerEntry(self, at, key)

    def close(self) -> None:
        _close_map(self)


class LedgerEntry:
    """A web thread's line: `sent()` before each call goes down its channel, `answered()` once
    its answer came or the thread gave up on it, before the channel is used again or closed.
    Only this thread writes the line; a line the agent freed meanwhile (the process is gone)
    is left alone."""

    def __init__(self, page: PoolPage, at: int, key: bytes):
        self.map = page.map
        self.at = at
        self.key = key
        self.sent_count = struct.unpack_from("=Q", self.map, at + _SENT)[0]

    def _ours(self) -> bool:
        return self.map[self.at:self.at + 8] == self.key

    def sent(self, call_id: str, start_by: float, timeout: float) -> None:
        if not self._ours():
            return
        raw = call_id.encode("ascii", "replace")[:32]
        now = time.monotonic()
        struct.pack_into("=ddd", self.map, self.at + _SEND_TIMES, now, start_by, timeout)
        struct.pack_into("=I32s", self.map, self.at + _CALL, len(raw), raw)
        self.sent_count += 1
        # Last: the agent sees a call once everything about it is written.
        struct.pack_into("=Q", self.map, self.at + _SENT, self.sent_count)

    def answered(self) -> None:
        if not self._ours():
            return
        struct.pack_into("=d", self.map, self.at + _ANSWER_TIME, time.monotonic())
        struct.pack_into("=Q", self.map, self.at + _ANSWERED, self.sent_count)


class Slot:
    """One process's page: the process writes it (sandbox/bootstrap.py), the agent reads it,
    and web threads read whether it is busy to pick a free process."""

    def __init__(self, fd: int | None = None, readonly: bool = False):
        self.fd = _memfd("dockyard-slot") if fd is None else fd
        self.map = mmap.mmap(self.fd, PAGE, prot=mmap.PROT_READ if readonly else
                             mmap.PROT_READ | mmap.PROT_WRITE)

    @property
    def busy(self) -> bool:
        return bool(_SLOT.unpack_from(self.map)[0])

    def read(self) -> tuple[bool, int, float, float, str]:
        """(busy, served, started, last ended, call id), as the process wrote them."""
        busy, _, served, started, ended, size = _SLOT.unpack_from(self.map)
        call_id = bytes(self.map[_CALL_ID_AT:_CALL_ID_AT + min(size, CALL_ID_MAX)])
        return bool(busy), served, started, ended, call_id.decode("utf-8", "replace")

    def close(self) -> None:
        _close_map(self)


def _close_map(page) -> None:
    try:
        page.map.close()
    except (BufferError, ValueError):
        pass
    if page.fd >= 0:
        try:
            os.close(page.fd)
        except OSError:
            pass
        page.fd = -1

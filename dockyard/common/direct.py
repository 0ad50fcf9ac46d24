"""The direct channel to a one-at-a-time process: what the worker agent, serve's web processes
and the function process share so that a warm call goes from a web process straight to the
function process and back, with no hop through the agent.

- *Channels*: each web thread gets its own socket to each process of a version (the agent makes
  the pair and hands one end to the process, the other to the thread). The process serves its
  request socket and every channel one call at a time, in the order they come; calls waiting
  for it wait in their sockets. A call carries `start_by` (monotonic): a process that reaches
  it later answers `not_started` instead of running it (the caller waited its queue time).
- A *slot* per process: a page the agent makes and hands to the process, which writes there
  the call in hand and when it started, how many it served and when the last ended. The agent
  reads it to kill a call past its timeout, arm the CPU budget, scale to zero and cancel; the
  process is not trusted with anything else: a slot that lies only keeps the process's own
  calls from being stopped on time, and the caller's own deadline still ends them.
- A *pool page* per version: an epoch the agent bumps whenever a process joins or leaves, and
  whether the version still takes calls. A web thread compares the epoch before each call and
  fetches its channels again when it moved.

Standard library only; sandbox/bootstrap.py keeps a copy of the slot's layout."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

PAGE = mmap.PAGESIZE
# The pool page: epoch, accepting.
_POOL = struct.Struct("=QI")
# A slot: busy, unused, served, started (monotonic), last ended (monotonic), call id length.
_SLOT = struct.Struct("=IIQddI")
_CALL_ID_AT = _SLOT.size
CALL_ID_MAX = 128


def _memfd(name: str) -> int:
    """A page of shared memory whose size nobody can change: a function process that got
    hold of its slot's descriptor and shrank it would crash whoever reads the page (SIGBUS)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, PAGE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class PoolPage:
    def __init__(self, fd: int | None = None):
        self.fd = _memfd("dockyard-pool") if fd is None else fd
        self.map = mmap.mmap(self.fd, PAGE)

    def read(self) -> tuple[int, bool]:
        """(epoch, whether the version takes direct calls)."""
        epoch, accepting = _POOL.unpack_from(self.map)
        return epoch, bool(accepting)

    def set(self, epoch: int, accepting: bool) -> None:
        _POOL.pack_into(self.map, 0, epoch, int(accepting))

    def close(self) -> None:
        _close_map(self)


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
        """(busy, served, started, last ended, call id)."""
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

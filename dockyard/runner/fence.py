"""The worker's side of fenced calls: a call frame from the control plane is taken (and
acknowledged) only within the time it allows from its arrival, and must start by the time it
allows, so that a frame the worker reads late (it was stopped, or starved) runs nothing once
the control plane has given up on it. Arrival is the kernel's stamp on a TCP connection; on a
Unix socket (the same host) the control plane sends absolute times on the shared monotonic
clock."""

from __future__ import annotations

import logging
import socket
import struct
import time

from ..common.frames import FrameSocket
from ..common.protocol import Frame, Status

log = logging.getLogger("dockyard.server")

# SO_TIMESTAMPNS / SCM_TIMESTAMPNS (asm-generic/socket.h): the kernel's arrival time of what a
# read returns, on the real-time clock. TCP has it; a Unix stream socket does not.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")


class StampedFrameSocket(FrameSocket):
    """Frames from the control plane with the time the kernel received their bytes: a call
    read late (the worker was stopped, or starved) is judged by when it arrived, not by when
    it was read."""

    def __init__(self, sock: socket.socket, stamped: bool):
        super().__init__(sock)
        # Wall clock: when the last bytes of this frame arrived (the control plane counts
        # its wait for the acknowledgement from when it had sent them all).
        self.arrived: float | None = None
        self.stamped = False
        if stamped:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                self.stamped = True
            except OSError:
                pass

    def _more(self) -> bytes:
        if not self.stamped:
            return super()._more()
        data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(_TIMESPEC.size))
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and \
                    len(raw) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(raw)
                at = seconds + nanoseconds / 1e9
                if self.arrived is None or at > self.arrived:
                    self.arrived = at
        return data


def take(frame: dict, arrived: float | None, unix: bool) -> dict | None:
    """Whether a fenced call frame may still be taken: None if so (its `start_by` is then set
    on this host's monotonic clock, for the process that runs it), else the `not_started`
    answer. The control plane gives up on a frame not acknowledged in time, so one taken
    past its `take_within` (counted from its arrival) must run nothing: a worker woken from
    SIGSTOP finds the calls it slept through already answered elsewhere."""
    now_monotonic = time.monotonic()
    try:
        if unix and "take_by" in frame:
            # The same host: the control plane's monotonic clock is ours.
            take_by = float(frame["take_by"])
            start_by = float(frame.get("start_by", take_by))
        else:
            # Another host's clocks mean nothing here: count the remaining times from the
            # frame's arrival (the kernel's stamp when there is one).
            age = max(0.0, time.time() - arrived) if arrived is not None else 0.0
            take_by = now_monotonic - age + float(frame["take_within"])
            start_by = now_monotonic - age + float(frame.get("start_within", 0) or 0)
    except (TypeError, ValueError):
        return {"type": Frame.ERROR, "id": frame.get("id"),
                "error": {"type": "BadFrame", "message": "take_within is not a number"}}
    if now_monotonic > take_by:
        log.warning("%s: reached this worker %.1fs past the time it had to be taken by; not "
                    "run", frame.get("id"), now_monotonic - take_by)
        return {"type": Frame.RESULT, "id": frame.get("id"), "status": Status.NOT_STARTED,
                "error": {"type": "NotStarted", "message": "the call reached the worker too "
                                                           "late to be taken; it did not run"}}
    frame["start_by"] = max(start_by, take_by)
    return None


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalive and a user timeout: a control plane whose host vanished frees this
    connection's thread within seconds."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 3000)
    except (OSError, AttributeError):
        pass

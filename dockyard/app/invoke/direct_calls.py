"""A web thread's direct calls to the one-at-a-time processes of a worker on this host: the call
goes down the thread's own socket straight to the function process, and the reply comes
straight back, with no hop through the worker agent (a warm call's cheapest path; see
common/direct.py).

The worker keeps everything but the call itself: it starts, replaces and drains the processes,
times each call from what this thread writes in its line of the pool page's call ledger (when
it sent a call, its queue time and timeout, when it had the answer: never from the slot the
function can write) and kills one past its timeout. A call waits in its socket while the
process is busy, for its queue time at most: one the process has not read by then is
withdrawn (answered all-busy: the process answers it `not_started` when it gets to it, so it
never runs). A web thread asks it
for channels to a version once (and again whenever the pool's epoch moves), and tells it when a
call went wrong: no answer by the call's queue time plus its timeout, the channel closed (the
process died: the worker says whether the call had started), or the reply broke the protocol.
A call that cannot go direct (no channel yet, the version draining) is not sent: the caller
relays it through the worker, which queues, starts processes on demand and answers
`not_running`."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import termios
import threading
import time
from dataclasses import dataclass

from ...common.direct import LedgerEntry, PoolPage, Slot
from ...common.frames import FrameCut, FrameSocket
from ...common.protocol import Frame, Status
from ...runner.process import (REPLY_MAX_BYTES, SEND_GRACE_S, SEND_WAIT_S, is_reply,
                               not_started, translate)
from .worker_client import UNIX_PREFIX, WORKER_DIED, WorkerConnections, WorkerGone

log = logging.getLogger("dockyard.direct")

# After the worker had no channels for a version (scaled to zero, still starting, draining),
# calls are relayed this long before it is asked again.
NONE_FOR_S = 1.0
# A reply later than the call's queue time plus its timeout plus this is given up on (the
# worker's watchdog has stopped the call by then, unless the process is stuck).
REPLY_GRACE_S = 2.0
LOST_TIMEOUT_S = 30.0
# Versions a web thread keeps channels to (a socket per process each).
VERSIONS_KEPT = 32
FETCH_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Channels:
    """One web thread's channels to a version's processes."""

    page: PoolPage
    epoch: int
    # (process number, channel, its slot, this thread's ledger line for it: None from a
    # worker that keeps no ledger)
    processes: list[tuple[int, FrameSocket, Slot, LedgerEntry | None]]
    agent: str                                  # which run of the worker made them
    turn: int = 0

    def current(self) -> bool:
        return self.page.read() == (self.epoch, True)

    def pick(self) -> tuple[int, FrameSocket, Slot, LedgerEntry | None]:
        """A process with no call in hand if there is one (its slot says), taking turns;
        else the next in turn (the call waits in its socket)."""
        processes = self.processes
        count = len(processes)
        self.turn += 1
        if count == 1:
            return processes[0]
        for i in range(count):
            chosen = processes[(self.turn + i) % count]
            if not chosen[2].busy:
                return chosen
        return processes[self.turn % count]

    def close(self) -> None:
        for _, channel, slot, _ in self.processes:
            channel.close()
            slot.close()
        self.page.close()


class DirectCalls:
    def __init__(self, connections: WorkerConnections):
        self.connections = connections
        self.local = threading.local()
        # A forked copy (gunicorn forks its web processes) starts with none: the parent's
        # descriptors are the parent's business.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self.local = threading.local()

    def _mine(self) -> dict:
        """This thread's channels, by (address, version id): a float is "none until"."""
        try:
            return self.local.versions
        except AttributeError:
            self.local.versions = {}
            return self.local.versions

    def call(self, address: str, version_id: int, call_id: str, function: str, event,
             timeout: float, queue_wait: float) -> dict | None:
        """Run the call on a process of the version, straight, if that process takes it
        within `queue_wait`; its reply (as the worker would have answered it; all-busy if it
        was withdrawn), or None if it was not sent (relay it)."""
        if not address.startswith(UNIX_PREFIX):
            return None
        versions = self._mine()
        key = (address, version_id)
        channels = versions.pop(key, None)
        if isinstance(channels, _Channels) and not channels.current():
            channels.close()
            channels = None
        if channels is None or (isinstance(channels, float) and channels <= time.monotonic()):
            channels = self._fetch(address, version_id) or time.monotonic() + NONE_FOR_S
            while len(versions) >= VERSIONS_KEPT:
                # Each costs descriptors: the thread keeps the versions it called last.
                oldest = versions.pop(next(iter(versions)))
                if isinstance(oldest, _Channels):
                    oldest.close()
        versions[key] = channels    # to the end: the versions called last are kept
        if not isinstance(channels, _Channels):
            return None
        number, channel, _, entry = channels.pick()
        sent = time.monotonic()
        start_by = sent + queue_wait
        if entry is not None:
            # Before the send: the worker times the call from this, not from the slot.
            entry.sent(call_id, start_by, timeout)
        frame = {"type": Frame.INVOKE, "id": call_id, "invocation_id": call_id,
                 "function": function, "event": event, "start_by": start_by,
                 "timeout": timeout}
        # The whole call is bounded, whatever the process does with its end of the socket.
        budget = queue_wait + timeout + REPLY_GRACE_S
        try:
            # The first wait for the reply lasts the queue time (see _receive).
            channel.set_recv_timeout(queue_wait)
            channel.send_by(frame, start_by + SEND_GRACE_S)
        except TimeoutError:
            # It did not take the call within its queue time (perhaps part of it): it is
            # stuck or hostile, and the call, never whole there, never ran.
            _answered(entry)
            self._drop(key)
            return self._lost(address, channels.agent, number, call_id, "unread", timeout)
        except OSError:
            # The process is gone and the call never reached it: the worker runs it.
            _answered(entry)
            self._drop(key)
            return None
        why = None
        try:
            answer = _receive(channel, start_by, sent + budget)
        except _Withdrawn:
            # Every process it could go to stayed busy: the call never ran, and never will.
            # Its ledger line stays as sent: to the worker, a call whose caller left, over
            # once the process is between calls (an answer now would shift the timing of
            # the call in hand).
            self._drop(key)
            return not_started()
        except TimeoutError:
            why = "timeout"
        except FrameCut:
            why = "closed"      # a reply cut short: the process died while writing it
        except (ValueError, RecursionError):    # FrameError included
            why = "protocol"
        except OSError:
            why = "closed"
        else:
            if answer is None:
                why = "closed"
            elif not is_reply(answer, call_id):
                why = "protocol"
        _answered(entry)
        if why is not None:
            self._drop(key)
            return self._lost(address, channels.agent, number, call_id, why, timeout)
        reply = translate(answer)
        if reply.get("recycle"):
            # Out of memory: the worker replaces the process; this reply stands.
            self._drop(key)
            self._lost(address, channels.agent, number, call_id, "recycle", timeout)
        reply["type"] = Frame.RESULT
        reply["id"] = call_id
        return reply

    def held(self, version_id: int) -> list[str]:
        """The workers' addresses this thread holds current channels to `version_id` at: its
        processes there answer calls whatever the worker agent does meanwhile."""
        return [address for (address, vid), channels in self._mine().items()
                if vid == version_id and isinstance(channels, _Channels) and channels.current()]

    def _drop(self, key: tuple[str, int]) -> None:
        channels = self._mine().pop(key, None)
        if isinstance(channels, _Channels):
            channels.close()

    def _lost(self, address: str, agent: str, number: int, call_id: str, why: str,
              timeout: float) -> dict:
        """Ask the worker what became of a call that got no proper reply."""
        frame = {"type": Frame.LOST, "agent": agent, "number": number, "id": call_id,
                 "why": why, "timeout": timeout}
        try:
            return self.connections.request(address, frame, LOST_TIMEOUT_S)
        except WorkerGone as exc:
            log.warning("%s: the worker cannot say what became of it: %s", call_id, exc)
            return {"type": Frame.RESULT, "id": call_id, "status": Status.CRASHED,
                    "error": dict(WORKER_DIED)}

    def _fetch(self, address: str, version_id: int) -> _Channels | None:
        try:
            reply, fds = self.connections.request_fds(
                address, {"type": Frame.CHANNELS, "version_id": version_id}, FETCH_TIMEOUT_S)
        except WorkerGone as exc:
            log.info("no direct channels to version %s at %s: %s", version_id, address, exc)
            return None
        children = reply.get("children") or []
        if reply.get("type") != Frame.CHANNELS or not children or \
                len(fds) != 1 + 2 * len(children):
            for fd in fds:
                os.close(fd)
            return None
        page = PoolPage(fds[0])
        processes = []
        for i, child in enumerate(children):
            fd, slot_fd = fds[1 + 2 * i], fds[2 + 2 * i]
            # The reply's result stays the bytes the process encoded (see invoke/sync.py).
            channel = FrameSocket(socket.socket(fileno=fd), raw_results=True)
            # A process that stops reading its calls cannot hold this thread: a call it has
            # not taken within its queue time would be answered not_started anyway.
            channel.set_send_timeout(SEND_WAIT_S)
            processes.append((int(child["number"]), channel, Slot(slot_fd, readonly=True),
                              page.entry(fd)))
        return _Channels(page, int(reply.get("epoch") or 0), processes,
                         str(reply.get("agent") or ""))


class _Withdrawn(Exception):
    """The process had not read the call when its queue time was over."""


def _receive(channel: FrameSocket, start_by: float, deadline: float):
    """The reply on `channel` (whose receive timeout is the call's queue time), by
    `deadline`. _Withdrawn if no byte of it came by `start_by` and the process had not read
    the whole call by then: it answers `not_started` when it does (past its start-by)."""
    try:
        return channel.recv_until(deadline, REPLY_MAX_BYTES)
    except TimeoutError:
        if channel.buffer or time.monotonic() >= deadline:
            raise   # part of a reply came and the rest did not, or out of time
    late = start_by - time.monotonic()
    if late >= 0:
        time.sleep(late + 0.001)    # a kernel timeout may end a hair early
    if _unsent(channel.sock):
        raise _Withdrawn
    channel.set_recv_timeout(max(deadline - time.monotonic(), 0.001))
    return channel.recv_until(deadline, REPLY_MAX_BYTES)


def _unsent(sock: socket.socket) -> bool:
    """Whether some of what this end wrote is still unread at the other end (the kernel's
    count of the bytes it holds for the peer; a process reads a call only to take it, or to
    answer it past its start-by). False when it cannot be told."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)
    except OSError:
        return False
    return count[0] > 0


def _answered(entry: LedgerEntry | None) -> None:
    """The call on this line is over for this thread (answered, or given up on): marked before
    the channel is used again, dropped, or the worker asked about it."""
    if entry is not None:
        entry.answered()

"""What the worker knows of a one-at-a-time process's calls, from sources the function cannot
write: the call ledger in the pool page (each web thread writes there the calls it sends down
its channel and when their answers came; see common/direct.py), the bytes still unread in each
channel and in the request socket (the kernel's, through the worker's own copy of the
process's end), and the calls the worker relayed itself. The process's slot is never read
here (see direct_watch.py, which holds it against this account)."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass

from ..common.direct import PoolPage

log = logging.getLogger("dockyard.process")

# A web thread adopts its ledger line as soon as it gets its channel, before it sends anything
# down it; a line still unadopted after this belongs to a web side that does not keep the
# ledger, and the process's calls on that channel go unseen.
ADOPT_WAIT_S = 0.25
# A line of a process that died is not issued again for this long: the web thread that held
# its channel may still write the answer of its last call (it asks the worker first).
DEAD_LINE_REST_S = 60.0
# The line of a channel its web thread closed rests a moment too (a late write is ignored).
CLOSED_LINE_REST_S = 1.0
# How much of a channel's unread bytes is looked at for the id of a call waiting there (a
# frame starts with its type and id).
PEEK_BYTES = 512
# What was left unread in a channel its web thread closed is kept this long: the thread asks
# the worker what became of its call after it closed the channel.
CLOSED_UNREAD_KEPT_S = 10.0
HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


@dataclass
class Call:
    """A call the worker knows was sent to the process and not answered yet."""

    call_id: str
    sent_at: float      # monotonic, as its sender wrote it
    timeout: float


@dataclass
class View:
    """One look at the process's calls."""

    witnessed: bool     # every channel's calls are in the ledger (else some go unseen)
    calls: list[Call]   # sent and not answered, oldest first
    sent: int           # calls sent to the process that the worker saw
    last_answer: float  # when the last answer came (monotonic; 0: none yet)


@dataclass(eq=False)
class _Channel:
    sock: socket.socket     # the worker's copy of the process's end
    line: int | None        # its ledger line (None: the ledger was full, or there is none)
    made: float


class Witness:
    def __init__(self, page: PoolPage | None, number: int,
                 request: socket.socket | None = None):
        self.page = page
        self.number = number
        # The worker's copy of the process's end of its request socket (relayed calls).
        self.request = request
        self.lock = threading.Lock()
        self.channels: list[_Channel] = []
        self.relayed: dict[str, Call] = {}
        self.relayed_count = 0
        self.orphans: dict[str, Call] = {}
        self.retired_sent = 0       # calls sent down channels that are gone
        self.last_answer = 0.0
        self.unread_at_death: list[bytes] | None = None
        self.closed_unread: list[tuple[float, bytes]] = []   # (when closed, unread bytes)
        self.closed = False
        self.unseen_told = False

    # -- what is added and removed ----------------------------------------------------------

    def add(self, theirs: socket.socket, inode: int) -> None:
        """A new channel: the process got `theirs` (the worker keeps this copy, which says
        what the process has read of it), the web thread the end whose inode is `inode`."""
        line = None
        if self.page is not None:
            try:
                line = self.page.issue(inode, self.number)
            except ValueError:      # the pool page is closed: the pool stopped
                line = None
            if line is None and not self.unseen_told:
                self.unseen_told = True
                log.warning("process %s: no ledger line left for a channel; its calls there "
                            "go unseen (its slot is the hint they are timed by)", self.number)
        with self.lock:
            if self.closed:
                theirs.close()
                return
            self.channels.append(_Channel(theirs, line, time.monotonic()))

    def relayed_sent(self, call_id: str, timeout: float) -> None:
        with self.lock:
            self.relayed[call_id] = Call(call_id, time.monotonic(), timeout)
            self.relayed_count += 1

    def relayed_answered(self, call_id: str) -> None:
        with self.lock:
            if self.relayed.pop(call_id, None) is not None:
                self.last_answer = time.monotonic()

    def relayed_withdrawn(self, call_id: str) -> None:
        """A relayed call given up on while still unread (see Child._read_reply): no answer,
        so the call in hand is still timed from when it began."""
        with self.lock:
            self.relayed.pop(call_id, None)

    def orphans_done(self) -> None:
        """The calls whose web threads left mid-call (nobody marks them answered) count as
        over: the process says it has no call in hand. Its word ends them early, never late:
        a process with no call is held to its between-calls CPU allowance."""
        with self.lock:
            if self.orphans:
                self.orphans.clear()
                self.last_answer = time.monotonic()

    # -- looking ----------------------------------------------------------------------------

    def look(self, now: float) -> View:
        calls: list[Call] = []
        witnessed = True
        with self.lock:
            sent = self.retired_sent + self.relayed_count
            last = self.last_answer
            for channel in self.channels:
                line = self._line(channel)
                if line is None:
                    witnessed = False
                    continue
                if not line.adopted:
                    if now - channel.made > ADOPT_WAIT_S:
                        witnessed = False
                    continue
                sent += line.sent
                last = max(last, line.answered_at)
                if line.sent > line.answered:
                    calls.append(Call(line.call_id, line.sent_at, line.timeout))
            calls.extend(self.relayed.values())
            calls.extend(self.orphans.values())
        calls.sort(key=lambda call: call.sent_at)
        return View(witnessed, calls, sent, last)

    def _line(self, channel: _Channel):
        if channel.line is None or self.page is None:
            return None
        try:
            return self.page.line(channel.line)
        except ValueError:      # the pool page is closed
            return None

    def sweep(self) -> None:
        """Let go of the channels whose web thread closed its end. A call still marked sent
        there lost its caller mid-call: it stays counted until the process says it is between
        calls or is stopped (see orphans_done)."""
        with self.lock:
            if not self.channels:
                return
            poller = select.poll()
            by_fd = {}
            for channel in self.channels:
                by_fd[channel.sock.fileno()] = channel
                poller.register(channel.sock.fileno(), HANGUP)
            for fd, events in poller.poll(0):
                if events & HANGUP:
                    self._drop(by_fd[fd], CLOSED_LINE_REST_S)

    def _drop(self, channel: _Channel, rest: float) -> None:
        """Lock held."""
        unread = _peek(channel.sock)
        if unread:
            now = time.monotonic()
            self.closed_unread = [item for item in self.closed_unread
                                  if item[0] > now - CLOSED_UNREAD_KEPT_S]
            self.closed_unread.append((now, unread))
        line = self._line(channel)
        if line is not None:
            self.retired_sent += line.sent
            self.last_answer = max(self.last_answer, line.answered_at)
            if line.adopted and line.sent > line.answered:
                self.orphans[line.call_id] = Call(line.call_id, line.sent_at, line.timeout)
        if channel.line is not None and self.page is not None:
            try:
                self.page.retire(channel.line, rest)
            except ValueError:
                pass
        channel.sock.close()
        self.channels.remove(channel)

    # -- whether a call was taken -----------------------------------------------------------

    def started(self, call_id: str) -> bool:
        """Whether the process took `call_id` off its channel: the call is not among the bytes
        still unread in any of them (a process takes a call off its channel only to run it,
        or to answer that it is past its queue time)."""
        with self.lock:
            unread = self.unread_at_death if self.closed else self._unread()
            unread = [*unread, *(data for _, data in self.closed_unread)]
        needle = call_id.encode("utf-8", "replace")
        return not any(needle in data for data in unread)

    def _unread(self) -> list[bytes]:
        """Lock held."""
        socks = [channel.sock for channel in self.channels]
        if self.request is not None:
            socks.append(self.request)
        return [data for data in map(_peek, socks) if data]

    def close(self) -> None:
        """The process is gone: remember what it never read, and close the worker's copies of
        its channels (only then do its web threads see them end)."""
        with self.lock:
            if self.closed:
                return
            self.unread_at_death = self._unread()
            self.closed = True
            for channel in list(self.channels):
                self._drop(channel, DEAD_LINE_REST_S)
            self.orphans.clear()
            if self.request is not None:
                self.request.close()


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:     # nothing there (BlockingIOError), or the socket is gone
        return b""

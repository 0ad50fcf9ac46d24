"""The control plane's side of the worker transport: persistent connections (TCP, or a Unix
socket to a local worker) carrying length-prefixed JSON frames (the same frames the worker
speaks to its children), pooled per worker address and per process, so a call costs no
connection set-up and no HTTP parsing."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from ...common.protocol import Frame, Status
from ...common.frames import FrameSocket, encode_frame
from .liveness import DEFAULT_CALLS_IN_FLIGHT, Liveness, WorkerView

# A frame the worker does not take within this long means the worker is stuck.
SEND_TIMEOUT_S = 30
# A call frame the worker has not acknowledged within this long never started: it goes to
# another worker. The worker takes a frame only within TAKE_WITHIN_S of its arrival (by its
# own clock), so that one it reads later (it was frozen) is refused, never run.
ACK_WAIT_S = 0.6
TAKE_WITHIN_S = 0.4
# A large call frame may take this long per byte to send on a slow link (while the worker
# answers its pings).
SEND_BYTES_PER_S = 1 << 20
# A call waits in slices this long, looking at its worker's liveness between them.
WAIT_SLICE_S = 0.1
# A call acknowledged by a worker that turned suspect is given up on this long after its own
# deadline (its start-by plus its timeout).
SUSPECT_GRACE_S = 0.7
# A lost host (no RST) shows on every worker connection within a few seconds.
KEEPALIVE_IDLE_S = 1
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 3000

# A worker address naming a Unix socket (the same prefix the worker advertises).
UNIX_PREFIX = "unix:"


# The error of a call whose worker went away while it ran.
WORKER_DIED = {"type": "WorkerDied", "message": "the worker running this call went away "
                                                "mid-call", "may_have_run": True}
# The error of an acknowledged call whose worker stopped answering (frozen, or its host gone).
WORKER_SILENT = {"type": "WorkerDied", "message": "the worker that took this call stopped "
                                                  "answering; the call may have run",
                 "may_have_run": True}


class WorkerGone(Exception):
    """The worker closed the connection or could not be reached."""


class NotAdmitted(WorkerGone):
    """The worker accepted the connection, then closed or refused it before its hello was
    answered (its gate made way for others, or it was stopping): the worker is there, and
    this connection alone failed; nothing was sent on it."""


def _dial(address: str, timeout: float) -> socket.socket:
    """A connected socket to a worker: "unix:/path" is a Unix socket (a local worker),
    anything else HOST:PORT over TCP."""
    if address.startswith(UNIX_PREFIX):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address[len(UNIX_PREFIX):])
        except BaseException:
            sock.close()
            raise
        return sock
    host, _, port = address.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise OSError(f"not HOST:PORT or unix:PATH: {address!r}") from None
    sock = socket.create_connection((host.strip("[]"), port_number), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keep_alive(sock)
    return sock


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalive and a user timeout on a worker connection: a peer whose host vanished
    (no RST ever comes) fails the connection within seconds instead of never."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    except (OSError, AttributeError):
        pass    # not Linux: keepalive as the system has it


class WorkerConnections:
    def __init__(self, token: str, raw_results: bool = False,
                 calls_in_flight: int = DEFAULT_CALLS_IN_FLIGHT):
        """`raw_results`: a reply's result comes back as the bytes the function process encoded
        (RawJSON, see common/frames.py) instead of parsed. `calls_in_flight`: this process's
        cap on calls in flight per worker."""
        self.token = token
        self.raw_results = raw_results
        self._idle: dict[str, list[FrameSocket]] = {}
        self._lock = threading.Lock()
        self.liveness = Liveness(self, calls_in_flight)
        # A forked copy must not send down its parent's connections.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._idle = {}
        self._lock = threading.Lock()

    def dial(self, address: str, timeout: float) -> FrameSocket:
        """A new connection to a worker, its hello answered within `timeout`."""
        return self._connect(address, timeout, timeout)

    def _connect(self, address: str, timeout: float,
                 hello_timeout: float | None = None) -> FrameSocket:
        try:
            sock = _dial(address, min(timeout, 5.0) if hello_timeout is None else hello_timeout)
        except OSError as exc:
            raise WorkerGone(f"cannot reach worker at {address}: {exc}") from exc
        conn = FrameSocket(sock, raw_results=self.raw_results)
        try:
            conn.send({"type": Frame.HELLO, "token": self.token})
            reply = conn.recv()
        except TimeoutError as exc:
            conn.close()    # accepted, never answered: the worker is stuck
            raise WorkerGone(f"worker at {address} did not answer the hello: {exc}") from exc
        except (OSError, ValueError) as exc:
            conn.close()
            raise NotAdmitted(f"worker at {address} refused the connection: {exc}") from exc
        if not reply or reply.get("type") != Frame.HELLO:
            conn.close()
            raise NotAdmitted(f"worker at {address} refused the connection: {reply}")
        # From here on the socket blocks and the kernel bounds each wait (SO_RCVTIMEO /
        # SO_SNDTIMEO): no poll before every read and write of a call.
        sock.settimeout(None)
        conn.set_send_timeout(SEND_TIMEOUT_S)
        return conn

    def _checkout(self, address: str, timeout: float) -> tuple[FrameSocket, bool]:
        """A connection to `address`, and whether it was pooled (it may have been closed by a
        worker that restarted since)."""
        with self._lock:
            idle = self._idle.get(address)
            while idle:
                conn = idle.pop()
                if address.startswith(UNIX_PREFIX):
                    # A send on a Unix socket whose peer is gone fails at once (EPIPE) and
                    # sends nothing: `request` dials again then, so no check here.
                    return conn, True
                # Over TCP the first send to a closed peer succeeds: a pooled connection that
                # is readable now was closed by the worker; never send a call down it.
                poller = select.poll()     # not select(): descriptors may be over 1024
                poller.register(conn.sock, select.POLLIN)
                if not poller.poll(0):
                    return conn, True
                conn.close()
        return self._connect(address, timeout), False

    def _checkin(self, address: str, conn: FrameSocket) -> None:
        with self._lock:
            self._idle.setdefault(address, []).append(conn)

    def request(self, address: str, frame: dict, timeout: float) -> dict:
        """Send one frame and wait for its reply. WorkerGone if the worker could not be
        reached (nothing ran) — `sent` in its args says whether the call may have started."""
        return self._exchange(address, frame, timeout, FrameSocket.recv)

    def request_fds(self, address: str, frame: dict, timeout: float) -> tuple[dict, list[int]]:
        """request() for a reply that brings descriptors (a Unix socket only): the reply and
        the descriptors, which the caller owns."""
        return self._exchange(address, frame, timeout, FrameSocket.recv_fds)

    def _exchange(self, address: str, frame: dict, timeout: float, receive):
        conn, pooled = self._checkout(address, timeout)
        while True:
            try:
                conn.set_recv_timeout(timeout)
                conn.send(frame)
                break
            except OSError as exc:
                conn.close()
                if not pooled:
                    raise WorkerGone(f"worker at {address} went away: {exc}", False) from exc
            # The worker closed this pooled connection (it restarted): dial it afresh, once.
            conn, pooled = self._connect(address, timeout), False
        view = self.liveness.view_at(address)
        if view is not None:
            # Waited in slices: a worker that turns suspect meanwhile holds no thread.
            conn.set_recv_timeout(WAIT_SLICE_S)
        end = time.monotonic() + timeout
        while True:
            try:
                answer = receive(conn)
                break
            except (TimeoutError, BlockingIOError) as exc:
                if view is not None and view.usable and time.monotonic() < end:
                    continue
                conn.close()
                raise WorkerGone(f"worker at {address} did not answer: {exc or 'timed out'}",
                                 True) from exc
            except (OSError, ValueError) as exc:
                conn.close()
                raise WorkerGone(f"worker at {address} went away mid-call: {exc}",
                                 True) from exc
        reply = answer[0] if isinstance(answer, tuple) else answer
        if reply is None:
            conn.close()
            raise WorkerGone(f"worker at {address} closed the connection mid-call", True)
        self._checkin(address, conn)
        return answer

    def call(self, view: WorkerView, frame: dict, start_within: float,
             timeout: float, grace: float) -> dict:
        """Relay one call frame, fenced: the worker must take it within TAKE_WITHIN_S of its
        arrival and start it within `start_within` (it answers `not_started` otherwise, and
        runs nothing). Unacknowledged within ACK_WAIT_S (or the connection closed before the
        acknowledgement): WorkerGone(message, False): it never ran and never will; the worker
        is suspect (or lost). Acknowledged, the reply is waited for until start_within + timeout + `grace`
        (SUSPECT_GRACE_S instead of `grace` once the worker is suspect): past that, or if the
        connection breaks, WorkerGone(message, True): it may have run."""
        address = view.address
        conn, pooled = self._checkout(address, ACK_WAIT_S)
        sent = time.monotonic()
        frame = dict(frame, take_within=TAKE_WITHIN_S, start_within=start_within)
        if address.startswith(UNIX_PREFIX):
            # The same host, so the same monotonic clock: absolute times, which hold even
            # for a frame the worker reads late (a Unix socket has no arrival timestamps).
            frame["take_by"] = sent + TAKE_WITHIN_S
            frame["start_by"] = sent + start_within
        while True:
            try:
                conn.set_recv_timeout(WAIT_SLICE_S)
                self._send_call(conn, encode_frame(frame), view, sent)
                break
            except TimeoutError as exc:
                conn.close()
                self.liveness.unacknowledged(view)
                raise WorkerGone(f"worker at {address} did not take the call's frame within "
                                 f"{ACK_WAIT_S:g}s", False) from exc
            except OSError as exc:
                conn.close()
                if not pooled:
                    self.liveness.closed(view, str(exc))
                    raise WorkerGone(f"worker at {address} went away: {exc}", False) from exc
            conn, pooled = self._connect(address, ACK_WAIT_S), False
        acked = False
        # The worker counts its take-by from the arrival of the frame's last bytes.
        ack_by = time.monotonic() + ACK_WAIT_S
        deadline = sent + start_within + timeout
        while True:
            try:
                reply = conn.recv()
            except TimeoutError:
                now = time.monotonic()
                if not acked:
                    # Never before ack_by, even once the worker is suspect: until its
                    # take-by (TAKE_WITHIN_S, sooner) has passed, a worker that is only slow
                    # could still take the call, and another worker would run it too.
                    if now >= ack_by:
                        conn.close()
                        if view.usable:
                            self.liveness.unacknowledged(view)
                        raise WorkerGone(f"worker at {address} did not take the call within "
                                         f"{now - sent:.2f}s", False) from None
                    continue
                limit = deadline + (grace if view.usable else SUSPECT_GRACE_S)
                if now >= limit:
                    conn.close()
                    raise WorkerGone(f"worker at {address} took the call and has not "
                                     f"answered {now - sent:.1f}s later", True,
                                     WORKER_SILENT) from None
                continue
            except (OSError, ValueError) as exc:
                conn.close()
                self.liveness.closed(view, f"the connection broke mid-call: {exc}")
                raise WorkerGone(f"worker at {address} went away mid-call: {exc}",
                                 acked) from exc
            if reply is None:
                conn.close()
                self.liveness.closed(view, "it closed the connection mid-call")
                raise WorkerGone(f"worker at {address} closed the connection mid-call", acked)
            if reply.get("type") == Frame.ACK and not acked:
                acked = True
                continue
            self._checkin(address, conn)
            if not acked and reply.get("status") not in (Status.NOT_STARTED,
                                                         Status.NOT_RUNNING):
                # A worker that answers without acknowledging (an older one): it ran it.
                acked = True
            return reply

    def _send_call(self, conn: FrameSocket, data: bytes, view: WorkerView,
                   sent: float) -> None:
        """Send a call frame: TimeoutError if the worker does not take its bytes within
        ACK_WAIT_S while it is suspect, or within the time a slow link needs for a large
        frame (SEND_BYTES_PER_S) while it answers its pings. A frame cut short never runs."""
        budget = sent + ACK_WAIT_S + len(data) / SEND_BYTES_PER_S
        conn.set_send_timeout(WAIT_SLICE_S)
        rest = memoryview(data)
        while rest:
            try:
                rest = rest[conn.sock.send(rest):]
            except BlockingIOError:     # SO_SNDTIMEO ran out on this send
                pass
            if rest:
                now = time.monotonic()
                if now >= budget or (not view.usable and now >= sent + ACK_WAIT_S):
                    raise TimeoutError(f"{len(rest)} of {len(data)} bytes not taken")

    def poke(self, address: str) -> None:
        """Tell a worker its desired set changed, so it reconciles now instead of on its next
        heartbeat. Best effort: a worker we cannot reach catches up on its heartbeat."""
        try:
            self.request(address, {"type": Frame.POKE}, timeout=0.5)
        except WorkerGone:
            pass

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()

"""The control plane's side of the worker transport: persistent connections (TCP, or a Unix
socket to a local worker) carrying length-prefixed JSON frames (the same frames the worker
speaks to its children), pooled per worker address and per process, so a call costs no
connection set-up and no HTTP parsing."""

from __future__ import annotations

import select
import socket
import threading

from ..common.protocol import Frame
from ..common.frames import FrameSocket

# A frame the worker does not take within this long means the worker is stuck.
SEND_TIMEOUT_S = 30

# A worker address naming a Unix socket (the same prefix the worker advertises).
UNIX_PREFIX = "unix:"


# The error of a call whose worker went away while it ran.
WORKER_DIED = {"type": "WorkerDied", "message": "the worker running this call went away "
                                                "mid-call"}


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
    return sock


class WorkerConnections:
    def __init__(self, token: str, raw_results: bool = False):
        """`raw_results`: a reply's result comes back as the bytes the function process encoded
        (RawJSON, see common/frames.py) instead of parsed."""
        self.token = token
        self.raw_results = raw_results
        self._idle: dict[str, list[FrameSocket]] = {}
        self._lock = threading.Lock()

    def _connect(self, address: str, timeout: float) -> FrameSocket:
        try:
            sock = _dial(address, min(timeout, 5.0))
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
        try:
            answer = receive(conn)
        except (OSError, ValueError) as exc:
            conn.close()
            raise WorkerGone(f"worker at {address} went away mid-call: {exc}", True) from exc
        reply = answer[0] if isinstance(answer, tuple) else answer
        if reply is None:
            conn.close()
            raise WorkerGone(f"worker at {address} closed the connection mid-call", True)
        self._checkin(address, conn)
        return answer

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

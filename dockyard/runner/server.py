"""The worker's invoke endpoint: a TCP or Unix-socket listener speaking the same length-prefixed
JSON frames as the pipes. The control plane keeps connections open, so a call costs one frame
each way.

Every connection must first present the worker token, and until it has, it gets little: no
thread (one gate thread reads every hello not whole yet), a hello of a few KB that must arrive
whole within a couple of seconds, and a fair share of the places for connections that have not
presented the token. Shares are per peer: the uid at the other end of a Unix socket
(SO_PEERCRED), or of a TCP connection from this host (the kernel's socket table, through
sock_diag), else the peer's address. A peer past its share loses its own oldest waiting
connection, never another peer's; past the cap for all peers, the peer holding the most loses
its oldest. So a function holding bare connections to the worker's port (anything on the host
can dial a loopback port) only ever crowds out itself: the control plane's connections, which
send their hello as soon as they are connected, are let in."""

from __future__ import annotations

import collections
import errno
import hmac
import ipaddress
import logging
import os
import select
import secrets
import socket
import socketserver
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

from ..common.protocol import Frame
from ..common.frames import FrameSocket, encode_frame, loads
from .fence import StampedFrameSocket, keep_alive, take

log = logging.getLogger("dockyard.server")

# A hello carries a token of a few dozen bytes.
HELLO_MAX_BYTES = 4096
# The whole hello must arrive within this long of the connection being accepted (the control
# plane sends it as soon as it is connected).
HANDSHAKE_TIMEOUT_S = 2.0
# Connections from one peer that have not presented the token yet; a new one past this closes
# that peer's oldest waiting connection (never another peer's).
MAX_UNAUTHENTICATED_PER_PEER = 16
# The same from all peers together; past this, the peer holding the most loses its oldest.
MAX_UNAUTHENTICATED = 128
# Connections closed to make way are logged at most this often (with a count).
REFUSAL_LOG_INTERVAL_S = 10.0

UNIX_PREFIX = "unix:"
# sockaddr_un.sun_path is 108 bytes on Linux, the last one for the terminating NUL.
UNIX_PATH_MAX = 107
_PEERCRED = struct.Struct("3i")
_HEADER = struct.Struct(">I")


def unix_path(address: tuple[str, int] | str) -> str | None:
    """The socket path when `address` names a Unix socket: "unix:/path", or ("unix:/path",
    port) as a HOST:PORT parser makes of "unix:/path:0" (the port is ignored)."""
    host = address if isinstance(address, str) else address[0]
    if isinstance(host, str) and host.startswith(UNIX_PREFIX):
        return host[len(UNIX_PREFIX):]
    return None


class InvokeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int] | str, token: str,
                 handle_frame: Callable[[dict], dict | None], *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED,
                 max_unauthenticated_per_peer: int = MAX_UNAUTHENTICATED_PER_PEER):
        self.token = token
        self.token_bytes = token.encode()
        self.handle_frame = handle_frame
        self.handshake_timeout = handshake_timeout
        self.max_unauthenticated = max(1, max_unauthenticated)
        self.max_unauthenticated_per_peer = max(1, min(max_unauthenticated_per_peer,
                                                       self.max_unauthenticated))
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        # Bytes that came after a hello, handed to the connection's thread with its socket.
        self._after_hello: dict[socket.socket, bytes] = {}
        self.unix_path = unix_path(address)
        self._socket_file: tuple[int, int] | None = None
        self._binding: str | None = None   # the name bound under until it listens
        if self.unix_path is not None:
            self.address_family = socket.AF_UNIX
            address = self.unix_path
        super().__init__(address, _Connection)
        self.gate = _Gate(self)

    @property
    def address(self) -> str:
        if self.unix_path is not None:
            return UNIX_PREFIX + self.unix_path
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    # -- the listening socket -------------------------------------------------------------

    def server_bind(self) -> None:
        if self.unix_path is None:
            super().server_bind()
            return
        _remove_stale_socket(self.unix_path)
        # Bound under a name of its own, and renamed onto the path once it listens (see
        # server_activate): whoever finds the file can connect (a bound socket that does not
        # listen yet refuses). A path too long for that is bound as it is.
        folder, base = os.path.split(self.unix_path)
        binding = os.path.join(folder, f".{base[:8]}.{secrets.token_hex(3)}")
        if len(os.fsencode(binding)) > UNIX_PATH_MAX:
            binding = self.unix_path
        self.socket.bind(binding)
        self._binding = binding
        # Connecting needs write permission on the file. Nobody can connect before listen(),
        # so the mode is 0600 before it matters, whatever the umask was.
        os.chmod(binding, 0o600)
        st = os.lstat(binding)
        self._socket_file = (st.st_dev, st.st_ino)
        self.server_address = self.unix_path

    def server_activate(self) -> None:
        super().server_activate()
        binding = self._binding
        if binding is not None and binding != self.unix_path:
            # A link, not a rename: a socket another worker put there meanwhile stays.
            try:
                os.link(binding, self.unix_path)
            except FileExistsError:
                raise OSError(errno.EADDRINUSE,
                              f"another process listens on {self.unix_path}") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                    raise
                os.rename(binding, self.unix_path)     # a file system without hard links
            else:
                os.unlink(binding)
        self._binding = None

    def server_close(self) -> None:
        gate = getattr(self, "gate", None)     # none yet when binding failed
        if gate is not None:
            gate.close()
        super().server_close()
        if self._socket_file is None:
            return
        binding, self._binding = self._binding, None
        try:
            st = os.lstat(binding or self.unix_path)     # never listened: its own name
            # Only our own file: a worker started since may have bound a new one there.
            if (st.st_dev, st.st_ino) == self._socket_file:
                os.unlink(binding or self.unix_path)
        except OSError:
            pass
        self._socket_file = None

    # -- admission ------------------------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        """A connection just accepted waits at the gate for its hello (no thread of its own
        until it has presented the token)."""
        self.gate.add(request, client_address)

    def admit(self, sock: socket.socket, client_address, after_hello: bytes) -> None:
        """The gate found the token in this connection's hello: serve it in its own thread."""
        if after_hello:
            with self.lock:
                self._after_hello[sock] = after_hello
        try:
            socketserver.ThreadingMixIn.process_request(self, sock, client_address)
        except Exception:  # noqa: BLE001 - no thread to be had: this connection only
            log.exception("could not start serving the connection from %s", client_address)
            with self.lock:
                self._after_hello.pop(sock, None)
            self.shutdown_request(sock)

    def after_hello(self, sock: socket.socket) -> bytes:
        with self.lock:
            return self._after_hello.pop(sock, b"")

    def identify(self, sock: socket.socket, client_address,
                 look_up: bool = True) -> tuple[Hashable, str]:
        """Who is on the other end: the key its share of the gate is counted under, and how
        log lines name it (address and port; for a Unix socket the peer's pid and uid).
        `look_up`: find the uid of a TCP peer on this host (the gate thread only)."""
        if self.unix_path is not None:
            try:
                pid, uid, _ = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError:
                return ("unix", None), self.address
            return ("uid", uid), f"pid {pid} (uid {uid}) on {self.address}"
        host, port = client_address[0], client_address[1]
        return (host, self.gate.local_uid(sock) if look_up else None), f"{host}:{port}"

    def peer(self, sock: socket.socket, client_address) -> str:
        """How a log line names the other end of a connection."""
        return self.identify(sock, client_address, look_up=False)[1]

    def handle_error(self, request, client_address) -> None:
        log.exception("the connection from %s failed", self.peer(request, client_address))

    def close_connections(self) -> None:
        """End every connection: those being served and those still at the gate."""
        self.gate.close()
        with self.lock:
            for sock in list(self.connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a worker that did not shut down; refuse to touch anything
    else, or a socket someone still listens on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process listens on {path}")


@dataclass(eq=False)
class _Waiting:
    """A connection at the gate: accepted, its hello not whole yet."""

    sock: socket.socket
    fd: int
    address: object
    peer: Hashable
    label: str
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)


class _Gate:
    """Every connection that has not presented the token yet, read by one thread with poll():
    none holds a thread, each at most a hello's bytes, until its deadline. Shares of the
    places are per peer (see the module's docstring)."""

    def __init__(self, server: InvokeServer):
        self.server = server
        self.inbox: collections.deque = collections.deque()
        self.waiting: dict[int, _Waiting] = {}
        self.by_peer: dict[Hashable, collections.deque] = {}
        self.poller = select.poll()     # not select(): descriptors may be over 1024
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.wake_write.setblocking(False)
        self.poller.register(self.wake_read, select.POLLIN)
        self.diag: socket.socket | None = None
        self.closed = False
        self._made_way = 0
        self._next_made_way_log = 0.0
        self.thread = threading.Thread(target=self._run, name="invoke-gate", daemon=True)
        self.thread.start()

    # -- from other threads ---------------------------------------------------------------

    def add(self, sock: socket.socket, client_address) -> None:
        if self.closed:
            self.server.shutdown_request(sock)
            return
        self.inbox.append((sock, client_address, time.monotonic()))
        self._wake()

    def close(self) -> None:
        """Stop the gate thread and close every connection still at the gate."""
        if self.closed:
            return
        self.closed = True
        self._wake()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)
        for entry in list(self.waiting.values()):
            self._forget(entry)
            entry.sock.close()
        while self.inbox:
            self.inbox.popleft()[0].close()
        if self.diag is not None:
            self.diag.close()
        self.wake_read.close()
        self.wake_write.close()

    def _wake(self) -> None:
        try:
            self.wake_write.send(b"\0")
        except OSError:
            pass    # a wake-up is pending already (or the gate is closed)

    # -- the gate thread ------------------------------------------------------------------

    def _run(self) -> None:
        wake = self.wake_read.fileno()
        while not self.closed:
            try:
                events = self.poller.poll(self._wait_ms())
            except InterruptedError:
                continue
            try:
                for fd, _ in events:
                    if fd == wake:
                        self._drain_wake()
                        continue
                    entry = self.waiting.get(fd)
                    if entry is not None:
                        self._read(entry)
                # Hellos already here are read before new connections are let in, so that
                # none of them is closed to make way.
                while self.inbox and not self.closed:
                    self._admit(*self.inbox.popleft())
                self._expire()
            except Exception:  # noqa: BLE001 - the gate must outlive any one connection
                log.exception("the invoke port's gate failed")

    def _wait_ms(self) -> int:
        if not self.waiting:
            return -1
        first = min(entry.deadline for entry in self.waiting.values())
        return max(0, int((first - time.monotonic()) * 1000) + 1)

    def _drain_wake(self) -> None:
        try:
            while self.wake_read.recv(4096):
                pass
        except OSError:
            pass

    def _admit(self, sock: socket.socket, client_address, accepted: float) -> None:
        server = self.server
        try:
            sock.setblocking(False)
            peer, label = server.identify(sock, client_address)
        except OSError:
            server.shutdown_request(sock)
            return
        entry = _Waiting(sock, sock.fileno(), client_address, peer, label,
                         accepted + server.handshake_timeout)
        # The control plane sends its hello as soon as it is connected: often it is here.
        if self._read(entry):
            return
        share = self.by_peer.get(peer)
        while share and len(share) >= server.max_unauthenticated_per_peer:
            self._make_way(share[0], f"it had {len(share)} connections that have not "
                                     "presented the worker token yet (its share)")
        if len(self.waiting) >= server.max_unauthenticated:
            most = max(self.by_peer.values(), key=len)
            self._make_way(most[0], f"{len(self.waiting)} connections from all peers had not "
                                    "presented the worker token yet (the limit), the most "
                                    "of them from its peer")
        self.waiting[entry.fd] = entry
        self.by_peer.setdefault(peer, collections.deque()).append(entry)
        self.poller.register(sock, select.POLLIN)

    def _make_way(self, entry: _Waiting, why: str) -> None:
        """Close a waiting connection for a new one, unless its hello has just come whole."""
        if self._read(entry):
            return
        self._forget(entry)
        self.server.shutdown_request(entry.sock)
        now = time.monotonic()
        self._made_way += 1
        if now < self._next_made_way_log:
            return
        count, self._made_way = self._made_way, 0
        self._next_made_way_log = now + REFUSAL_LOG_INTERVAL_S
        uid = entry.peer[1] if isinstance(entry.peer, tuple) and \
            self.server.unix_path is None else None
        log.warning("closed a waiting connection from %s to make way for a new one: %s; %d "
                    "closed so since the last such line", entry.label + (
                        f" (uid {uid})" if uid is not None else ""), why, count)

    def _expire(self) -> None:
        now = time.monotonic()
        for entry in [e for e in self.waiting.values() if e.deadline <= now]:
            self._refuse(entry, f"no whole hello within {self.server.handshake_timeout:g}s",
                         "no hello in time")

    def _read(self, entry: _Waiting) -> bool:
        """Read what has come of the hello (never blocks); True once the connection is
        settled: let in, or refused."""
        room = 4 + HELLO_MAX_BYTES - len(entry.buffer)
        try:
            chunk = entry.sock.recv(room if room > 0 else 1)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._refuse(entry, f"the connection failed before its hello: {exc}")
            return True
        if not chunk:
            if entry.buffer:
                self._refuse(entry, "bad hello: stream ended inside a frame", "bad hello")
            else:
                self._refuse(entry, "closed before sending a hello")
            return True
        entry.buffer += chunk
        return self._check(entry)

    def _check(self, entry: _Waiting) -> bool:
        buffer = entry.buffer
        if len(buffer) < 4:
            return False
        (size,) = _HEADER.unpack_from(buffer)
        if size > HELLO_MAX_BYTES:
            self._refuse(entry, f"bad hello: frame of {size} bytes is over the "
                                f"{HELLO_MAX_BYTES} byte limit", "bad hello")
            return True
        if len(buffer) < 4 + size:
            return False
        try:
            hello = loads(bytes(buffer[4:4 + size]))
        except (ValueError, RecursionError):
            self._refuse(entry, "bad hello: not JSON", "bad hello")
            return True
        token = hello.get("token") if isinstance(hello, dict) else None
        if not isinstance(token, str):
            self._refuse(entry, "bad hello: no token", "wrong worker token")
            return True
        if not hmac.compare_digest(token.encode("utf-8", "replace"), self.server.token_bytes):
            self._refuse(entry, "wrong worker token", "wrong worker token")
            return True
        self._forget(entry)
        try:
            entry.sock.setblocking(True)
        except OSError:
            self.server.shutdown_request(entry.sock)
            return True
        self.server.admit(entry.sock, entry.address, bytes(buffer[4 + size:]))
        return True

    def _refuse(self, entry: _Waiting, why: str, reply: str | None = None) -> None:
        """One warning line; for a hello that was wrong or late, an error frame that says
        so (a few dozen bytes: the socket's buffer takes it at once); then close."""
        self._forget(entry)
        log.warning("refused a connection from %s: %s", entry.label, why)
        if reply:
            try:
                entry.sock.send(encode_frame({"type": Frame.ERROR, "error": {
                    "type": "Unauthorized", "message": reply}}))
            except OSError:
                pass
        self.server.shutdown_request(entry.sock)

    def _forget(self, entry: _Waiting) -> None:
        if self.waiting.pop(entry.fd, None) is not None:
            try:
                self.poller.unregister(entry.fd)
            except (KeyError, ValueError, OSError):
                pass
        share = self.by_peer.get(entry.peer)
        if share is not None:
            try:
                share.remove(entry)
            except ValueError:
                pass
            if not share:
                del self.by_peer[entry.peer]

    # -- who is on the other end ----------------------------------------------------------

    def local_uid(self, sock: socket.socket) -> int | None:
        """The uid owning the other end of a TCP connection when that end is on this host
        (in this network namespace), as `ss -e` shows it: sock_diag's lookup of the one
        socket by its addresses. None for a peer elsewhere, or where the lookup fails."""
        try:
            if self.diag is None:
                self.diag = socket.socket(socket.AF_NETLINK,
                                          socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                          _NETLINK_SOCK_DIAG)
                self.diag.settimeout(0.5)
            request = _diag_request(sock)
            if request is None:
                return None
            self.diag.sendto(request, (0, 0))
            answer = self.diag.recv(8192)
        except OSError:
            return None
        if len(answer) < _DIAG_UID_AT + 4:
            return None
        _, kind, _, _, _ = _NLMSG.unpack_from(answer)
        if kind != _SOCK_DIAG_BY_FAMILY:
            return None     # NLMSG_ERROR: no such socket here (a peer on another host)
        return struct.unpack_from("=I", answer, _DIAG_UID_AT)[0]


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one request for one socket.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG = struct.Struct("=IHHII")                    # len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI")                 # family, protocol, ext, pad, states
_NO_COOKIE = struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)    # interface, cookie
# inet_diag_msg: family, state, timer, retrans; the socket id (48 bytes); expires, rqueue,
# wqueue; then the uid.
_DIAG_UID_AT = _NLMSG.size + 4 + 48 + 12


def _diag_request(sock: socket.socket) -> bytes | None:
    """The sock_diag request for the socket at the other end of `sock` (its local address
    is our peer's, its remote address ours)."""
    peer, local = sock.getpeername(), sock.getsockname()
    family = sock.family
    peer_ip, local_ip = ipaddress.ip_address(peer[0]), ipaddress.ip_address(local[0])
    if family == socket.AF_INET6 and peer_ip.ipv4_mapped is not None:
        # An IPv4 peer of a dual-stack listener: its own socket is an IPv4 one.
        family, peer_ip = socket.AF_INET, peer_ip.ipv4_mapped
        local_ip = local_ip.ipv4_mapped or local_ip
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    body = (_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + struct.pack(">HH", peer[1], local[1])
            + peer_ip.packed.ljust(16, b"\0") + local_ip.packed.ljust(16, b"\0")
            + _NO_COOKIE)
    return _NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1,
                       0) + body


class _Connection(socketserver.BaseRequestHandler):
    """A connection whose hello carried the token (see _Gate): calls, one frame each way."""

    server: InvokeServer

    def handle(self) -> None:
        sock = self.request
        server = self.server
        conn = StampedFrameSocket(sock, stamped=server.unix_path is None)
        conn.buffer += server.after_hello(sock)
        with server.lock:
            server.connections.add(sock)
        try:
            if server.unix_path is None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                keep_alive(sock)
            conn.send({"type": Frame.HELLO})
            while True:
                conn.arrived = None
                frame = conn.recv()
                if frame is None:
                    return
                if not isinstance(frame, dict):
                    conn.send({"type": Frame.ERROR, "error": {
                        "type": "BadFrame", "message": "a frame must be an object"}})
                    continue
                kind = frame.get("type")
                if kind == Frame.PING:
                    # Liveness: answered here, never behind a call or the agent's work.
                    conn.send({"type": Frame.PING})
                    continue
                if kind == Frame.INVOKE and "take_within" in frame:
                    refusal = take(frame, conn.arrived, unix=server.unix_path is not None)
                    if refusal is not None:
                        conn.send(refusal)
                        continue
                    # Taken: from here on the control plane counts it as possibly run.
                    conn.send({"type": Frame.ACK, "id": frame.get("id")})
                reply = server.handle_frame(frame)
                if reply is not None and "_fds" in reply:
                    # Descriptors go with the reply (a Unix socket only); our copies of
                    # what was made for the caller are closed once sent.
                    fds, close = reply.pop("_fds"), reply.pop("_close", ())
                    try:
                        conn.send_fds(reply, fds)
                    finally:
                        for item in close:
                            item.close()
                    continue
                conn.send(reply if reply is not None else {"type": Frame.OK})
        except (OSError, ValueError) as exc:
            log.debug("connection from %s ended: %s", self.client_address, exc)
        finally:
            with server.lock:
                server.connections.discard(sock)
            conn.close()

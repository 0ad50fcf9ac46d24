"""The worker's invoke endpoint: a TCP or Unix-socket listener speaking the same length-prefixed
JSON frames as the pipes. The control plane keeps connections open, so a call costs one frame
each way. Every connection must first present the worker token, and until it has, it gets
little: a hello of a few KB that must arrive whole within a few seconds, and only a few such
connections at once (anything on the host can dial a loopback port)."""

from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from typing import Callable

from ..common.protocol import Frame
from ..common.frames import FrameError, FrameSocket

log = logging.getLogger("dockyard.server")

# A hello carries a token of a few dozen bytes.
HELLO_MAX_BYTES = 4096
# The whole hello must arrive within this long of the connection being accepted.
HANDSHAKE_TIMEOUT_S = 5.0
# Connections that have not presented the token yet; beyond this, new ones are closed at once.
MAX_UNAUTHENTICATED = 16
# Connections closed for the cap are logged at most this often (with a count).
REFUSAL_LOG_INTERVAL_S = 10.0

UNIX_PREFIX = "unix:"
# sockaddr_un.sun_path is 108 bytes on Linux, the last one for the terminating NUL.
UNIX_PATH_MAX = 107
_PEERCRED = struct.Struct("3i")


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
                 max_unauthenticated: int = MAX_UNAUTHENTICATED):
        self.token = token
        self.token_bytes = token.encode()
        self.handle_frame = handle_frame
        self.handshake_timeout = handshake_timeout
        self.max_unauthenticated = max_unauthenticated
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.unauthenticated = 0
        self._refused_unlogged = 0
        self._next_refusal_log = 0.0
        self.unix_path = unix_path(address)
        self._socket_file: tuple[int, int] | None = None
        if self.unix_path is not None:
            self.address_family = socket.AF_UNIX
            address = self.unix_path
        super().__init__(address, _Connection)

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
        self.socket.bind(self.unix_path)
        # Connecting needs write permission on the file. Nobody can connect before listen(),
        # so the mode is 0600 before it matters, whatever the umask was.
        os.chmod(self.unix_path, 0o600)
        st = os.lstat(self.unix_path)
        self._socket_file = (st.st_dev, st.st_ino)
        self.server_address = self.unix_path

    def server_close(self) -> None:
        super().server_close()
        if self._socket_file is None:
            return
        try:
            st = os.lstat(self.unix_path)
            # Only our own file: a worker started since may have bound a new one there.
            if (st.st_dev, st.st_ino) == self._socket_file:
                os.unlink(self.unix_path)
        except OSError:
            pass
        self._socket_file = None

    # -- admission ------------------------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        with self.lock:
            admitted = self.unauthenticated < self.max_unauthenticated
            if admitted:
                self.unauthenticated += 1
        if not admitted:
            self.shutdown_request(request)
            self._note_refusal(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.authenticated_or_gone()
            raise

    def authenticated_or_gone(self) -> None:
        """A connection stopped counting against the unauthenticated cap."""
        with self.lock:
            self.unauthenticated -= 1

    def _note_refusal(self, request, client_address) -> None:
        now = time.monotonic()
        with self.lock:
            self._refused_unlogged += 1
            if now < self._next_refusal_log:
                return
            count, self._refused_unlogged = self._refused_unlogged, 0
            self._next_refusal_log = now + REFUSAL_LOG_INTERVAL_S
        log.warning("closed a new connection from %s at once: %d connections have not "
                    "presented the worker token yet (the limit); %d closed so since the last "
                    "such line", self.peer(request, client_address), self.max_unauthenticated,
                    count)

    def peer(self, sock: socket.socket, client_address) -> str:
        """Who is on the other end, for a log line: address and port, or for a Unix socket
        the peer's pid and uid."""
        if self.unix_path is None:
            return f"{client_address[0]}:{client_address[1]}"
        try:
            pid, uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            return self.address
        return f"pid {pid} (uid {uid}) on {self.address}"

    def handle_error(self, request, client_address) -> None:
        log.exception("the connection from %s failed", self.peer(request, client_address))

    def close_connections(self) -> None:
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


class _Refused(Exception):
    """The hello was not accepted; the message says why, for the one log line."""

    def __init__(self, why: str, reply: str | None = None):
        super().__init__(why)
        self.reply = reply


class _Connection(socketserver.BaseRequestHandler):
    server: InvokeServer

    def handle(self) -> None:
        sock = self.request
        server = self.server
        conn = FrameSocket(sock)
        with server.lock:
            server.connections.add(sock)
        try:
            if not self._authenticate(conn):
                return
            if server.unix_path is None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.send({"type": Frame.HELLO})
            while True:
                frame = conn.recv()
                if frame is None:
                    return
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

    def _authenticate(self, conn: FrameSocket) -> bool:
        """Read the hello within the handshake limits and check its token. Either way the
        connection stops counting as unauthenticated; a refusal is one warning line."""
        try:
            self._check_hello(conn)
        except _Refused as refused:
            log.warning("refused a connection from %s: %s",
                        self.server.peer(conn.sock, self.client_address), refused)
            if refused.reply:
                self._reply_refusal(conn, refused.reply)
            return False
        finally:
            self.server.authenticated_or_gone()
        # Back to a blocking socket with no receive timeout: calls are read with no poll.
        conn.sock.settimeout(None)
        return True

    def _check_hello(self, conn: FrameSocket) -> None:
        server = self.server
        deadline = time.monotonic() + server.handshake_timeout
        try:
            hello = conn.recv_by(deadline, HELLO_MAX_BYTES)
        except TimeoutError:
            raise _Refused(f"no whole hello within {server.handshake_timeout:g}s",
                           "no hello in time") from None
        except FrameError as exc:
            raise _Refused(f"bad hello: {exc}", "bad hello") from None
        except (ValueError, RecursionError):
            raise _Refused("bad hello: not JSON", "bad hello") from None
        except OSError as exc:
            raise _Refused(f"the connection failed before its hello: {exc}") from None
        if hello is None:
            raise _Refused("closed before sending a hello")
        token = hello.get("token") if isinstance(hello, dict) else None
        if not isinstance(token, str):
            raise _Refused("bad hello: no token", "wrong worker token")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), server.token_bytes):
            raise _Refused("wrong worker token", "wrong worker token")

    @staticmethod
    def _reply_refusal(conn: FrameSocket, message: str) -> None:
        try:
            conn.sock.settimeout(1.0)
            conn.send({"type": Frame.ERROR,
                       "error": {"type": "Unauthorized", "message": message}})
        except OSError:
            pass

"""The worker's invoke endpoint: a TCP listener speaking the same length-prefixed JSON frames
as the pipes. The control plane keeps connections open, so a call costs one frame each way.
Every connection must first present the worker token."""

from __future__ import annotations

import hmac
import logging
import socket
import socketserver
import threading
from typing import Callable

from ..common.frames import FrameSocket

log = logging.getLogger("dockyard.server")


class InvokeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], token: str,
                 handle_frame: Callable[[dict], dict | None]):
        self.token = token
        self.handle_frame = handle_frame
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(address, _Connection)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def close_connections(self) -> None:
        with self.lock:
            for sock in list(self.connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Connection(socketserver.BaseRequestHandler):
    server: InvokeServer

    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = FrameSocket(sock)
        with self.server.lock:
            self.server.connections.add(sock)
        try:
            hello = conn.recv()
            token = (hello or {}).get("token") or ""
            if not hmac.compare_digest(token.encode(), self.server.token.encode()):
                conn.send({"type": "error", "error": {"type": "Unauthorized",
                                                      "message": "wrong worker token"}})
                return
            conn.send({"type": "hello"})
            while True:
                frame = conn.recv()
                if frame is None:
                    return
                reply = self.server.handle_frame(frame)
                conn.send(reply if reply is not None else {"type": "ok"})
        except (OSError, ValueError) as exc:
            log.debug("connection from %s ended: %s", self.client_address, exc)
        finally:
            with self.server.lock:
                self.server.connections.discard(sock)
            conn.close()

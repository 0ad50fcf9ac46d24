"""Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of UTF-8
JSON. Spoken on the pipes to every child and on the worker's TCP endpoint; a hot path, so one
write per frame."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time

MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class FrameError(ValueError):
    pass


def encode_frame(obj) -> bytes:
    body = _dumps(obj).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes is over the {MAX_FRAME} byte limit")
    return _HEADER.pack(len(body)) + body


def _read_exact(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def read_frame(stream):
    """The next frame's object, or None at a clean end of stream."""
    header = _read_exact(stream, 4)
    if not header:
        return None
    if len(header) < 4:
        raise FrameError("stream ended inside a frame header")
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME} byte limit")
    body = _read_exact(stream, size)
    if len(body) < size:
        raise FrameError("stream ended inside a frame")
    return json.loads(body)


def write_frame(stream, obj) -> None:
    stream.write(encode_frame(obj))
    stream.flush()


class FrameReader:
    """Frames from a raw fd with an optional deadline (select + os.read into one buffer), so
    the thread that sent a request can read its reply itself."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()

    def read(self, deadline: float | None):
        """The next frame; None at end of stream; TimeoutError past `deadline` (monotonic)."""
        buffer = self.buffer
        while True:
            if len(buffer) >= 4:
                (size,) = _HEADER.unpack_from(buffer)
                if size > MAX_FRAME:
                    raise FrameError(f"frame of {size} bytes is over the limit")
                if len(buffer) >= 4 + size:
                    body = bytes(buffer[4:4 + size])
                    del buffer[:4 + size]
                    return json.loads(body)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                    raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                if buffer:
                    raise FrameError("stream ended inside a frame")
                return None
            buffer += chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FrameSocket:
    """Frames over a connected socket: buffered reads, one sendall per frame."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = sock.makefile("rb")

    def send(self, obj) -> None:
        self.sock.sendall(encode_frame(obj))

    def recv(self):
        return read_frame(self._reader)

    def close(self) -> None:
        for closer in (self._reader.close, self.sock.close):
            try:
                closer()
            except OSError:
                pass

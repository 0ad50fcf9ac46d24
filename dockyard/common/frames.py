"""Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of UTF-8
JSON. Spoken on the pipes to every child and on the worker's TCP endpoint; a hot path, so one
write per frame."""

from __future__ import annotations

import json
import socket
import struct

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

"""Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of UTF-8
JSON. Spoken on the pipes to every child and on the worker's invoke endpoint; a hot path, so
one write per frame.

A frame with a `result` (a call's reply) puts it last and says its size first:
`{"result_bytes":N,…,"result":<N bytes>}`. It is still one JSON object for whoever parses it
whole; a reader made with `raw_results` parses only the rest and keeps the result as the bytes
the function process encoded (RawJSON), so a web process passes a reply on without parsing or
encoding it again (a 15 MB result parsed is hundreds of MB of Python objects)."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import time

try:
    import orjson
except ImportError:  # pragma: no cover - a declared dependency; the stdlib still works
    orjson = None

MAX_FRAME = 64 * 1024 * 1024
MAX_FDS = 253       # SCM_MAX_FD: the most descriptors one message can carry
_HEADER = struct.Struct(">I")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# orjson reads an integer beyond 64 bits as a float (2**70 would come back 1.1805916207174113e+21):
# text with a run of 19 digits or more (no float's repr has one) is left to the standard
# library, which keeps integers of any size exact.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")
_RESULT_HEAD = b'{"result_bytes":'
_RESULT_KEY = b',"result":'


class RawJSON:
    """A JSON value kept as the UTF-8 bytes it was encoded to (a reply's result), passed on as
    is; `value()` parses it for whoever needs the object."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def value(self):
        return loads(self.data)

    def __repr__(self) -> str:
        return f"RawJSON({len(self.data)} bytes)"


def dumps(obj) -> bytes:
    """JSON as UTF-8 bytes: orjson on this per-call path (several times faster than the
    standard library), which takes over for what orjson refuses (integers over 64 bits,
    keys that are not strings; text with a lone surrogate, not Unicode, which becomes "?" so
    that the frame stays UTF-8)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj)
        except (TypeError, orjson.JSONEncodeError):
            pass
    return _dumps(obj).encode("utf-8", "replace")


def loads(data: bytes | bytearray | str):
    """The inverse of dumps(), accepting everything the standard library accepts (NaN,
    integers of any size, which stay exact)."""
    if orjson is not None:
        long_digits = _LONG_DIGITS_TEXT if isinstance(data, str) else _LONG_DIGITS
        if long_digits.search(data) is None:
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
    return _stdlib_loads(data)


def _stdlib_loads(data, **options):
    """json.loads, with nesting too deep for it (orjson stops at 1024 levels; the standard
    library recurses until Python's own limit) as the ValueError of a bad document."""
    try:
        return json.loads(data, **options)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: bytes | bytearray | str):
    """JSON from a caller (an event): strict, as RFC 8259 has it. NaN, Infinity and a lone
    surrogate are refused (ValueError), where loads() takes them; integers of any size stay
    exact."""
    if orjson is not None:
        long_digits = _LONG_DIGITS_TEXT if isinstance(data, str) else _LONG_DIGITS
        if long_digits.search(data) is None:
            return orjson.loads(data)   # strict already; its error is a ValueError
    value = _stdlib_loads(data, parse_constant=_refuse_constant)
    try:
        # Rare (integers past 64 bits): a lone surrogate escape survives json.loads.
        _dumps(value).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff)") from None
    return value


def result_bytes(result) -> bytes:
    """A reply's result as JSON bytes: as received when it was kept raw, else encoded."""
    return result.data if isinstance(result, RawJSON) else dumps(result)


def _body_parts(obj) -> list[bytes]:
    """The pieces of a frame's body: one, or for a frame with a result, the rest and then the
    result with its size first (see the module's docstring)."""
    if not isinstance(obj, dict) or "result" not in obj:
        return [dumps(obj)]
    result = result_bytes(obj["result"])
    rest = dumps({key: value for key, value in obj.items() if key != "result"})
    head = b"%s%d" % (_RESULT_HEAD, len(result))
    if len(rest) > 2:
        head += b"," + rest[1:-1]
    return [head, _RESULT_KEY, result, b"}"]


def split_result(body: bytes | bytearray, start: int = 0, end: int | None = None) -> dict:
    """A frame's body (body[start:end]) with its result kept raw: the rest is parsed, the
    result sliced out as RawJSON. A body without the result layout is parsed whole. The sizes
    are the sender's word: a body whose layout does not hold together is a FrameError."""
    end = len(body) if end is None else end
    if not body.startswith(_RESULT_HEAD, start, end):
        with memoryview(body) as view:
            return loads(bytes(view[start:end]))
    at = start + len(_RESULT_HEAD)
    digits_end = at
    while digits_end < end and digits_end - at < 12 and 48 <= body[digits_end] <= 57:
        digits_end += 1
    result_end = end - 1
    size = int(body[at:digits_end]) if digits_end > at else -1
    result_at = result_end - size
    key_at = result_at - len(_RESULT_KEY)
    if size < 0 or key_at < digits_end or body[result_end] != 0x7D or \
            body[key_at:result_at] != _RESULT_KEY or \
            (key_at > digits_end and body[digits_end] != 0x2C):
        raise FrameError("a reply frame whose result does not lie where its size says")
    with memoryview(body) as view:
        rest = loads(b"{" + bytes(view[digits_end + 1:key_at]) + b"}") \
            if key_at > digits_end else {}
        if not isinstance(rest, dict):
            raise FrameError("a reply frame that is not an object")
        rest["result"] = RawJSON(bytes(view[result_at:result_end]))
    return rest


class FrameError(ValueError):
    pass


class FrameCut(FrameError):
    """The stream ended inside a frame."""


def encode_frame(obj) -> bytes:
    parts = _body_parts(obj)
    size = sum(len(part) for part in parts)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME} byte limit")
    return b"".join([_HEADER.pack(size), *parts])


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
        raise FrameCut("stream ended inside a frame header")
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME} byte limit")
    body = _read_exact(stream, size)
    if len(body) < size:
        raise FrameCut("stream ended inside a frame")
    return loads(body)


def write_frame(stream, obj) -> None:
    stream.write(encode_frame(obj))
    stream.flush()


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class _Buffered:
    """Bytes read so far and the frames that can be cut from them; subclasses say how to
    read more (`_more`). With `raw_results`, a reply's result is kept as RawJSON."""

    def __init__(self, raw_results: bool = False):
        self.buffer = bytearray()
        self.raw_results = raw_results

    def _more(self) -> bytes:
        raise NotImplementedError

    def _next_frame(self, max_size: int = MAX_FRAME, more=None):
        """Cut the next frame from the buffer, reading more until one is whole. None at a
        clean end of stream; FrameError as soon as a header announces over `max_size`."""
        buffer = self.buffer
        more = more or self._more
        while True:
            if len(buffer) >= 4:
                (size,) = _HEADER.unpack_from(buffer)
                if size > max_size:
                    raise FrameError(f"frame of {size} bytes is over the {max_size} byte limit")
                if len(buffer) >= 4 + size:
                    frame = split_result(buffer, 4, 4 + size)
                    del buffer[:4 + size]
                    if not self.raw_results and isinstance(frame, dict) and \
                            isinstance(frame.get("result"), RawJSON):
                        frame["result"] = frame["result"].value()
                    return frame
            chunk = more()
            if not chunk:
                if buffer:
                    raise FrameCut("stream ended inside a frame")
                return None
            buffer += chunk


class FrameReader(_Buffered):
    """Frames from a raw fd with an optional deadline (poll + os.read into one buffer), so
    the thread that sent a request can read its reply itself."""

    def __init__(self, fd: int, max_frame: int = MAX_FRAME, raw_results: bool = False):
        super().__init__(raw_results)
        self.fd = fd
        self.max_frame = max_frame
        self._deadline: float | None = None
        # poll(), not select(): select() cannot watch a descriptor numbered 1024 or more,
        # which a worker holding many processes' pipes has.
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

    def read(self, deadline: float | None):
        """The next frame; None at end of stream; TimeoutError past `deadline` (monotonic)."""
        self._deadline = deadline
        return self._next_frame(self.max_frame)

    def _more(self) -> bytes:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0 or not self._poller.poll(max(1, int(remaining * 1000 + 0.999))):
                raise TimeoutError
        return os.read(self.fd, 1 << 16)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FrameSocket(_Buffered):
    """Frames over a connected socket: one sendall per frame, reads straight from the socket
    into one buffer (no file object in between: this is the per-call path). A blocking
    socket with kernel timeouts (SO_RCVTIMEO / SO_SNDTIMEO) costs no poll per read or write."""

    def __init__(self, sock: socket.socket, raw_results: bool = False):
        super().__init__(raw_results)
        self.sock = sock
        self._recv_timeout: float | None = None
        self._send_timeout: float | None = None
        self._deadline: float | None = None

    def send(self, obj) -> None:
        self.sock.sendall(encode_frame(obj))

    def send_by(self, obj, deadline: float) -> None:
        """One frame, whole by `deadline` (monotonic) or TimeoutError: a peer that reads a
        byte now and then cannot stretch it. The common case is one send()."""
        data = memoryview(encode_frame(obj))
        while data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:     # SO_SNDTIMEO ran out on this send
                sent = 0
            data = data[sent:]
            if data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the frame could not be sent in time")
                self.set_send_timeout(max(remaining, 0.001))   # 0 would mean no limit

    def recv_until(self, deadline: float, max_size: int = MAX_FRAME):
        """recv() with the whole frame due by `deadline` (monotonic): the first read waits
        under the receive timeout already set (no system call to change it); each further
        read only as long as is left."""
        first = True

        def more() -> bytes:
            nonlocal first
            if not first:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the frame did not arrive whole in time")
                self.set_recv_timeout(max(remaining, 0.001))   # 0 would mean no limit
            first = False
            return self._more()

        return self._next_frame(max_size, more)

    def send_fds(self, obj, fds: list[int]) -> None:
        """One frame with descriptors attached (a Unix socket only)."""
        data = encode_frame(obj)
        sent = socket.send_fds(self.sock, [data], fds)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def recv_fds(self, max_size: int = MAX_FRAME, max_fds: int = MAX_FDS):
        """The next frame and the descriptors sent with it (close-on-exec)."""
        fds: list[int] = []

        def more() -> bytes:
            data, ancillary, flags, _ = self.sock.recvmsg(
                1 << 16, socket.CMSG_SPACE(max_fds * 4), socket.MSG_CMSG_CLOEXEC)
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    count = len(raw) // 4
                    fds.extend(struct.unpack(f"{count}i", raw[:count * 4]))
            if flags & socket.MSG_CTRUNC:
                # Some did not fit (or this process is out of descriptors): the frame is no
                # use; those that came are closed below, once.
                raise FrameError("more descriptors than expected came with a frame")
            return data

        try:
            return self._next_frame(max_size, more), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            fds.clear()
            raise

    def recv(self, max_size: int = MAX_FRAME):
        """The next frame; None when the peer closed; TimeoutError past the receive timeout;
        FrameError for a frame announced over `max_size`."""
        return self._next_frame(max_size)

    def recv_by(self, deadline: float, max_size: int):
        """The next frame, which must be whole by `deadline` (monotonic) and at most
        `max_size` bytes: for a peer not trusted yet, which could otherwise hold a thread by
        trickling bytes. Waits with a socket timeout (a poll per read), which it leaves set:
        `sock.settimeout(None)` returns the socket to plain blocking reads."""
        self._deadline = deadline
        try:
            return self._next_frame(max_size)
        finally:
            self._deadline = None

    def _more(self) -> bytes:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the frame did not arrive whole in time")
            self.sock.settimeout(remaining)
        try:
            return self.sock.recv(1 << 16)
        except BlockingIOError:
            # SO_RCVTIMEO ran out on a blocking socket.
            raise TimeoutError(f"no reply within {self._recv_timeout:g}s") from None

    def set_recv_timeout(self, seconds: float) -> None:
        """Bound every read by `seconds` in the kernel; one syscall, and only when the value
        changes."""
        if seconds == self._recv_timeout:
            return
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self._recv_timeout = seconds

    def set_send_timeout(self, seconds: float) -> None:
        if seconds == self._send_timeout:
            return
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
        self._send_timeout = seconds

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

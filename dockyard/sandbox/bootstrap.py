"""The program inside every child: runs in the user's venv (standard library only, no
dockyard import), imports the declared functions, says ready, then serves length-prefixed JSON
frames: invoke requests on the request socket (or pipe), results on the reply pipe. A
one-at-a-time process also serves *direct channels*: sockets the worker hands over the request
socket (a `channel` frame with the descriptor attached), each connected to one web process; a
call that arrives on a channel is answered on that channel.

Usage: python -I -B bootstrap.py REQUEST_FD REPLY_FD
"""

import importlib
import inspect
import json
import logging
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback

LOAD_ERROR_EXIT = 3
# Frame types: copies of dockyard.common.protocol.Frame (this file cannot import dockyard);
# a test checks that they match.
INIT, READY, LOAD_ERROR, INVOKE, RESULT, SHUTDOWN, CHANNEL, SLOT = (
    "init", "ready", "load_error", "invoke", "result", "shutdown", "channel", "slot")
HEADER = struct.Struct(">I")
RESULT_KEY = b',"result":'
# Strict JSON, as every other parser reads it: no NaN or Infinity (allow_nan=False), and no
# lone surrogate (UTF-8 has none: the encoding to bytes refuses it). Made once: json.dumps with
# arguments builds a new encoder on every call, twice per call here.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_decode = json.JSONDecoder().decode
MAX_FRAME = 64 * 1024 * 1024
# The most a reply may hold (dockyard.runner.process.REPLY_MAX_BYTES; a test checks they
# match), and of it the result (the rest is room for the call's captured output).
REPLY_MAX_BYTES = 16 * 1024 * 1024
RESULT_MAX_BYTES = REPLY_MAX_BYTES - 1024 * 1024


def read_frame(stream):
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError("frame too large")
    body = stream.read(size)
    if len(body) < size:
        return None
    return _decode(body.decode("utf-8"))


class _Exact:
    """read(n) on a socket: exactly n bytes, or fewer only at its end (what read_frame needs,
    with nothing read past the frame)."""

    def __init__(self, sock):
        self.sock = sock

    def read(self, size):
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data


class Context:
    """What a handler gets as its second argument (the shape of Lambda's context)."""

    def __init__(self, invocation_id, container, version, function, deadline):
        self.invocation_id = invocation_id
        self.aws_request_id = invocation_id
        self.container = container
        self.version = version
        self.function = function
        self.function_name = function
        self.deadline = deadline
        self.logger = logging.getLogger(function)

    def remaining_ms(self):
        return max(0, int((self.deadline - time.time()) * 1000))

    get_remaining_time_in_millis = remaining_ms


# Where a cut falls within this many bytes of a line's end, it moves there: whole lines.
LINE_SLACK = 4096
MARKER_ROOM = 64     # the note that says how much was left out, at most


def _whole_characters(data):
    """`data` without a UTF-8 sequence cut short at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:    # a sequence's first byte: whole if its length fits
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= length else data[:-back]
    return data


def excerpt(fd, size, cap):
    """At most `cap` bytes of the file's `size`: all of it if it fits, else its start and its
    end, cut at line ends where one is near, with a line between that says how many bytes
    were left out."""
    if size <= cap:
        return os.pread(fd, size, 0)
    room = max(0, cap - MARKER_ROOM)
    first = os.pread(fd, room // 2, 0)
    last = os.pread(fd, room - len(first), size - (room - len(first)))
    end = first.rfind(b"\n", max(0, len(first) - LINE_SLACK))
    if end != -1:
        first = first[:end + 1]
    start = last.find(b"\n", 0, LINE_SLACK)
    if start != -1 and start + 1 < len(last):
        last = last[start + 1:]
    else:   # cut where no line ends near: at a character's start, never inside one
        last = last.lstrip(bytes(range(0x80, 0xC0)))
    if end == -1:
        first = _whole_characters(first)
    gap = b"" if not first or first.endswith(b"\n") else b"\n"
    return (first + gap + f"[... {size - len(first) - len(last)} bytes not kept ...]\n".encode()
            + last)


class Output:
    """The stdout/stderr files the worker opened for us: read back what one call wrote, then
    truncate (they are O_APPEND, so the next write starts at 0 again)."""

    def __init__(self, cap):
        self.cap = cap
        self.fds = [fd for fd in (1, 2) if self._regular(fd)]

    @staticmethod
    def _regular(fd):
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            return False

    def take(self):
        sys.stdout.flush()
        sys.stderr.flush()
        texts, truncated = {1: "", 2: ""}, False
        for fd in self.fds:
            size = os.fstat(fd).st_size
            if not size:
                continue
            data = excerpt(fd, size, self.cap)
            truncated = truncated or size > self.cap
            os.ftruncate(fd, 0)
            texts[fd] = data.decode("utf-8", "replace")
        return texts[1], texts[2], truncated


def peak_rss_kb():
    """The RSS high-water mark of this process and of its waited-for children (one syscall
    each: this runs on every call)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


class Child:
    def __init__(self, requests, replies, init):
        self.requests = requests
        self.replies = replies
        self.container = init.get("container", "")
        self.version = init.get("version", "")
        self.concurrency = max(1, int(init.get("concurrency", 1)))
        self.declared = dict(init.get("functions") or {})
        self.code_dir = init.get("code_dir") or "."
        self.output = Output(int(init.get("output_cap", 65536)))
        self.cpu_s = float(init.get("cpu_s") or 0)
        self.handlers = {}      # name -> (callable, wants_context, is_async)
        self.loop = None        # made on the first async handler: asyncio is slow to import
        self.loop_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.cold = True
        self.stopping = False
        self.in_flight = 0
        self.idle = threading.Condition()
        self.slot = None

    def load(self, name):
        if name in self.handlers:
            return self.handlers[name]
        if name in self.declared:
            obj, target = self._declared(self.declared[name]), self.declared[name]
        else:
            obj, target = self._own(name), name
        if not callable(obj):
            raise TypeError(f"{target} is not callable")
        try:
            params = list(inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                       p.POSITIONAL_OR_KEYWORD)]
        wants_context = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        is_async = inspect.iscoroutinefunction(obj)
        if is_async:
            self.event_loop()
        entry = (obj, wants_context, is_async)
        self.handlers[name] = entry
        return entry

    @staticmethod
    def _declared(target):
        """A function the manifest names: whatever its author pointed at."""
        module_name, _, attr = target.partition(":")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def _own(self, name):
        """A caller's "module:callable": only a callable defined in a module that is a file of
        the package's code. The file is looked for before anything is imported, so naming
        the standard library or the venv's packages imports nothing and runs nothing."""
        module_name, _, attr = name.partition(":")
        parts = module_name.split(".")
        if (not attr or not all(p.isidentifier() for p in parts) or not attr.isidentifier()
                or attr.startswith("__")):
            raise FunctionNotFound(NOT_DECLARED.format(name=name))
        code = os.path.realpath(self.code_dir)
        base = os.path.join(code, *parts)
        files = [base + ".py", os.path.join(base, "__init__.py")]
        if not any(_inside(f, code) and os.path.isfile(f) for f in files):
            raise FunctionNotFound(NOT_DECLARED.format(name=name))
        module = importlib.import_module(module_name)
        origin = getattr(module, "__file__", None)
        if not origin or not _inside(os.path.realpath(origin), code):
            raise FunctionNotFound(NOT_DECLARED.format(name=name))
        obj = module.__dict__.get(attr)
        if obj is None or getattr(obj, "__module__", None) != module.__name__:
            raise FunctionNotFound(f"'{attr}' is not defined in {module_name}: "
                                   + NOT_DECLARED.format(name=name))
        return obj

    def event_loop(self):
        """The loop async handlers run on; with concurrency > 1 it runs in its own thread and
        calls are handed to it."""
        with self.loop_lock:
            if self.loop is None:
                import asyncio
                self.loop = asyncio.new_event_loop()
                if self.concurrency > 1:
                    threading.Thread(target=self.loop.run_forever, daemon=True).start()
            return self.loop

    def send(self, obj, result=None, channel=None):
        """Write one frame (to the reply pipe, or to the direct channel the call came on). A
        result comes already encoded (to check it is strict JSON) and goes in as is."""
        frame = encode_frame(obj, result)
        if len(frame) - HEADER.size > REPLY_MAX_BYTES:
            raise ResultTooLarge(f"the reply is {len(frame) - HEADER.size} bytes, over the "
                                 f"{REPLY_MAX_BYTES // (1 << 20)} MB a reply may hold")
        if channel is not None:
            write_all(channel, frame)
            return
        with self.write_lock:
            self.replies.write(frame)
            self.replies.flush()

    def run_call(self, request, channel=None, before_reply=None):
        """Run one call and write its reply; `before_reply()` is called once the call is over,
        just before the reply goes out."""
        started = time.perf_counter()
        function = request.get("function", "")
        reply = {"type": RESULT, "id": request.get("id")}
        encoded = None
        if self.cpu_s and self.concurrency == 1:
            # A CPU-time budget per call: the kernel sends SIGXCPU (and the process dies) if
            # this call uses more than cpu_s seconds of CPU on top of what was used before.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            budget = int(usage.ru_utime + usage.ru_stime + self.cpu_s) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY))
        try:
            try:
                handler, wants_context, is_async = self.load(function)
            except FunctionNotFound:
                raise
            except Exception as exc:  # noqa: BLE001 - any import problem is "not found"
                raise FunctionNotFound(f"function '{function}' cannot be loaded: "
                                  f"{type(exc).__name__}: {exc}") from None
            args = [request.get("event")]
            if wants_context:
                deadline = float(request.get("deadline", 0))
                if request.get("timeout"):
                    deadline = time.time() + float(request["timeout"])
                args.append(Context(request.get("invocation_id", ""), self.container,
                                    self.version, function, deadline))
            if is_async:
                if self.concurrency > 1:
                    import asyncio
                    result = asyncio.run_coroutine_threadsafe(handler(*args), self.loop).result()
                else:
                    result = self.loop.run_until_complete(handler(*args))
            else:
                result = handler(*args)
            encoded = encode_result(function, result)
            reply["ok"] = True
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the process stays up
            reply["ok"] = False
            reply["error"] = describe(exc, function)
        reply["duration_ms"] = (time.perf_counter() - started) * 1000.0
        # With concurrency > 1 output and memory belong to whichever call finishes first:
        # several calls share one process, so attribution is best effort.
        reply["stdout"], reply["stderr"], reply["output_truncated"] = self.output.take()
        reply["max_rss_kb"] = peak_rss_kb()
        reply["cold"], self.cold = self.cold, False
        if before_reply is not None:
            before_reply()
        try:
            self.send(reply, encoded, channel)
        except (TypeError, ValueError) as exc:
            self.send({"type": RESULT, "id": reply["id"], "ok": False,
                       "error": describe(exc, function), "stdout": reply["stdout"],
                       "stderr": reply["stderr"], "duration_ms": reply["duration_ms"],
                       "max_rss_kb": reply["max_rss_kb"], "cold": reply["cold"]}, None, channel)
        except OSError:
            pass  # the web process that asked is gone: nobody waits for this reply

    def _threaded(self, request):
        try:
            self.run_call(request)
        finally:
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def serve(self):
        while not self.stopping:
            try:
                request = read_frame(self.requests)
            except InterruptedError:
                continue
            if request is None or request.get("type") == SHUTDOWN:
                break
            if request.get("type") != INVOKE:
                continue
            if self.concurrency == 1:
                self.in_flight = 1
                self.run_call(request)
                self.in_flight = 0
            else:
                with self.idle:
                    while self.in_flight >= self.concurrency:
                        self.idle.wait()
                    self.in_flight += 1
                threading.Thread(target=self._threaded, args=(request,), daemon=True).start()
        with self.idle:
            while self.in_flight:
                self.idle.wait()

    def serve_channels(self, control):
        """One call at a time from the request socket and every direct channel, in the order
        they come; each answered where it came from. The request socket also brings the slot
        page and new channels; a channel its web thread closed is dropped. On shutdown, every
        whole call already in a channel is answered first: a call this process never read, it
        never ran."""
        self.control_sock = control
        self.control = control.fileno()
        self.buffers = {self.control: bytearray()}
        self.received = []      # descriptors received, not yet claimed by their frame
        self.poller = select.poll()
        self.poller.register(self.control, select.POLLIN)
        while not self.stopping:
            try:
                events = self.poller.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd not in self.buffers:
                    continue
                if not self._read(fd):
                    if fd == self.control:
                        return      # the worker is gone
                    continue
                if self._serve(fd):
                    self._finish()
                    return

    def _read(self, fd):
        """Read what is there (never blocks: after poll, or on a non-blocking channel); False
        at the end of the stream (a channel is then dropped)."""
        try:
            if fd == self.control:
                data, ancillary, _, _ = self.control_sock.recvmsg(
                    1 << 16, socket.CMSG_SPACE(64), socket.MSG_CMSG_CLOEXEC)
                for level, kind, raw in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        count = len(raw) // 4
                        self.received.extend(struct.unpack(f"{count}i", raw[:count * 4]))
            else:
                data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            if fd != self.control:
                self.poller.unregister(fd)
                del self.buffers[fd]
                os.close(fd)
            return False
        self.buffers[fd] += data
        return True

    def _serve(self, fd):
        """Serve the whole frames read from `fd`; True once told to shut down."""
        buffer = self.buffers.get(fd)
        if buffer is None:
            return False
        for request in cut_frames(buffer):
            kind = request.get("type") if isinstance(request, dict) else None
            if kind == INVOKE:
                self.serve_one(request, None if fd == self.control else fd)
            elif fd != self.control:
                continue
            elif kind == CHANNEL and self.received:
                channel = self.received.pop(0)
                self.buffers[channel] = bytearray()
                self.poller.register(channel, select.POLLIN)
            elif kind == SLOT and self.received:
                self.slot = Slot(self.received.pop(0))
            elif kind == SHUTDOWN:
                return True
        return False

    def serve_one(self, request, channel):
        start_by = request.get("start_by")
        if start_by is not None and time.monotonic() > float(start_by):
            # Its caller's queue time is over: answered, not run.
            try:
                self.send({"type": RESULT, "id": request.get("id"), "ok": False,
                           "not_started": True}, None, channel)
            except OSError:
                pass
            return
        self.in_flight = 1
        if self.slot is not None:
            self.slot.begin(str(request.get("id")), time.monotonic())
        try:
            # The slot says free before the reply goes out: a caller who has the reply and
            # sends its next call at once finds this process free, not still busy with it.
            self.run_call(request, channel, self._call_over)
        finally:
            self._call_over()   # if the call ended before its reply (it raised)
            self.in_flight = 0

    def _call_over(self):
        if self.slot is not None:
            self.slot.end(time.monotonic())

    def _finish(self):
        """After shutdown: answer every whole call already waiting in a channel (until a
        look at them all finds nothing new). The channels stay blocking, so a large reply is
        written whole."""
        self.poller.unregister(self.control)    # the channels alone (dropped ones go)
        while True:
            ready = [fd for fd, _ in self.poller.poll(0)]
            if not ready:
                return
            for fd in ready:
                if self._read(fd):
                    self._serve(fd)


class Slot:
    """The page where this process shows the worker its call in hand (the layout of
    dockyard.common.direct.Slot)."""

    LAYOUT = struct.Struct("=IIQddI")

    def __init__(self, fd):
        import mmap
        self.map = mmap.mmap(fd, mmap.PAGESIZE)
        os.close(fd)
        self.served = 0
        self.ended = self.started = 0.0
        self.size = 0
        self.busy = False

    def begin(self, call_id, started):
        raw = call_id.encode("utf-8")[:128]
        at = self.LAYOUT.size
        self.map[at:at + len(raw)] = raw
        self.started, self.size, self.busy = started, len(raw), True
        self.LAYOUT.pack_into(self.map, 0, 1, 0, self.served, started, self.ended, len(raw))

    def end(self, ended):
        """The call in hand is over (once: a second end of it changes nothing)."""
        if not self.busy:
            return
        # The call's id stays: the worker tells a call that ran from one never reached.
        self.served += 1
        self.ended, self.busy = ended, False
        self.LAYOUT.pack_into(self.map, 0, 0, 0, self.served, self.started, ended, self.size)


def cut_frames(buffer):
    """The whole frames at the front of `buffer`, removed from it."""
    frames = []
    while len(buffer) >= 4:
        (size,) = HEADER.unpack_from(buffer)
        if size > MAX_FRAME:
            raise ValueError("frame too large")
        if len(buffer) < 4 + size:
            break
        frames.append(_decode(bytes(buffer[4:4 + size]).decode("utf-8")))
        del buffer[:4 + size]
    return frames


def encode_frame(obj, result=None):
    """A whole frame, header included. A reply's result goes last with its size first
    (`{"result_bytes":N,…,"result":<N bytes>}`, the layout of dockyard.common.frames), so that
    the web process passes it on without parsing it. Text that is not Unicode (a lone
    surrogate in an error message) becomes "?": a frame is UTF-8."""
    rest = _encode(obj).encode("utf-8", "replace")
    if result is None:
        return HEADER.pack(len(rest)) + rest
    head = b'{"result_bytes":%d' % len(result)
    if len(rest) > 2:
        head += b"," + rest[1:-1]
    size = len(head) + len(RESULT_KEY) + len(result) + 1
    return b"".join((HEADER.pack(size), head, RESULT_KEY, result, b"}"))


def encode_result(function, result):
    """A handler's return value as strict JSON (UTF-8 bytes), or the error that says why it
    cannot be one."""
    try:
        encoded = _encode(result).encode("utf-8")
    except (TypeError, ValueError) as exc:    # UnicodeEncodeError is a ValueError
        if isinstance(exc, UnicodeEncodeError):
            exc = f"a string in it holds a lone surrogate, which is not Unicode text: {exc}"
        kind = type(result).__name__
        raise ResultNotSerializable(f"{function} returned "
                                    f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} "
                                    f"{kind}, which is not JSON-serialisable ({exc})") from None
    if len(encoded) > RESULT_MAX_BYTES:
        raise ResultTooLarge(
            f"{function} returned {len(encoded) / (1 << 20):.1f} MB of JSON, over the "
            f"{RESULT_MAX_BYTES // (1 << 20)} MB a result may be; return a reference (a URL or "
            "a path) instead of the data")
    return encoded


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


NOT_DECLARED = ("no function '{name}': declare it in [functions] of dockyard.toml, or call "
                "'module:callable' of a module of the package's own code")


def _inside(path, folder):
    return path == folder or path.startswith(folder + os.sep)


class ResultNotSerializable(Exception):
    pass


class ResultTooLarge(ValueError):
    pass


class FunctionNotFound(LookupError):
    pass


def _import_machinery(filename: str) -> bool:
    return filename.startswith("<frozen importlib") or filename == importlib.__file__


def describe(exc, function=""):
    if isinstance(exc, SystemExit):
        message = f"{function or 'the function'} called sys.exit({exc.code!r})"
    else:
        message = str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    # Drop the bootstrap's own frames and the import machinery's: the user cares about theirs.
    frames = [f for f in frames if f.filename != __file__ and not _import_machinery(f.filename)]
    # No frame of the function's own (its result could not be sent): the error alone.
    text = ("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
            if frames else "") + "".join(traceback.format_exception_only(type(exc), exc))
    return {"type": type(exc).__name__, "message": message, "traceback": text}


def main():
    # When the worker dies, the request pipe ends and this process leaves (after the call in
    # hand); a worker that starts again on the same dir kills whatever is still running.
    request_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    control = None
    if stat.S_ISSOCK(os.fstat(request_fd).st_mode):
        control = socket.socket(fileno=request_fd)
        requests = _Exact(control)
    else:
        requests = os.fdopen(request_fd, "rb", buffering=1 << 16)
    init = read_frame(requests)
    replies = os.fdopen(reply_fd, "wb", buffering=0)
    if not init or init.get("type") != INIT:
        sys.exit(LOAD_ERROR_EXIT)
    # A line printed reaches its file at once: a call killed for its timeout (or a crash)
    # still shows what it printed before.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    child = Child(requests, replies, init)

    def on_term(signum, frame):
        # Idle: leave now. Busy: finish the call in hand, then leave.
        child.stopping = True
        if not child.in_flight:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    sys.path.insert(0, init["code_dir"])
    try:
        for name, value in (init.get("rlimits") or {}).items():
            resource.setrlimit(getattr(resource, name), (value, value))
        for name in child.declared:
            child.load(name)
    except BaseException as exc:  # noqa: BLE001 - whatever import does, it is a load error
        child.send({"type": LOAD_ERROR, "error": describe(exc)})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(LOAD_ERROR_EXIT)
    child.send({"type": READY, "pid": os.getpid()})
    if control is not None and child.concurrency == 1:
        child.serve_channels(control)
    else:
        child.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

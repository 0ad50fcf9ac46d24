"""The sandbox bootstrap on its own: a real interpreter process spoken to over two pipes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dockyard.common.frames import (FrameError, FrameSocket, encode_frame, read_frame,
                                    write_frame)

BOOTSTRAP = Path(__file__).resolve().parent.parent / "dockyard" / "sandbox" / "bootstrap.py"
FUNCTIONS = Path(__file__).resolve().parent / "functions"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


class Child:
    def __init__(self, tmp_path: Path, code: str = "echo", functions=None, concurrency=1,
                 cap=65536):
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.out = tmp_path / "out"
        self.err = tmp_path / "err"
        out = os.open(self.out, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        err = os.open(self.err, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self.proc = subprocess.Popen([PYTHON, "-I", "-B", str(BOOTSTRAP), str(req_r), str(rep_w)],
                                     pass_fds=(req_r, rep_w), stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        for fd in (req_r, rep_w, out, err):
            os.close(fd)
        self.requests = os.fdopen(self.req_w, "wb", buffering=0)
        self.replies = os.fdopen(self.rep_r, "rb")
        if functions is None:
            functions = {"echo": "main:echo", "ctx": "main:ctx", "aecho": "main:aecho",
                         "printer": "main:printer", "big_print": "main:big_print",
                         "boom": "main:boom", "not_json": "main:not_json",
                         "exit": "main:call_exit", "hard_exit": "main:hard_exit",
                         "sleep": "main:sleep"}
        write_frame(self.requests, {"type": "init", "code_dir": str(FUNCTIONS / code),
                                    "functions": functions, "container": "c", "version": "v1",
                                    "concurrency": concurrency, "output_cap": cap})
        self.first = read_frame(self.replies)
        self.n = 0

    def call(self, function, event=None, timeout=10.0):
        self.send(function, event, timeout)
        return read_frame(self.replies)

    def send(self, function, event=None, timeout=10.0):
        self.n += 1
        write_frame(self.requests, {"type": "invoke", "id": str(self.n), "function": function,
                                    "event": event, "deadline": time.time() + timeout,
                                    "invocation_id": f"inv{self.n}"})

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for f in (self.requests, self.replies):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def child(tmp_path):
    made = []

    def make(**kwargs):
        c = Child(tmp_path, **kwargs)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def test_ready_and_handler_shapes(child):
    c = child()
    assert c.first["type"] == "ready" and c.first["pid"] == c.proc.pid
    first = c.call("echo", {"a": 1})
    assert first["ok"] and first["result"] == {"a": 1} and first["cold"] is True
    assert first["max_rss_kb"] > 1000 and first["duration_ms"] >= 0
    assert c.call("echo", 2)["cold"] is False
    ctx = c.call("ctx", "e", timeout=5)["result"]
    assert ctx["invocation_id"] == "inv3" and ctx["container"] == "c"
    assert ctx["version"] == "v1" and ctx["function"] == "ctx" and 0 < ctx["remaining_ms"] <= 5000
    assert c.call("aecho", [1])["result"] == [1]
    assert c.call("main:echo", "lazy")["result"] == "lazy"
    missing = c.call("main:nope")
    assert not missing["ok"] and missing["error"]["type"] == "FunctionNotFound"


def test_errors_keep_the_process_serving(child):
    c = child()
    boom = c.call("boom")
    assert boom["error"]["type"] == "ValueError" and "boom" in boom["error"]["message"]
    assert "main.py" in boom["error"]["traceback"]
    assert "bootstrap.py" not in boom["error"]["traceback"]
    not_json = c.call("not_json")
    assert not_json["error"]["type"] == "ResultNotSerializable"
    assert "not_json returned a set, which is not" in not_json["error"]["message"]
    # No frame of the function's to show (its result could not be sent): the error alone.
    assert not_json["error"]["traceback"].startswith("ResultNotSerializable: "), not_json
    exited = c.call("exit")
    assert exited["error"]["type"] == "SystemExit" and "sys.exit(3)" in exited["error"]["message"]
    assert c.call("echo", "alive")["result"] == "alive"


def test_output_is_attributed_per_call_and_capped(child):
    c = child(cap=4096)
    printed = c.call("printer", {"text": "hi"})
    assert printed["stdout"] == "to stdout hi\n" and printed["stderr"] == "to stderr\n"
    quiet = c.call("echo", 1)
    assert quiet["stdout"] == "" and quiet["stderr"] == ""
    big = c.call("big_print")
    assert big["ok"] and big["output_truncated"] is True and len(big["stdout"]) <= 4200
    assert os.path.getsize(c.out) == 0


def test_os_exit_kills_the_process(child):
    c = child()
    c.send("hard_exit")
    assert read_frame(c.replies) is None
    assert c.proc.wait(5) == 1


def test_load_error_exits_with_the_reserved_code(child):
    c = child(code="broken_import", functions={"echo": "main:echo"})
    assert c.first["type"] == "load_error"
    assert c.first["error"]["type"] == "ModuleNotFoundError"
    assert c.proc.wait(5) == 3


def test_shutdown_and_sigterm_finish_the_call_in_hand(child):
    c = child()
    write_frame(c.requests, {"type": "shutdown"})
    assert c.proc.wait(5) == 0
    d = child()
    d.send("sleep", {"s": 1})
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    reply = read_frame(d.replies)
    assert reply["ok"] and reply["result"] == "slept"
    assert d.proc.wait(5) == 0


def test_concurrency_runs_calls_in_parallel(child):
    c = child(concurrency=2)
    c.send("sleep", {"s": 60}, timeout=120)
    c.send("echo", "beside")
    # The second call is answered while the first still sleeps: one at a time, it would wait
    # the minute behind it.
    reply = read_frame(c.replies)
    assert reply["id"] == "2" and reply["ok"] and reply["result"] == "beside", reply
    assert c.proc.poll() is None


def test_an_excerpt_keeps_the_start_and_the_end_in_whole_lines_and_says_what_it_left_out(
        tmp_path):
    from dockyard.sandbox.bootstrap import excerpt

    def cut(data: bytes, cap: int) -> bytes:
        path = tmp_path / "out"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            return excerpt(fd, len(data), cap)
        finally:
            os.close(fd)

    lines = b"".join(b"line %d\n" % i for i in range(100_000))
    kept = cut(lines, 4096)
    first, rest = kept.split(b"[... ", 1)
    count, last = rest.split(b" bytes not kept ...]\n", 1)
    assert len(kept) <= 4096 and first.startswith(b"line 0\nline 1\n")
    assert first.endswith(b"\n") and last.startswith(b"line ") and last.endswith(b"line 99999\n")
    assert len(first) + int(count) + len(last) == len(lines)
    assert lines.startswith(first) and lines.endswith(last)
    # What fits is kept whole; one long line is cut where it must, and still says so.
    assert cut(b"short\n", 4096) == b"short\n"
    long = cut(b"x" * 100_000, 1000)
    assert long.startswith(b"x") and long.endswith(b"x") and len(long) <= 1000
    assert b"\n[... " in long
    # Where no line ends near a cut, it falls between characters, never inside one.
    for text in ("a" + "€" * 30000, "😀" * 30000 + "b"):
        data = text.encode()
        kept = cut(data, 1000)
        assert "\ufffd" not in kept.decode("utf-8", "replace"), kept[-20:]
        first, rest = kept.split(b"[... ", 1)
        count, last = rest.split(b" bytes not kept ...]\n", 1)
        assert len(first.rstrip(b"\n")) + int(count) + len(last) == len(data)
    assert b"[... %d bytes not kept ...]" % (100_000 - long.count(b"x")) in long


def test_frames(tmp_path):
    r, w = os.pipe()
    with os.fdopen(w, "wb") as out:
        write_frame(out, {"x": "é"})
        out.write(encode_frame([1])[:3])
    with os.fdopen(r, "rb") as inp:
        assert read_frame(inp) == {"x": "é"}
        with pytest.raises(FrameError):
            read_frame(inp)
    r, w = os.pipe()
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        assert read_frame(inp) is None


def test_frame_socket_split_frames_timeout_and_close():
    import socket

    left, right = socket.socketpair()
    conn = FrameSocket(left)
    try:
        data = encode_frame({"a": 1}) + encode_frame({"b": "é" * 70000})
        # Frames arrive in pieces and two at a time: each is cut out whole.
        right.sendall(data[:3])
        threading.Timer(0.05, right.sendall, args=(data[3:],)).start()
        assert conn.recv() == {"a": 1}
        assert conn.recv() == {"b": "é" * 70000}
        conn.set_recv_timeout(0.2)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.recv()
        assert time.monotonic() - started >= 0.15
        right.sendall(encode_frame([1])[:5])
        right.close()
        with pytest.raises(FrameError):
            conn.recv()
    finally:
        conn.close()
        right.close()


def test_cpu_budget_per_call_kills_a_burner(tmp_path):
    # A child with a 1 s CPU budget per call and a long deadline.
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    proc = subprocess.Popen([PYTHON, "-I", "-B", str(BOOTSTRAP), str(req_r), str(rep_w)],
                            pass_fds=(req_r, rep_w), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(req_r)
    os.close(rep_w)
    requests, replies = os.fdopen(req_w, "wb", buffering=0), os.fdopen(rep_r, "rb")
    try:
        write_frame(requests, {"type": "init", "code_dir": str(FUNCTIONS / "echo"),
                               "functions": {"sleep": "main:sleep"}, "concurrency": 1,
                               "cpu_s": 1})
        assert read_frame(replies)["type"] == "ready"
        # Calls within budget, many times over, do not add up to a kill.
        for i in range(3):
            write_frame(requests, {"type": "invoke", "id": str(i), "function": "main:echo",
                                   "event": i, "deadline": time.time() + 60})
            assert read_frame(replies)["result"] == i
        started = time.monotonic()
        write_frame(requests, {"type": "invoke", "id": "burn", "function": "main:burn",
                               "event": {"s": 30}, "deadline": time.time() + 60})
        assert read_frame(replies) is None
        assert proc.wait(10) == -signal.SIGXCPU
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        requests.close()
        replies.close()


def test_the_bootstraps_words_are_the_protocols():
    """The bootstrap runs in the user's venv and cannot import dockyard: its copies of the
    frame types and of the load-error exit code must match the ones the worker uses."""
    from dockyard.common.protocol import Frame
    from dockyard.runner import process
    from dockyard.sandbox import bootstrap
    from dockyard.common import direct
    assert (bootstrap.INIT, bootstrap.READY, bootstrap.LOAD_ERROR, bootstrap.INVOKE,
            bootstrap.RESULT, bootstrap.SHUTDOWN, bootstrap.CHANNEL, bootstrap.SLOT) == (
        Frame.INIT, Frame.READY, Frame.LOAD_ERROR, Frame.INVOKE, Frame.RESULT, Frame.SHUTDOWN,
        Frame.CHANNEL, Frame.SLOT)
    assert bootstrap.LOAD_ERROR_EXIT == process.LOAD_ERROR_EXIT
    # The slot page the process writes and the worker reads.
    assert bootstrap.Slot.LAYOUT.format == direct._SLOT.format


def test_every_status_a_record_holds_can_be_listed():
    from dockyard.app.store.invocations import STATUSES
    from dockyard.common.protocol import FINISHED_STATUSES, Status
    assert Status.UNAVAILABLE in STATUSES and Status.CANCELLED in STATUSES
    assert set(FINISHED_STATUSES) <= set(STATUSES) and Status.NOT_RUNNING not in STATUSES

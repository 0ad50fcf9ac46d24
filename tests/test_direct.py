"""Direct channels: a warm call goes from a web thread straight to the function process (see
dockyard/common/direct.py). The bootstrap's side with real sockets, then a real serve: calls
answered while the worker agent is frozen, calls queued at a busy process, and a call whose
web process died, stopped by the worker's watchdog at its timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from conftest import container_processes, poll_until
from dockyard.common.direct import Slot
from dockyard.common.frames import FrameReader, FrameSocket, encode_frame

BOOTSTRAP = Path(__file__).resolve().parent.parent / "dockyard" / "sandbox" / "bootstrap.py"
FUNCTIONS = Path(__file__).resolve().parent / "functions"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


class Process:
    """The bootstrap as a worker starts a one-at-a-time process: a request socket, a reply
    pipe, a slot page; channels handed over the request socket."""

    def __init__(self, tmp_path: Path):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.rep_r, rep_w = os.pipe()
        out = os.open(tmp_path / "out", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        err = os.open(tmp_path / "err", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self.proc = subprocess.Popen(
            [PYTHON, "-I", "-B", str(BOOTSTRAP), str(theirs.fileno()), str(rep_w)],
            pass_fds=(theirs.fileno(), rep_w), stdout=out, stderr=err,
            stdin=subprocess.DEVNULL, start_new_session=True)
        for fd in (rep_w, out, err):
            os.close(fd)
        theirs.close()
        self.replies = FrameReader(self.rep_r)
        self.control.sendall(encode_frame({
            "type": "init", "code_dir": str(FUNCTIONS / "echo"), "concurrency": 1,
            "functions": {"echo": "main:echo", "sleep": "main:sleep"}, "container": "c",
            "version": "v1"}))
        assert self.replies.read(time.monotonic() + 30)["type"] == "ready"
        self.slot = Slot()
        socket.send_fds(self.control, [encode_frame({"type": "slot"})], [self.slot.fd])

    def channel(self) -> FrameSocket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socket.send_fds(self.control, [encode_frame({"type": "channel"})], [theirs.fileno()])
        theirs.close()
        return FrameSocket(ours)

    def close(self) -> None:
        self.control.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.replies.close()
        self.slot.close()


@pytest.fixture
def process(tmp_path):
    p = Process(tmp_path)
    yield p
    p.close()


def invoke(call_id: str, function: str, event, start_by: float | None = None) -> dict:
    frame = {"type": "invoke", "id": call_id, "function": function, "event": event,
             "timeout": 30}
    if start_by is not None:
        frame["start_by"] = start_by
    return frame


def test_each_call_is_answered_on_the_channel_it_came_on(process):
    a, b = process.channel(), process.channel()
    a.send(invoke("a1", "echo", {"from": "a"}))
    b.send(invoke("b1", "echo", {"from": "b"}))
    process.control.sendall(encode_frame(invoke("w1", "echo", {"from": "worker"})))
    assert b.recv()["result"] == {"from": "b"}
    assert a.recv()["result"] == {"from": "a"}
    assert process.replies.read(time.monotonic() + 10)["result"] == {"from": "worker"}
    # The process marks its slot free before it sends a reply: read as the replies are had.
    busy, served, _, ended, call_id = process.slot.read()
    # The last call started stays named: the worker tells a call that ran from one never
    # reached when a channel closes.
    assert not busy and served == 3 and ended > 0 and call_id in ("a1", "b1", "w1")


def test_the_slot_shows_the_call_in_hand(process):
    channel = process.channel()
    sent = time.monotonic()
    channel.send(invoke("slow", "sleep", {"s": 1.5}))
    deadline = time.monotonic() + 10
    while not process.slot.read()[0]:
        assert time.monotonic() < deadline, "the slot never showed the call"
        time.sleep(0.01)
    busy, served, started, _, call_id = process.slot.read()
    assert busy and call_id == "slow" and served == 0
    assert sent <= started <= time.monotonic()     # its start, on this host's clock
    assert channel.recv()["result"] == "slept"
    # Free by the time its caller has the reply, which may send its next call at once: a web
    # thread picking a process then sees this one free, not still busy with the call it
    # answered.
    assert process.slot.read()[:2] == (False, 1)


def test_a_call_reached_after_its_queue_time_is_answered_not_run(process):
    channel = process.channel()
    channel.send(invoke("late", "echo", 1, start_by=time.monotonic() - 0.1))
    reply = channel.recv()
    assert reply["id"] == "late" and reply["not_started"] is True and "result" not in reply
    assert process.slot.read()[1] == 0     # nothing ran


def test_on_shutdown_the_calls_already_waiting_are_answered_first(process):
    channels = [process.channel() for _ in range(3)]
    channels[0].send(invoke("first", "sleep", {"s": 0.5}))
    time.sleep(0.2)     # the first is running; the others wait in their sockets
    channels[1].send(invoke("second", "echo", 2))
    channels[2].send(invoke("third", "echo", 3))
    process.control.sendall(encode_frame({"type": "shutdown"}))
    assert channels[0].recv()["result"] == "slept"
    assert channels[1].recv()["result"] == 2
    assert channels[2].recv()["result"] == 3
    assert process.proc.wait(timeout=10) == 0


def test_a_channel_closed_by_its_web_thread_is_dropped(process):
    gone = process.channel()
    gone.close()
    kept = process.channel()
    kept.send(invoke("k", "echo", "still here"))
    assert kept.recv()["result"] == "still here"


def test_the_shared_pages_cannot_be_shrunk_or_grown():
    """A function process that got hold of its slot's descriptor and shrank it would kill the
    worker reading the page (SIGBUS): the pages are sealed at their size."""
    from dockyard.common.direct import PoolPage
    for page in (Slot(), PoolPage()):
        try:
            for size in (0, 2 * 4096):
                with pytest.raises(PermissionError):
                    os.ftruncate(page.fd, size)
        finally:
            page.close()


# -- through a real serve -----------------------------------------------------------------


def _web_and_agent(server) -> tuple[list[psutil.Process], psutil.Process]:
    serve = psutil.Process(server.proc.pid)
    web, agent = [], None
    for proc in serve.children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "gunicorn" in cmd and proc.ppid() != serve.pid:
            web.append(proc)
        elif " worker " in f" {cmd} " and agent is None:
            agent = proc
    assert web and agent is not None
    return web, agent


def _parallel(server, target: str, event, count: int, clients: int,
              timeout: float = 60, retry_busy: bool = False) -> list[requests.Response]:
    """`count` calls from `clients` threads; `retry_busy`: a 429 (the container holds its
    share of a web process's threads) is sent again after its Retry-After."""
    results: list = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with requests.Session() as http:
            for _ in range(n):
                while True:
                    response = http.post(f"{server.url}/invoke/{target}",
                                         data=None if event is None else json.dumps(event),
                                         timeout=timeout)
                    if not retry_busy or response.status_code != 429:
                        break
                    time.sleep(float(response.headers["Retry-After"]))
                with lock:
                    results.append(response)

    threads = [threading.Thread(target=client, args=(count // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_warm_calls_are_answered_while_the_worker_agent_is_frozen(server, pkg):
    server.deploy(pkg("echo", name="direct-frozen", manifest_extra="[limits]\ninstances = 2\n"))
    server.deploy(pkg("echo", name="direct-frozen-uncalled"))
    # A web thread opens its channels on its first call (through the agent), and gunicorn
    # starts a thread only when every one it has is busy: after this warm-up, one call at a
    # time is always taken by a thread that has its channels. (The threads answering the 429s
    # of the flood take admitted calls too as it goes on: the calls are retried.)
    warm = _parallel(server, "direct-frozen/sleep", {"s": 0.1}, 64, 32, retry_busy=True)
    assert all(r.status_code == 200 for r in warm), [r.text for r in warm
                                                     if r.status_code != 200][:3]
    # A thread that answered only 429s has none yet: calls one at a time, each on a new
    # connection, reach every idle thread of both web processes in turn (their pools hand a
    # task to the thread that waited longest), so each opens its channels.
    for _ in range(8 * 12):
        assert requests.post(f"{server.url}/invoke/direct-frozen/echo", data="1",
                             headers={"Connection": "close"}, timeout=60).status_code == 200
    _, agent = _web_and_agent(server)
    agent.suspend()
    try:
        # Out of routing everywhere (its pings go unanswered): only the direct path is left.
        poll_until(lambda: all(w["state"] != "up" for w in server.api("GET", "/api/workers")
                               .json()["workers"]), 30, "the frozen worker was never suspect")
        answers = _parallel(server, "direct-frozen/echo", {"n": 1}, 40, 1, timeout=10)
        # A version no web thread holds channels to has no way past the stalled agent: a 503
        # that says why.
        (stuck,) = _parallel(server, "direct-frozen-uncalled/echo", {"n": 1}, 1, 1, timeout=10)
    finally:
        agent.resume()
    # Back in routing once it answers again (later tests on this serve need it): a version no
    # web thread holds channels to is reached through the agent again.
    poll_until(lambda: all(w["state"] == "up" for w in server.api("GET", "/api/workers")
                           .json()["workers"])
               and server.invoke("direct-frozen-uncalled/echo", 2).status_code == 200,
               60, "the worker never came back in routing after the freeze", every=0.2)
    assert [r.status_code for r in answers] == [200] * 40, [r.text for r in answers
                                                            if r.status_code != 200][:3]
    assert all(r.json() == {"n": 1} for r in answers)
    assert stuck.status_code == 503, stuck.text
    assert "stopped answering the control plane" in stuck.json()["error"]["message"]
    record = server.api("GET", "/api/invocations/"
                        + answers[-1].headers["X-Dockyard-Invocation-Id"]).json()
    assert record["status"] == "succeeded" and record["output"] == {"n": 1}


def test_calls_wait_their_turn_at_a_busy_process(server, pkg):
    server.deploy(pkg("echo", name="direct-queue"))
    answers = _parallel(server, "direct-queue/sleep", {"s": 0.2}, 8, 8)
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers
                                                           if r.status_code != 200][:3]
    assert all(r.json() == "slept" for r in answers)


def test_a_call_whose_web_process_died_is_stopped_at_its_timeout(server, pkg):
    server.deploy(pkg("echo", name="direct-orphan", manifest_extra="[limits]\ntimeout_s = 2\n"))
    assert server.invoke("direct-orphan/echo", 1).status_code == 200
    (pid, _), = container_processes(server.data, "direct-orphan").items()
    caller = threading.Thread(target=lambda: _quietly(server, "direct-orphan/sleep"))
    caller.start()
    deadline = time.monotonic() + 20
    while psutil.Process(pid).cpu_times().user < 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)     # the call is running in the function process now
    web, _ = _web_and_agent(server)
    for proc in web:
        proc.send_signal(signal.SIGKILL)     # nobody is left to ask for the timeout
    caller.join(timeout=30)
    # The worker's watchdog kills the process at the call's timeout and starts another.
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the orphaned call was never stopped"
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while True:
        try:
            response = server.invoke("direct-orphan/echo", "again")
            if response.status_code == 200:
                break
        except requests.ConnectionError:
            pass    # gunicorn is starting its web processes again
        assert time.monotonic() < deadline, "no call succeeded after the web processes died"
        time.sleep(0.2)
    assert response.json() == "again"
    assert pid not in container_processes(server.data, "direct-orphan")


def _quietly(server, target: str) -> None:
    try:
        server.invoke(target, {"s": 60})
    except requests.RequestException:
        pass


def test_a_function_cannot_shrink_the_page_the_worker_reads(server, pkg):
    server.deploy(pkg("hostile", name="direct-shrink"))
    before = server.invoke("direct-shrink/boot", {}).json()
    _, agent = _web_and_agent(server)
    answer = server.invoke("direct-shrink/shrink_pages", {})
    assert answer.status_code == 200, answer.text
    assert "shrunk" not in answer.json()["outcomes"].values(), answer.json()
    time.sleep(0.3)     # the watchdog has read the slot several times since
    assert agent.is_running() and agent.status() != psutil.STATUS_ZOMBIE
    assert server.invoke("direct-shrink/boot", {}).json() == before


def test_a_free_process_takes_the_calls_while_another_is_busy(server, pkg):
    server.deploy(pkg("echo", name="direct-spread", manifest_extra="[limits]\ninstances = 2\n"))
    # Every web thread has its channels (a thread's first call goes through the worker).
    _parallel(server, "direct-spread/echo", 1, 200, 8)
    slow = threading.Thread(target=lambda: server.invoke("direct-spread/sleep", {"s": 8}))
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while not any(_busy(server.data, "direct-spread")):
            assert time.monotonic() < deadline, "the slow call never started"
            time.sleep(0.02)
        answers = [server.invoke("direct-spread/ident") for _ in range(20)]
        # Each went to the process with no call in hand, not behind the slow call.
        assert slow.is_alive(), [(r.status_code, r.elapsed.total_seconds()) for r in answers]
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert len({r.text for r in answers}) == 1, [r.text for r in answers]
    finally:
        slow.join()


def _busy(data: Path, container: str) -> list[bool]:
    """Whether each function process of the container is in the `sleep` function's call (the
    kernel says where it waits: a timer for the call, poll() between calls)."""
    out = []
    for pid in container_processes(data, container):
        try:
            with open(f"/proc/{pid}/wchan") as f:
                out.append("nanosleep" in f.read())
        except OSError:
            out.append(False)
    return out


def test_a_call_stopped_at_its_timeout_keeps_what_it_printed(server, pkg):
    server.deploy(pkg("echo", name="direct-lastwords", manifest_extra="[limits]\ntimeout_s = 1\n"))
    answer = server.invoke("direct-lastwords/print_then_sleep", {"s": 30})
    assert answer.status_code == 504, answer.text
    record = server.api("GET", "/api/invocations/"
                        + answer.json()["invocation_id"]).json()
    assert record["status"] == "timed_out"
    assert "before the sleep" in record["stdout"]
    # The function's own exit code is its own, whatever the bootstrap uses its codes for.
    crashed = server.invoke("direct-lastwords/exit_code", {"code": 3})
    assert crashed.status_code == 502, crashed.text
    assert "exit code 3" in crashed.json()["error"]["message"]
    assert server.invoke("direct-lastwords/echo", "fine").json() == "fine"

"""A call that finds every instance busy waits for one for up to its container's
`queue_timeout_s` ([limits], 10 s by default), then gets a 429 with Retry-After: never a 503,
and never only once an instance frees. Through a real serve (direct channels), through a
worker on another connection (every call relayed and fenced), and at the worker's pool with a
real function process: a relayed call the process has not read by its start-by is withdrawn,
and one whose wait ends after the process frees takes it."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import Server, make_package, zip_folder
from dockyard.common.frames import FrameSocket, RawJSON
from dockyard.common.protocol import Status
from dockyard.runner.pool import Pool
from dockyard.runner.process import ChildSpec

FUNCTIONS = Path(__file__).resolve().parent / "functions"
BOOTSTRAP = Path(__file__).resolve().parent.parent / "dockyard" / "sandbox" / "bootstrap.py"


def wait_for(what: str, check, timeout: float = 30, every: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"{what}: not within {timeout}s"
        time.sleep(every)


def running(server, container: str) -> list[dict]:
    return server.api("GET", f"/api/invocations?container={container}&status=running"
                      ).json()["invocations"]


class Busy:
    """A call to `target` in a thread of its own, running once `started()` says so."""

    def __init__(self, server, target: str, seconds: float):
        self.answer: requests.Response | None = None
        self.thread = threading.Thread(
            target=lambda: setattr(self, "answer", server.invoke(target, {"s": seconds})))
        self.thread.start()

    def join(self) -> requests.Response:
        self.thread.join(120)
        assert self.answer is not None, "the busy call got no answer"
        return self.answer


def assert_busy_429(response: requests.Response, what: str, waited: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "1"
    body = response.json()
    error = body["error"]
    assert error["type"] == "TooManyRequests", error
    message = error["message"]
    assert "\n" not in message
    assert message.startswith(f"every instance of {what}@") and \
        f"stayed busy for {waited}s" in message, message
    assert "`instances`" in message and "`queue_timeout_s`" in message, message
    # It reached a worker and has a record, which says it ran nothing.
    assert body["invocation_id"] == response.headers["X-Dockyard-Invocation-Id"]


def test_a_call_every_instance_stays_busy_for_gets_a_429_after_its_queue_time(server, pkg):
    server.deploy(pkg("echo", name="qt-short",
                      manifest_extra="[limits]\ninstances = 1\nqueue_timeout_s = 2\n"
                                     "timeout_s = 20\n"))
    assert server.invoke("qt-short/echo", "warm").json() == "warm"
    busy = Busy(server, "qt-short/sleep", 6)
    try:
        wait_for("the first call running", lambda: running(server, "qt-short"))
        second = server.invoke("qt-short/echo", "second")
        assert_busy_429(second, "qt-short", "2")
        # Answered while the instance was still busy, not as it freed.
        assert busy.thread.is_alive(), "the 429 came only once the instance was free"
    finally:
        first = busy.join()
    assert first.status_code == 200 and first.json() == "slept"
    record = server.wait_invocation(second.json()["invocation_id"])
    assert record["status"] == "unavailable" and record["error"]["type"] == "TooManyRequests"
    # The withdrawn call never ran, and the instance serves the next one.
    assert server.invoke("qt-short/echo", "after").json() == "after"


def test_a_call_waits_for_an_instance_that_frees_within_its_queue_time(server, pkg):
    server.deploy(pkg("echo", name="qt-long",
                      manifest_extra="[limits]\ninstances = 1\nqueue_timeout_s = 10\n"))
    assert server.invoke("qt-long/echo", "warm").json() == "warm"
    busy = Busy(server, "qt-long/sleep", 3)
    try:
        wait_for("the first call running", lambda: running(server, "qt-long"))
        second = server.invoke("qt-long/echo", "second")
    finally:
        first = busy.join()
    assert first.status_code == 200
    assert second.status_code == 200, second.text
    assert second.json() == "second"


@pytest.mark.parametrize("value", ["0", "0.05", "301", '"10"', "true", "nan"])
def test_a_bad_queue_timeout_is_refused_at_upload(server, pkg, value):
    folder = pkg("echo", name="qt-bad")
    manifest = folder / "dockyard.toml"
    manifest.write_text(manifest.read_text() + f"\n[limits]\nqueue_timeout_s = {value}\n")
    response = server.api("POST", "/api/containers", data=zip_folder(folder))
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message
    assert message.startswith("dockyard.toml: limits.queue_timeout_s must be "), message
    assert server.api("GET", "/api/containers/qt-bad").status_code == 404


def test_the_cli_says_why_a_queue_timeout_is_refused(server, pkg):
    folder = pkg("echo", name="qt-bad-cli", manifest_extra="[limits]\nqueue_timeout_s = 900\n")
    done = server.cli("deploy", str(folder), check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "limits.queue_timeout_s must be between 0.1 and 300" in lines[0], lines


# -- a worker of its own: every call relayed through it, fenced -----------------------------

@pytest.fixture(scope="module")
def relayed(private_tmp, wheelhouse, tmp_path_factory):
    """A serve without a local worker and one `dockyard worker` on a connection of its own
    (TCP), as a remote worker: no call goes straight to a process."""
    from failover_cluster import start_worker
    root = private_tmp / "queue-relayed"
    root.mkdir()
    extra = ["--find-links", str(wheelhouse), "--offline"]
    server = Server(root / "serve", ["--no-local-worker", *extra], workers=0)
    worker = None
    try:
        worker = start_worker(server.url, server.worker_token, root / "worker", extra)
        server.wait_workers(1)
        folder = make_package(tmp_path_factory.mktemp("queue-relayed"), "echo", name="qt-relay",
                              manifest_extra="[limits]\ninstances = 1\nqueue_timeout_s = 2\n"
                                             "timeout_s = 20\n")
        server.deploy(folder)
        yield server
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
    assert not server.leftovers, server.leftovers


def test_a_relayed_call_gets_the_429_too_and_one_that_waits_runs(relayed):
    server = relayed
    assert server.invoke("qt-relay/echo", "warm").json() == "warm"
    busy = Busy(server, "qt-relay/sleep", 6)
    try:
        wait_for("the first call running", lambda: running(server, "qt-relay"))
        second = server.invoke("qt-relay/echo", "second")
        assert_busy_429(second, "qt-relay", "2")
        assert busy.thread.is_alive(), "the 429 came only once the instance was free"
    finally:
        assert busy.join().status_code == 200
    # One sent while a 1 s call runs waits for it, within its 2 s.
    short = Busy(server, "qt-relay/sleep", 1)
    try:
        wait_for("the short call running", lambda: running(server, "qt-relay"), every=0.01)
        third = server.invoke("qt-relay/echo", "third")
    finally:
        assert short.join().status_code == 200
    assert third.status_code == 200 and third.json() == "third", third.text


# -- the worker's pool, with a real function process ------------------------------------------

@pytest.fixture
def pool(tmp_path):
    """A pool of one real one-at-a-time process of tests/functions/echo, started as the worker
    starts one with no sandbox (the current user, no cgroup)."""
    def spec() -> ChildSpec:
        return ChildSpec(
            argv=[sys.executable, "-I", "-B", str(BOOTSTRAP)], code_dir=FUNCTIONS / "echo",
            tmp_root=tmp_path / "tmp", run_dir=tmp_path / "run", env={"PATH": os.defpath},
            init={"functions": {"echo": "main:echo", "sleep": "main:sleep"},
                  "container": "qt", "version": "1", "concurrency": 1,
                  "code_dir": str(FUNCTIONS / "echo"), "rlimits": {}, "cpu_s": 0},
            what="qt@1", queue_wait=10.0)
    made = Pool("qt@1", spec, 1, 1, lambda reason: None)
    made.start()
    yield made
    made.stop(grace=2.0)


def straight(pool: Pool) -> FrameSocket:
    """A direct channel to the pool's process, as a web thread gets one."""
    page_fd, _, channels = pool.channels()
    os.close(page_fd)
    (_, (ours, slot_fd)), = channels
    os.close(slot_fd)
    return FrameSocket(ours)


def relay(pool: Pool, call_id: str, function: str, event, queue_wait: float) -> dict:
    frame = {"type": "invoke", "id": call_id, "invocation_id": call_id, "function": function,
             "event": event, "deadline": time.time() + 20}
    return pool.invoke(frame, 20.0, queue_wait)


def succeeded(reply: dict):
    """The result of a call that succeeded (the worker passes it on as the bytes the process
    encoded)."""
    assert reply["status"] == Status.SUCCEEDED, reply
    result = reply["result"]
    return result.value() if isinstance(result, RawJSON) else result


def test_a_relayed_call_behind_a_direct_one_is_withdrawn_at_its_start_by(pool):
    channel = straight(pool)
    channel.send({"type": "invoke", "id": "long", "function": "sleep", "event": {"s": 4},
                  "timeout": 20, "start_by": time.monotonic() + 5})
    (child,) = pool.children
    wait_for("the direct call in hand", lambda: child.direct_busy(), every=0.01)
    reply = relay(pool, "relayed-1", "echo", 1, queue_wait=0.5)
    assert reply["status"] == Status.UNAVAILABLE and reply["error"]["busy"] is True, reply
    assert child.withdrawn == {"relayed-1"}
    # Still unread: the next one is not written behind it, and waits in the pool instead.
    reply = relay(pool, "relayed-2", "echo", 2, queue_wait=0.3)
    assert reply["status"] == Status.UNAVAILABLE and reply["error"]["busy"] is True, reply
    assert child.withdrawn == {"relayed-1"}
    assert channel.recv()["result"] == "slept"
    # The process refused the withdrawn call (it never ran); its answer is skipped.
    reply = relay(pool, "relayed-3", "echo", 3, queue_wait=5)
    assert succeeded(reply) == 3
    assert not child.withdrawn
    channel.close()


def test_a_relayed_call_takes_the_process_that_frees_within_its_wait(pool):
    channel = straight(pool)
    channel.send({"type": "invoke", "id": "short", "function": "sleep", "event": {"s": 1},
                  "timeout": 20, "start_by": time.monotonic() + 5})
    (child,) = pool.children
    wait_for("the direct call in hand", lambda: child.direct_busy(), every=0.01)
    reply = relay(pool, "relayed-after", "echo", "after", queue_wait=3)
    assert succeeded(reply) == "after"
    assert channel.recv()["result"] == "slept"
    assert not child.withdrawn
    channel.close()


def test_a_relayed_call_waits_in_the_pool_for_a_relayed_one(pool):
    first = {}
    thread = threading.Thread(target=lambda: first.update(
        reply=relay(pool, "first", "sleep", {"s": 3}, queue_wait=1)))
    thread.start()
    try:
        wait_for("the first call in hand", lambda: pool.busy(), every=0.01)
        busy = relay(pool, "second", "echo", 2, queue_wait=0.5)
        assert busy["status"] == Status.UNAVAILABLE and busy["error"]["busy"] is True, busy
        waited = relay(pool, "third", "echo", 3, queue_wait=10)
        assert succeeded(waited) == 3
    finally:
        thread.join(30)
    assert succeeded(first["reply"]) == "slept"

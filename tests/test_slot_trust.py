"""The worker believes only what it measured (see dockyard/runner/witness.py): a function that
writes its own slot page (tests/functions/slotforger) cannot keep a call from its timeout,
its process from its CPU budget or its version from being removed, nor forge a line of the
worker's log; a slot that claims calls nobody sent kills the process. Unit tests for the
pieces (the default CPU quota, the ledger, the watchdog's judgement), then a real serve: calls
sent as today's web threads send them (the slot is then all the worker has to time them by,
as a hint), and calls sent as a web thread keeping the call ledger sends them."""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import threading
import time

import psutil
import pytest

from conftest import container_processes
from conftest import poll_until as wait_for
from dockyard.app.invoke.worker_client import WorkerConnections
from dockyard.common.direct import PoolPage, Slot, call_id_ok
from dockyard.common.frames import FrameSocket
from dockyard.common.protocol import Frame, Status
from dockyard.runner.process import QUEUE_WAIT_S, REPLY_MAX_BYTES, SEND_WAIT_S, translate
from dockyard.runner.direct_watch import BROKE_PROTOCOL, OVER_BUDGET, TIMED_OUT, DirectWatch
from dockyard.runner.witness import Witness
from dockyard.sandbox.cgroups import CPU_PERIOD_US, Cgroup, CgroupHost

FORGED_LINE = "admin token rotated by slotforger"



def new_call_id() -> str:
    return f"inv_{int(time.time() * 1000):012x}{secrets.randbits(48):012x}"


# -- the default CPU quota -------------------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2])
def test_a_group_gets_one_cpu_when_no_share_is_asked_for(tmp_path, version):
    roots = {c: tmp_path / c for c in ("memory", "pids", "cpu")} if version == 1 else \
        {c: tmp_path / "unified" for c in ("memory", "pids", "cpu")}
    for root in roots.values():
        root.mkdir(exist_ok=True)
    host = CgroupHost(version, roots, cpu=True)
    default = host.create("default", 64, 8)
    half = host.create("half", 64, 8, cpus=0.5)
    for group, quota in ((default, CPU_PERIOD_US), (half, CPU_PERIOD_US // 2)):
        folder = group.dirs["cpu"]
        if version == 1:
            assert (folder / "cpu.cfs_quota_us").read_text() == str(quota)
            assert (folder / "cpu.cfs_period_us").read_text() == str(CPU_PERIOD_US)
        else:
            assert (folder / "cpu.max").read_text() == f"{quota} {CPU_PERIOD_US}"


def test_a_group_without_the_cpu_controller_is_still_made(tmp_path):
    folder = tmp_path / "memory"
    group = Cgroup(1, {"memory": folder, "pids": folder})
    folder.mkdir()
    group.limit(64, 8)
    assert (folder / "pids.max").read_text() == "8"
    assert not (folder / "cpu.cfs_quota_us").exists()


# -- the ledger and the watchdog's judgement, with a fake slot --------------------------------

class FakeSlot:
    def __init__(self):
        self.values = (False, 0, 0.0, 0.0, "")

    def read(self):
        return self.values

    @property
    def busy(self):
        return self.values[0]


class FakeBudget:
    by_kernel = False

    def __init__(self):
        self.settled = 0
        self.over = False

    def settle(self):
        self.settled += 1

    def exceeded(self):
        return self.over

    def arm(self, now=None):
        pass


class Rig:
    """A process's channels and ledger lines, the web thread's side of each, and the judge;
    the process itself is a fake slot (the test writes what it claims)."""

    def __init__(self):
        self.page = PoolPage()
        self.witness = Witness(self.page, number=1)
        self.slot = FakeSlot()
        self.budget = FakeBudget()
        self.watch = DirectWatch(self.witness, self.slot, self.budget, QUEUE_WAIT_S)
        self.web: list[socket.socket] = []
        self.process: list[socket.socket] = []

    def channel(self, adopt: bool = True):
        ours, theirs = socket.socketpair()
        process_end = socket.socket(fileno=os.dup(theirs.fileno()))
        self.witness.add(theirs, os.fstat(ours.fileno()).st_ino)
        self.web.append(ours)
        self.process.append(process_end)
        return ours, (PoolPage(os.dup(self.page.fd)).entry(ours.fileno()) if adopt else None)

    def look(self, at: float, timeout: float = 2.0):
        return self.watch.look(at, timeout, {})

    def close(self):
        self.witness.close()
        for sock in self.web + self.process:
            sock.close()
        self.page.close()


@pytest.fixture
def rig():
    made = Rig()
    yield made
    made.close()


def test_the_ledger_is_the_web_threads_and_the_worker_reads_it(rig):
    ours, entry = rig.channel()
    call_id = new_call_id()
    entry.sent(call_id, time.monotonic() + QUEUE_WAIT_S, 2.0)
    view = rig.witness.look(time.monotonic())
    assert view.witnessed and [c.call_id for c in view.calls] == [call_id] and view.sent == 1
    entry.answered()
    view = rig.witness.look(time.monotonic())
    assert view.calls == [] and view.sent == 1 and view.last_answer > 0
    assert call_id_ok(call_id) and not call_id_ok("inv_0\nWARNING x") and not call_id_ok(7)


def frame_of(call_id: str) -> bytes:
    body = b'{"type":"invoke","id":"' + call_id.encode() + b'"}'
    return len(body).to_bytes(4, "big") + body


def test_a_call_is_timed_from_its_sending_whatever_the_slot_says(rig):
    ours, entry = rig.channel()
    call_id = new_call_id()
    entry.sent(call_id, time.monotonic() + QUEUE_WAIT_S, 2.0)
    sent = time.monotonic()
    ours.sendall(frame_of(call_id))
    rig.process[0].recv(4096)       # the process took it
    # The process says it started a moment ago, again and again, under a forged id.
    for step in range(10):
        rig.slot.values = (True, 0, sent + 2.0 + step, 0.0, "")
        assert rig.look(sent + 2.0 + step * 0.01) is None
    first = rig.look(sent + 2.3)
    assert first is None                       # seen past its timeout once
    verdict = rig.look(sent + 2.33)
    assert verdict is not None and verdict.action == TIMED_OUT
    assert verdict.call_id == call_id       # the call taken off its channel, by the kernel


def test_a_call_waiting_behind_another_is_timed_from_the_last_answer(rig):
    _, first = rig.channel()
    _, second = rig.channel()
    first.sent(new_call_id(), time.monotonic() + QUEUE_WAIT_S, 2.0)
    second.sent(new_call_id(), time.monotonic() + QUEUE_WAIT_S, 2.0)
    start = time.monotonic()
    rig.slot.values = (True, 0, start, 0.0, "")
    assert rig.look(start + 1.5) is None
    time.sleep(0.01)
    first.answered()
    answered = time.monotonic()
    assert rig.look(answered + 2.0) is None     # the second began when the first ended
    assert rig.look(answered + 2.3) is None
    assert rig.look(answered + 2.33).action == TIMED_OUT


def test_a_slot_that_claims_a_call_nobody_sent_breaks_the_protocol(rig):
    rig.channel()
    now = time.monotonic()
    rig.slot.values = (True, 0, now, 0.0, "")
    assert rig.look(now) is None
    assert rig.look(now + 0.3) is None
    verdict = rig.look(now + 0.6)
    assert verdict.action == BROKE_PROTOCOL and "none was sent" in verdict.reason


def test_a_slot_that_claims_more_calls_than_were_sent_breaks_the_protocol(rig):
    _, entry = rig.channel()
    entry.sent(new_call_id(), time.monotonic() + QUEUE_WAIT_S, 2.0)
    entry.answered()
    now = time.monotonic()
    rig.slot.values = (False, 1, now, now, "")
    assert rig.look(now) is None and rig.look(now + 1.0) is None     # one sent, one served
    rig.slot.values = (False, 40, now, now, "")
    assert rig.look(now + 1.1) is None
    verdict = rig.look(now + 1.7)
    assert verdict.action == BROKE_PROTOCOL and "40 calls served" in verdict.reason


def test_a_slot_that_names_a_call_never_sent_breaks_the_protocol(rig):
    _, entry = rig.channel()
    real = new_call_id()
    entry.sent(real, time.monotonic() + QUEUE_WAIT_S, 2.0)
    now = time.monotonic()
    rig.slot.values = (True, 0, now, 0.0, real)
    assert rig.look(now) is None and rig.look(now + 0.6) is None    # the real call: fine
    rig.slot.values = (True, 0, now, 0.0, new_call_id())
    assert rig.look(now + 0.7) is None
    verdict = rig.look(now + 1.3)
    assert verdict.action == BROKE_PROTOCOL and "not sent" in verdict.reason


def test_cpu_between_calls_is_checked_whatever_the_slot_says(rig):
    _, entry = rig.channel()
    entry.sent(new_call_id(), time.monotonic() + QUEUE_WAIT_S, 2.0)
    now = time.monotonic()
    assert rig.look(now) is None
    entry.answered()
    assert rig.look(now + 0.1) is None and rig.budget.settled == 1
    rig.budget.over = True
    # The slot claims no call (a "busy" claim would be a broken protocol of its own).
    assert rig.look(now + 0.5).action == OVER_BUDGET


def test_a_channel_out_of_the_ledger_leaves_the_slot_as_the_only_hint(rig):
    """A web side that does not keep the ledger: what the slot shows is timed (never a
    broken protocol: the worker cannot tell what was sent), and once every such channel is
    gone the process is judged on the ledger again after it settles."""
    ours, _ = rig.channel(adopt=False)
    now = time.monotonic() + 1.0     # past the adoption wait
    rig.slot.values = (True, 3, now, 0.0, new_call_id())
    assert rig.look(now) is None and rig.look(now + 1.0) is None
    assert rig.look(now + 2.1) is None
    verdict = rig.look(now + 2.12)
    assert verdict.action == TIMED_OUT and verdict.call_id == ""   # an id it wrote is not named
    ours.close()
    rig.witness.sweep()
    rig.slot.values = (False, 3, now, now + 0.5, "")
    assert rig.look(now + 3.0) is None      # settles: no call shown
    assert rig.watch.settled and rig.watch.served_base == 3
    rig.slot.values = (True, 3, now, now + 0.5, "")
    assert rig.look(now + 3.1) is None
    assert rig.look(now + 3.7).action == BROKE_PROTOCOL


def test_whether_a_call_was_taken_is_read_from_its_channel(rig):
    ours, entry = rig.channel()
    call_id = new_call_id()
    entry.sent(call_id, time.monotonic() + QUEUE_WAIT_S, 2.0)
    ours.sendall(frame_of(call_id))
    assert not rig.witness.started(call_id)
    rig.process[0].recv(4096)        # the process reads it
    assert rig.witness.started(call_id)


# -- a real serve, with today's web threads ---------------------------------------------------

def _pids(server, name: str, count: int = 1) -> list[int]:
    return wait_for(lambda: list(container_processes(server.data, name)) if
                    len(container_processes(server.data, name)) >= count else None,
                    30, f"{name} has no process")


def _cpu(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except psutil.NoSuchProcess:
        return None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_forged_slot_does_not_stop_the_timeout_or_forge_a_log_line(server, pkg):
    server.deploy(pkg("slotforger", name="forger-http"))
    assert server.invoke("forger-http/echo", 1).status_code == 200
    pid, = _pids(server, "forger-http")
    samples: list[float] = []
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            used = _cpu(pid)
            if used is None:
                return
            samples.append(used)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    before = _cpu(pid)
    started = time.monotonic()
    sampler.start()
    try:
        answer = server.invoke("forger-http/forge_and_spin", {})
    finally:
        elapsed = time.monotonic() - started
        sampling.set()
        sampler.join()
    # Past its timeout (today's web thread gives up at queue time + timeout + 2 s and the
    # worker kills the process), or past its CPU budget where the kernel holds it (RLIMIT_CPU,
    # set from outside), whichever comes first: the slot stops neither.
    error = answer.json()["error"]
    assert answer.status_code == 504 or (
        answer.status_code == 502 and "cpu time limit" in error["message"]), answer.text
    # Its CPU over the window: no more than its one-CPU quota lets it take, then nothing.
    assert samples and max(samples) - before < elapsed * 1.1 + 0.5, (samples, elapsed)
    wait_for(lambda: _gone(pid), 10, "the forging process was never killed")
    path = f"/api/invocations/{answer.json()['invocation_id']}"
    record = wait_for(lambda: server.api("GET", path).json().get("status"), 10,
                      "the call left no record")
    assert record == ("timed_out" if answer.status_code == 504 else "crashed")
    assert FORGED_LINE not in server.log_path.read_text()
    assert server.invoke("forger-http/echo", "again").json() == "again"


def test_rm_ends_a_version_within_its_drain_grace_whatever_it_claims(server, pkg):
    """The function leaves a thread burning behind a slot that claims a call forever, and
    ignores both the shutdown frame and SIGTERM."""
    server.deploy(pkg("slotforger", name="forger-rm"))
    answer = server.invoke("forger-rm/forge_after_return", {"resist": True})
    assert answer.status_code == 200, answer.text
    pids = _pids(server, "forger-rm")
    server.cli("rm", "forger-rm")
    grace = 2 + 5       # timeout_s + 5
    # The worker hears of it within a heartbeat (2 s), then drains for at most the grace and
    # kills what is left; what resists it would run for ever (the deadline is for a busy host).
    wait_for(lambda: all(_gone(pid) for pid in pids) and
             not container_processes(server.data, "forger-rm"),
             grace + 30, "the version's processes outlived its drain grace")
    assert FORGED_LINE not in server.log_path.read_text()


# -- a real serve, with a web thread that keeps the call ledger --------------------------------

class LedgerCaller:
    """A web thread as app/direct_calls.py is with the call ledger: it fetches its channels
    from the worker, adopts its lines, marks each call before it goes down its channel and
    each answer once it came (or once it gave up, before it asks the worker what became of
    the call)."""

    def __init__(self, server, container: str):
        with sqlite3.connect(server.data / "dockyard.db") as db:
            self.address = db.execute("SELECT address FROM workers WHERE state = 'up'"
                                      ).fetchone()[0]
            self.version_id = db.execute("SELECT active_version_id FROM containers WHERE "
                                         "name = ?", [container]).fetchone()[0]
        self.connections = WorkerConnections(server.worker_token)
        self.processes: list = []
        self.page: PoolPage | None = None
        self.fetch()

    def fetch(self) -> None:
        self.close()
        reply, fds = self.connections.request_fds(
            self.address, {"type": Frame.CHANNELS, "version_id": self.version_id}, 10)
        assert reply.get("children"), reply
        self.agent = reply["agent"]
        self.epoch = reply["epoch"]
        self.page = PoolPage(fds[0])
        for i, child in enumerate(reply["children"]):
            fd, slot_fd = fds[1 + 2 * i], fds[2 + 2 * i]
            entry = self.page.entry(fd)
            assert entry is not None, "no ledger line for the channel"
            self.processes.append((child["number"], FrameSocket(socket.socket(fileno=fd)),
                                   Slot(slot_fd, readonly=True), entry))

    def call(self, function: str, event=None, timeout: float = 2.0) -> dict:
        if self.page.read() != (self.epoch, True):
            self.fetch()
        number, channel, _, entry = self.processes[0]
        call_id = new_call_id()
        sent = time.monotonic()
        frame = {"type": Frame.INVOKE, "id": call_id, "invocation_id": call_id,
                 "function": function, "event": event, "start_by": sent + QUEUE_WAIT_S,
                 "timeout": timeout}
        budget = QUEUE_WAIT_S + timeout + 2.0
        why = None
        entry.sent(call_id, sent + QUEUE_WAIT_S, timeout)
        try:
            channel.set_recv_timeout(budget)
            channel.send_by(frame, sent + SEND_WAIT_S)
            answer = channel.recv_until(sent + budget, REPLY_MAX_BYTES)
            if answer is None:
                why = "closed"
        except TimeoutError:
            why = "timeout"
        except (OSError, ValueError):
            why = "closed"
        finally:
            entry.answered()
        if why is not None:
            reply = self.connections.request(self.address, {
                "type": Frame.LOST, "agent": self.agent, "number": number, "id": call_id,
                "why": why, "timeout": timeout}, 30)
            reply["lost"] = why
        else:
            reply = translate(answer)
        reply["id"] = call_id
        return reply

    def close(self) -> None:
        for _, channel, slot, _ in self.processes:
            channel.close()
            slot.close()
        self.processes = []
        if self.page is not None:
            self.page.close()
            self.page = None


@pytest.fixture
def ledger_caller(server):
    callers = []

    def make(container: str) -> LedgerCaller:
        caller = LedgerCaller(server, container)
        callers.append(caller)
        return caller

    yield make
    for caller in callers:
        caller.close()


def _log_since(server, offset: int) -> str:
    return server.log_path.read_text()[offset:]


def test_honest_calls_are_never_taken_for_forgeries(server, pkg, ledger_caller):
    server.deploy(pkg("slotforger", name="forger-honest"))
    caller = ledger_caller("forger-honest")
    pid, = _pids(server, "forger-honest")
    for n in range(200):
        reply = caller.call("echo", n)
        assert reply["status"] == Status.SUCCEEDED and reply["result"] == n, reply
    time.sleep(1.0)     # more than a claim must stand (VIOLATION_S) to be acted on
    assert list(container_processes(server.data, "forger-honest")) == [pid]
    assert caller.call("echo", "last")["result"] == "last"


def test_a_forged_slot_is_timed_out_from_when_the_call_was_sent(server, pkg, ledger_caller):
    server.deploy(pkg("slotforger", name="forger-spin"))
    caller = ledger_caller("forger-spin")
    pid, = _pids(server, "forger-spin")
    offset = len(server.log_path.read_text())
    before = _cpu(pid)
    started = time.monotonic()
    reply = caller.call("forge_and_spin", {}, timeout=2.0)
    elapsed = time.monotonic() - started
    assert reply["status"] == Status.TIMED_OUT, reply
    # Killed at its timeout as its web thread measured it (the process went, closing the
    # channel), not left to the web thread's backstop (which gives up on a channel still open).
    assert reply["lost"] == "closed" and elapsed >= 2.0, (reply, elapsed)
    wait_for(lambda: _gone(pid), 5, "the forging process was never killed")
    log = _log_since(server, offset)
    assert f"{reply['id']} forger-spin@" in log and "timed out after 2.0s" in log, log
    assert FORGED_LINE not in log
    assert before is not None and reply["id"] not in ("", None)


def test_a_thread_burning_behind_a_forged_slot_is_stopped(server, pkg, ledger_caller):
    """The attack as reported: the call returns, a thread keeps the slot showing a call with
    a moving start and burns CPU. The slot claims a call nobody sent: the process goes."""
    server.deploy(pkg("slotforger", name="forger-burn"))
    caller = ledger_caller("forger-burn")
    pid, = _pids(server, "forger-burn")
    offset = len(server.log_path.read_text())
    assert caller.call("forge_after_return", {})["result"] == "returned"
    samples = []

    def dead():
        samples.append(_cpu(pid))
        return _gone(pid)

    wait_for(dead, 10, "the process burning behind a forged slot was never stopped")
    used = max(s for s in samples if s is not None)
    assert used < 4.0, samples      # CPU over the whole window stays bounded
    log = _log_since(server, offset)
    assert "broke the slot protocol" in log and "none was sent to it" in log, log
    assert FORGED_LINE not in log


def test_over_http_a_thread_burning_behind_a_forged_slot_is_stopped(server, pkg):
    """The attack as reported, through the real web side (app/direct_calls.py keeps the call
    ledger): the call returns, a thread keeps the slot busy with a moving start and burns; the
    worker, which knows no call was sent, kills the process as a protocol breaker."""
    server.deploy(pkg("slotforger", name="forger-burn-http"))
    assert server.invoke("forger-burn-http/echo", 1).status_code == 200
    pid, = _pids(server, "forger-burn-http")
    offset = len(server.log_path.read_text())
    answer = server.invoke("forger-burn-http/forge_after_return", {})
    assert answer.status_code == 200 and answer.json() == "returned", answer.text
    wait_for(lambda: _gone(pid), 10, "the process burning behind a forged slot was never stopped")
    log = _log_since(server, offset)
    assert "broke the slot protocol" in log, log
    assert FORGED_LINE not in log
    assert server.invoke("forger-burn-http/echo", "again").json() == "again"


@pytest.mark.parametrize("function, why", [
    ("forge_served", "calls served; 1 were sent to it"),
    ("forge_stranger", "names a call in hand that was not sent to it"),
])
def test_a_slot_claiming_calls_nobody_sent_kills_the_process(server, pkg, ledger_caller,
                                                             function, why):
    name = f"forger-{function.split('_')[1]}"
    server.deploy(pkg("slotforger", name=name))
    caller = ledger_caller(name)
    pid, = _pids(server, name)
    offset = len(server.log_path.read_text())
    reply = caller.call(function, {"seconds": 30})
    if function == "forge_stranger":
        # It claimed a stranger's call while its own was in hand: killed mid-call.
        assert reply["status"] == Status.CRASHED and "slot protocol" in \
            reply["error"]["message"], reply
    else:
        assert reply["result"] == "forged", reply
    wait_for(lambda: _gone(pid), 5, "the process was never killed for its slot")
    log = _log_since(server, offset)
    assert "broke the slot protocol: its slot" in log and why in log, log
    assert _answered_by_a_fresh_process(caller) == "fresh"


def _answered_by_a_fresh_process(caller: LedgerCaller) -> str:
    """A call answered once the pool has replaced the process (a call that reached the
    killed one first is answered not_running, as a web thread would relay it)."""
    def attempt():
        try:
            caller.fetch()
        except AssertionError:      # none running yet
            return None
        return caller.call("echo", "fresh").get("result")
    return wait_for(attempt, 20, "no process took a call after the kill", every=0.1)


def test_a_start_failure_cannot_forge_a_line_of_the_workers_log(server, pkg):
    forged = "WARNING dockyard.worker: admin token rotated by loadforger"
    record = server.deploy(pkg("loadforger", name="forger-load"), expect="failed")
    assert "cannot load" in str(record["deployment_detail"])
    said = wait_for(lambda: [line for line in server.log_path.read_text().splitlines()
                             if "forger-load@" in line and "giving up: " in line], 30,
                    "the load error was never logged")
    # The worker's line says the error's first line and where the rest is; what the function
    # wrote after it is in the deployment's record, never a line of the log (nor in one).
    assert all(line.endswith("more lines: dockyard deployments forger-load)") for line in said)
    assert not [line for line in server.log_path.read_text().splitlines() if forged in line]
    assert forged in str(record["deployment_detail"])

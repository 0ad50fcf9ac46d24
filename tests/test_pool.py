"""Unit tests of the pool with dummy children: every start outcome (ready, cannot import,
dies while starting, exits right after ready, the spec itself cannot be built), replacement
with backoff, routing to the least busy child, queueing, scale to zero, stop and drain."""

from __future__ import annotations

import itertools
import re
import threading
import time
import types
from dataclasses import dataclass

import pytest

from dockyard.runner import pool as pool_module
from dockyard.runner.pool import Pool, PoolFailed
from dockyard.runner.process import LoadError, StartError
from dockyard.runner.states import ProcessState
from dockyard.sandbox.isolation import IsolationError

BACKOFF = (0.001, 0.002, 0.003, 0.004, 0.005)
SPEC = types.SimpleNamespace(what="demo@1")
_pids = itertools.count(1000)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll until `predicate()` holds; the timeout only keeps a broken test from hanging."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


@dataclass
class Plan:
    """How one dummy child behaves."""

    start_error: Exception | None = None     # start() raises this
    boot: threading.Event | None = None      # start() blocks until this is set
    gate: threading.Event | None = None      # invoke() blocks until this is set
    invoke_ms: float = 0.0                   # invoke() takes this long
    die_after_start_ms: float | None = None  # exits on its own this long after ready


class DummyChild:
    """Stands in for process.Child: same attributes the pool reads, no process."""

    def __init__(self, spec, generation: int, on_exit, plan: Plan, events: list):
        self.spec = spec
        self.generation = generation
        self.on_exit = on_exit
        self.plan = plan
        self.events = events
        self.pid = next(_pids)
        self.number = self.pid
        self.slot = None            # no direct channel: every call comes through the pool
        self.cpu_budget = None
        self.settled_served = 0
        self.state = None
        self.in_flight = 0
        self.served = 0
        self.last_used = time.monotonic()
        self.calls: list[dict] = []
        self.stopped = False
        self.exited_unnoticed = False
        self._exited = False
        self._lock = threading.Lock()

    def direct_state(self):
        return False, 0, 0.0, 0.0, ""

    @property
    def served_total(self) -> int:
        return self.served

    @property
    def last_active(self) -> float:
        return self.last_used

    def start(self) -> None:
        self.state = ProcessState.STARTING
        self.events.append(("start", self.pid))
        if self.plan.boot is not None:
            assert self.plan.boot.wait(5), "the test never let this child finish booting"
        if self.plan.start_error is not None:
            self.state = ProcessState.EXITED
            raise self.plan.start_error
        self.state = ProcessState.RUNNING
        if self.plan.die_after_start_ms is not None:
            threading.Timer(self.plan.die_after_start_ms / 1000, self.die).start()

    def over_cpu_budget(self) -> bool:
        return False

    def alive(self) -> bool:
        if self.exited_unnoticed:
            self.die()
        return not self._exited

    def invoke(self, frame: dict, timeout: float) -> dict:
        self.calls.append(frame)
        if self.plan.gate is not None:
            assert self.plan.gate.wait(5), "the test never released this call"
        time.sleep(self.plan.invoke_ms / 1000)
        self.served += 1
        self.last_used = time.monotonic()
        self.events.append(("done", self.pid))
        return {"status": "succeeded", "result": {"pid": self.pid, "x": frame.get("x")}}

    def stop(self, grace: float) -> None:
        self.stopped = True
        self.events.append(("stop", self.pid))
        self.die()

    def die(self) -> None:
        """Exit and tell the pool once, as a real child does when its death is noticed."""
        with self._lock:
            if self._exited:
                return
            self._exited = True
            self.state = ProcessState.EXITED
        self.on_exit(self)


class Children:
    """Replaces pool.Child: each child made gets the next plan (then the default one)."""

    def __init__(self):
        self.plans: list[Plan] = []
        self.default = Plan()
        self.created: list[DummyChild] = []
        self.events: list = []

    def plan(self, *plans: Plan) -> None:
        self.plans.extend(plans)

    def __call__(self, spec, generation, on_exit) -> DummyChild:
        plan = self.plans.pop(0) if self.plans else self.default
        child = DummyChild(spec, generation, on_exit, plan, self.events)
        self.created.append(child)
        return child


@pytest.fixture
def children(monkeypatch) -> Children:
    made = Children()
    monkeypatch.setattr(pool_module, "Child", made)
    monkeypatch.setattr(pool_module, "BACKOFF_S", BACKOFF)
    monkeypatch.setattr(pool_module, "MIN_UPTIME_S", 0.0)
    return made


@pytest.fixture
def make_pool(children):
    pools = []

    def make(instances: int = 1, concurrency: int = 1, make_spec=lambda: SPEC):
        failures: list[str] = []
        pool = Pool("demo@1", make_spec, instances, concurrency, failures.append)
        pool.failures = failures
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.stop(grace=0.1)


class NoThread:
    """A Thread that cannot start, as when the process has run out of threads."""

    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        raise RuntimeError("can't start new thread")


NO_THREADS = types.SimpleNamespace(Thread=NoThread, Condition=threading.Condition)


def call(pool: Pool, x=None, queue_wait: float = 5.0) -> dict:
    return pool.invoke({"id": "c", "x": x}, timeout=5.0, queue_wait=queue_wait)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, out


# -- a spec that cannot be built ------------------------------------------------------------

def _no_network():
    raise IsolationError("this version sets network = false, but unshare is not installed")


def test_spec_that_raises_isolation_error_refuses_the_version(make_pool, children):
    pool = make_pool(instances=2, make_spec=_no_network)
    with pytest.raises(PoolFailed, match="network = false"):
        pool.start()
    assert "network = false" in pool.failed
    assert len(pool.failures) == 1 and "network = false" in pool.failures[0]
    assert pool.starting == 0
    assert children.created == [] and pool.children == []
    reply = call(pool)
    assert reply["status"] == "failed" and "network = false" in reply["error"]["message"]


def test_any_error_from_make_spec_refuses_the_version(make_pool, children):
    def broken():
        raise ValueError("no venv for this version")

    pool = make_pool(instances=1, make_spec=broken)
    with pytest.raises(PoolFailed, match="no venv"):
        pool.start()
    assert "ValueError: no venv" in pool.failed
    assert pool.failures == [pool.failed]
    assert pool.starting == 0


def test_spec_error_on_first_call_of_a_scaled_to_zero_pool(make_pool, children):
    pool = make_pool(instances=0, make_spec=_no_network)
    pool.start()
    reply = call(pool)
    assert reply["status"] == "failed" and "network = false" in reply["error"]["message"]
    assert wait_until(lambda: len(pool.failures) == 1)
    assert pool.starting == 0
    assert call(pool)["status"] == "failed"  # refused, not retried
    assert len(pool.failures) == 1 and children.created == []


def test_spec_error_while_replacing_a_dead_child_fails_the_pool(make_pool, children):
    specs = iter([SPEC])

    def spec_once():
        try:
            return next(specs)
        except StopIteration:
            _no_network()

    pool = make_pool(instances=1, make_spec=spec_once)
    pool.start()
    children.created[0].die()
    assert wait_until(lambda: len(pool.failures) == 1)
    assert "network = false" in pool.failed and pool.failures == [pool.failed]
    assert wait_until(lambda: pool.starting == 0)
    assert len(children.created) == 1 and pool.children == []


# -- start failures ---------------------------------------------------------------------------

def test_load_error_fails_the_pool_without_restart(make_pool, children):
    children.default = Plan(start_error=LoadError("ImportError: No module named 'nope'"))
    pool = make_pool(instances=1)
    with pytest.raises(LoadError):
        pool.start()
    assert "cannot be loaded" in pool.failed and "nope" in pool.failed
    assert pool.failures == [pool.failed]
    assert pool.starting == 0
    assert call(pool)["status"] == "failed"
    time.sleep(0.05)  # room for a (wrong) restart to show up
    assert len(children.created) == 1


def test_load_error_on_every_instance_is_reported_once(make_pool, children):
    children.default = Plan(start_error=LoadError("SyntaxError: invalid syntax"))
    pool = make_pool(instances=3)
    with pytest.raises(LoadError):
        pool.start()
    assert len(pool.failures) == 1 and pool.starting == 0


def test_start_errors_back_off_then_give_up(make_pool, children, monkeypatch):
    monkeypatch.setattr(pool_module, "MAX_START_FAILURES", 3)
    sleeps: list[float] = []
    monkeypatch.setattr(pool_module, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=lambda s: (sleeps.append(s), time.sleep(s))))
    children.plan(Plan())
    children.default = Plan(start_error=StartError("the process exited while starting"))
    pool = make_pool(instances=1)
    pool.start()
    children.created[0].die()
    assert wait_until(lambda: len(pool.failures) == 1)
    assert "keep failing to start (3 times in a row)" in pool.failed
    assert pool.failures == [pool.failed]
    assert sleeps == list(BACKOFF[:3])  # a longer wait after each failure in a row
    assert wait_until(lambda: pool.starting == 0)
    time.sleep(0.05)
    assert len(children.created) == 1 + 3  # no more tries after giving up


def test_start_errors_on_first_call_give_up_after_max_failures(make_pool, children):
    children.default = Plan(start_error=StartError("the process exited while starting"))
    pool = make_pool(instances=0)
    pool.start()
    reply = call(pool)
    assert reply["status"] == "failed" and "keep failing to start" in reply["error"]["message"]
    assert len(children.created) == pool_module.MAX_START_FAILURES
    assert wait_until(lambda: pool.failures == [pool.failed])
    assert pool.starting == 0


def test_one_start_error_on_deploy_fails_start(make_pool, children):
    children.plan(Plan(start_error=StartError("did not become ready")))
    pool = make_pool(instances=2)
    with pytest.raises(PoolFailed, match="did not become ready"):
        pool.start()
    assert pool.starting == 0 and pool.children == []
    booted = [c for c in children.created if c.plan.start_error is None]
    assert len(booted) == 1 and booted[0].stopped  # the one that did start is not kept


def test_child_that_exits_right_after_ready_counts_as_a_failed_start(make_pool, children,
                                                                      monkeypatch):
    monkeypatch.setattr(pool_module, "MIN_UPTIME_S", 60.0)
    monkeypatch.setattr(pool_module, "MAX_START_FAILURES", 3)
    children.plan(Plan())
    children.default = Plan(die_after_start_ms=2)
    pool = make_pool(instances=1)
    pool.start()
    assert call(pool)["status"] == "succeeded"  # the first one served: it started fine
    children.created[0].die()
    assert wait_until(lambda: len(pool.failures) == 1)
    assert re.search(r"keep (dying on|failing to) start \(3 times in a row\)", pool.failed)
    assert pool.failures == [pool.failed]
    assert wait_until(lambda: pool.starting == 0)
    time.sleep(0.05)
    assert len(children.created) == 1 + 3


# -- replacing --------------------------------------------------------------------------------

def test_child_that_dies_is_replaced(make_pool, children):
    pool = make_pool(instances=2)
    pool.start()
    first, second = children.created
    first.die()
    assert wait_until(lambda: len(pool.children) == 2)
    assert first not in pool.children and second in pool.children
    assert len(children.created) == 3 and pool.starting == 0
    assert children.created[2].generation == first.generation
    assert pool.failed is None


def test_child_that_died_while_idle_is_noticed_and_replaced(make_pool, children):
    pool = make_pool(instances=1)
    pool.start()
    children.created[0].exited_unnoticed = True
    pool.check()
    assert wait_until(lambda: len(pool.children) == 1 and len(children.created) == 2)
    assert call(pool)["result"]["pid"] == children.created[1].pid


def test_failed_thread_start_on_first_call_restores_the_counter(make_pool, children,
                                                                monkeypatch):
    pool = make_pool(instances=0)
    pool.start()
    monkeypatch.setattr(pool_module, "threading", NO_THREADS)
    reply = call(pool)
    assert reply["status"] == "unavailable"
    assert "can't start new thread" in reply["error"]["message"]
    assert pool.starting == 0
    monkeypatch.setattr(pool_module, "threading", threading)
    assert call(pool, x=1)["status"] == "succeeded"


def test_failed_thread_start_on_deploy_raises_and_restores_the_counter(make_pool, children,
                                                                       monkeypatch):
    monkeypatch.setattr(pool_module, "threading", NO_THREADS)
    pool = make_pool(instances=2)
    with pytest.raises(PoolFailed, match="can't start new thread"):
        pool.start()
    assert pool.starting == 0


# -- calls ------------------------------------------------------------------------------------

def test_invoke_picks_the_least_busy_child(make_pool, children):
    gate = threading.Event()
    children.default = Plan(gate=gate)
    pool = make_pool(instances=2, concurrency=2)
    pool.start()
    a, b = children.created
    first, _ = in_thread(call, pool, 1)
    assert wait_until(lambda: a.in_flight + b.in_flight == 1)
    second, _ = in_thread(call, pool, 2)
    assert wait_until(lambda: a.in_flight + b.in_flight == 2)
    assert (a.in_flight, b.in_flight) == (1, 1)  # not both on the first child
    gate.set()
    for thread in (first, second):
        thread.join(5)
    assert len(a.calls) == len(b.calls) == 1
    assert pool.busy() == 0


def test_full_pool_answers_unavailable_after_queue_wait(make_pool, children):
    gate = threading.Event()
    children.default = Plan(gate=gate)
    pool = make_pool(instances=1, concurrency=1)
    pool.start()
    busy, out = in_thread(call, pool, 1)
    assert wait_until(lambda: pool.busy() == 1)
    reply = call(pool, 2, queue_wait=0.05)
    assert reply["status"] == "unavailable" and reply["error"]["type"] == "Unavailable"
    gate.set()
    busy.join(5)
    assert out["value"]["status"] == "succeeded"
    assert len(children.created) == 1 and pool.starting == 0


def test_waiting_call_gets_the_slot_when_it_frees(make_pool, children):
    children.default = Plan(invoke_ms=20)
    pool = make_pool(instances=1, concurrency=1)
    pool.start()
    threads = [in_thread(call, pool, n) for n in range(3)]
    for thread, _ in threads:
        thread.join(5)
    assert [out["value"]["status"] for _, out in threads] == ["succeeded"] * 3
    assert len(children.created) == 1


def test_zero_instances_start_one_child_on_first_call(make_pool, children):
    pool = make_pool(instances=0)
    pool.start()
    assert children.created == []
    reply = call(pool, "hi")
    assert reply["status"] == "succeeded" and reply["result"]["x"] == "hi"
    assert len(children.created) == 1 and pool.starting == 0
    assert call(pool)["result"]["pid"] == children.created[0].pid  # kept warm, reused


def test_idle_on_demand_child_is_stopped(make_pool, children):
    pool = make_pool(instances=0)
    pool.start()
    call(pool)
    pool.stop_idle(idle_ttl=0.0)
    assert pool.children == [] and children.created[0].stopped
    call(pool)
    assert len(children.created) == 2


# -- stopping ---------------------------------------------------------------------------------

def test_stop_while_a_child_is_booting_does_not_keep_it(make_pool, children):
    boot = threading.Event()
    children.plan(Plan(boot=boot))
    pool = make_pool(instances=0)
    pool.start()
    caller, reply = in_thread(call, pool)
    assert wait_until(lambda: len(children.created) == 1 and pool.starting == 1)
    stopper, _ = in_thread(pool.stop, 2.0)
    assert wait_until(lambda: not pool.accepting)
    boot.set()
    stopper.join(5)
    caller.join(5)
    booted = children.created[0]
    assert booted.stopped and pool.children == [] and pool.starting == 0
    assert reply["value"]["status"] == "not_running"
    assert pool.failed is None and pool.failures == []
    assert len(children.created) == 1  # and no replacement for it


def test_start_failure_after_stop_is_not_reported(make_pool, children):
    boot = threading.Event()
    children.plan(Plan(boot=boot, start_error=LoadError("ImportError: gone")))
    pool = make_pool(instances=0)
    pool.start()
    caller, _ = in_thread(call, pool)
    assert wait_until(lambda: pool.starting == 1)
    stopper, _ = in_thread(pool.stop, 2.0)
    assert wait_until(lambda: not pool.accepting)
    boot.set()
    stopper.join(5)
    caller.join(5)
    assert pool.failed is None and pool.failures == [] and pool.starting == 0


def test_drain_and_stop_waits_for_in_flight_calls(make_pool, children):
    children.default = Plan(invoke_ms=100)
    pool = make_pool(instances=1)
    pool.start()
    child = children.created[0]
    caller, out = in_thread(call, pool, "last")
    assert wait_until(lambda: pool.busy() == 1)
    pool.drain_and_stop(grace=5.0, quiet=0.01)
    caller.join(5)
    assert out["value"]["status"] == "succeeded"
    assert children.events[-2:] == [("done", child.pid), ("stop", child.pid)]
    assert call(pool)["status"] == "not_running"
    time.sleep(0.02)
    assert len(children.created) == 1  # a stopped pool replaces nothing

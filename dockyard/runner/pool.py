"""The processes of one version: starts `instances` children (or none, to start on the first
call), hands each call to the least busy one, replaces children that die (with backoff, giving
up when they keep dying on start), and drains then stops them all on redeploy."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Callable

from ..common.direct import PoolPage
from ..common.protocol import Status
from ..sandbox.isolation import IsolationError
from .process import QUEUE_WAIT_S, Child, ChildSpec, LoadError, StartError
from .states import ProcessState

log = logging.getLogger("dockyard.pool")

COLD_START_WAIT_S = 60.0
BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
MAX_START_FAILURES = 5
# A child that exits sooner than this after becoming ready, having served nothing, counts as
# a failed start: otherwise a process that dies right after its ready frame restarts forever.
MIN_UPTIME_S = 1.0
STOP_GRACE_S = 5.0
# Processes that left the pool, kept a while for a web process asking what became of its call.
GONE_KEPT = 32
# A process handed a call is given this long to read it, past the end of the call's wait for a
# free process: a process that frees up just before then takes the call.
TAKE_S = 0.25
# How often a call waiting for a process that has not read its request socket looks again
# (nothing tells the pool when such a process reads it).
BLOCKED_LOOK_S = 0.02


class PoolFailed(Exception):
    pass


# Every pool not yet stopped, draining ones included: the watchdog times their direct calls,
# and a web thread's `lost` or a cancel finds their processes, whatever version now holds
# their version id.
_live: set["Pool"] = set()
_live_lock = threading.Lock()


# Processes that left their pool (or whose pool stopped), kept a while by number: a web
# thread's `lost` about one may come after its pool is gone.
_recent: dict[int, Child] = {}
RECENT_KEPT = 256


def live_pools() -> list["Pool"]:
    with _live_lock:
        return list(_live)


def _remember(children) -> None:
    with _live_lock:
        for child in children:
            _recent[child.number] = child
        while len(_recent) > RECENT_KEPT:
            _recent.pop(next(iter(_recent)))


def find_child(number: int) -> Child | None:
    """The process numbered `number` (numbers are unique in this worker's run): in a pool not
    yet stopped, or recently gone."""
    for pool in live_pools():
        child = pool.find(number)
        if child is not None:
            return child
    with _live_lock:
        return _recent.get(number)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def one_line(text) -> str:
    """`text` fit for one line of the worker's log: a start failure carries what the function
    wrote (its load error's traceback, its last stderr), which must not read as lines of the
    worker's own."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


def _reply(status: str, message: str, error_type: str) -> dict:
    return {"status": status, "error": {"type": error_type, "message": message}}


def busy_reply(what: str) -> dict:
    """Every process stayed busy for the call's queue time: it did not run. `busy` marks it
    for the control plane, which answers it 429 (as process.not_started)."""
    reply = _reply(Status.UNAVAILABLE, f"all instances of {what} are busy; retry shortly or "
                   "raise `instances`/`concurrency`", "Unavailable")
    reply["error"]["busy"] = True
    return reply


def _direct_call(child: Child) -> str | None:
    """The id of the call a web process sent this process directly and it has in hand, if
    there is one (see Child.direct_state)."""
    busy, _, _, _, call_id = child.direct_state()
    return call_id if busy and call_id else None


def _spawn(target: Callable, *args) -> RuntimeError | None:
    """Run `target` in a daemon thread; the error when no thread can be started."""
    try:
        threading.Thread(target=target, args=args, daemon=True).start()
    except RuntimeError as exc:  # "can't start new thread"
        return exc
    return None


class Pool:
    def __init__(self, what: str, make_spec: Callable[[], ChildSpec], instances: int,
                 concurrency: int, on_failed: Callable[[str], None]):
        self.what = what
        self.make_spec = make_spec
        self.instances = instances
        self.concurrency = max(1, concurrency)
        self.max_instances = max(1, instances)
        self.on_failed = on_failed
        self.children: list[Child] = []
        self.ready_at: dict[Child, float] = {}
        self.starting = 0           # starts under way; every path that adds one takes it back
        self.generation = 0
        self.accepting = True
        self.failed: str | None = None
        self.start_failures = 0     # failed starts in a row (early deaths included)
        self.retry_at = 0.0         # no new start before this (monotonic), after a failure
        self.cond = threading.Condition()
        # One-at-a-time processes take calls straight from web processes too (direct
        # channels): the page tells those when the set of processes changes.
        self.page = PoolPage() if self.concurrency == 1 else None
        self.direct_open = True     # web threads may call straight (closed when it drains)
        self.epoch = 0
        self.gone: dict[int, Child] = {}
        self.call_timeout: float | None = None     # the version's timeout_s (the watchdog's)
        with _live_lock:
            _live.add(self)

    def _changed(self) -> None:
        """The set of processes (or whether the pool takes calls) changed; lock held."""
        self.epoch += 1
        if self.page is not None:
            self.page.set(self.epoch, self._takes_direct)

    @property
    def _takes_direct(self) -> bool:
        """Whether web threads may send calls straight to the processes."""
        return self.accepting and self.direct_open and not self.failed

    def _forget(self, child: Child) -> None:
        """Take a process out of the pool; lock held."""
        if child in self.children:
            self.children.remove(child)
            self.gone[child.number] = child
            while len(self.gone) > GONE_KEPT:
                self.gone.pop(next(iter(self.gone)))
            self._changed()

    # -- starting -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the configured instances and wait until they are ready. Raises LoadError
        (the code does not import) or PoolFailed (with the reason the pool gave up, when it
        did)."""
        self.generation += 1
        if self.instances == 0:
            return
        errors: list[BaseException] = []
        with self.cond:
            self.starting += self.instances
        threads = []
        for _ in range(self.instances):
            thread = threading.Thread(target=self._start_one, args=(errors,), daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:
                with self.cond:
                    self.starting -= self.instances - len(threads)
                    self.cond.notify_all()
                errors.append(exc)
                break
            threads.append(thread)
        for thread in threads:
            thread.join()
        if errors:
            self.stop(grace=1.0)
            load = [e for e in errors if isinstance(e, LoadError)]
            if load:
                raise load[0]
            raise PoolFailed(self.failed or str(errors[0])) from errors[0]

    def _start_one(self, errors: list | None = None) -> Child | None:
        """Start one child whose place the caller has already counted in `starting`."""
        child: Child | None = None
        prepared = started = kept = False
        failure: Exception | None = None
        reason: str | None = None
        try:
            try:
                child = Child(self.make_spec(), self.generation, self._child_exited)
                child.ledger_page = self.page   # where its web threads write their calls
                prepared = True
                child.start()
                started = True
            except Exception as exc:  # noqa: BLE001 - any start failure counts
                failure = exc
            if started:
                with self.cond:
                    if child.state is ProcessState.EXITED:
                        # Its exit was reported before it was added: not started after all.
                        failure = StartError("the process exited as soon as it was ready")
                    elif self.accepting and not self.failed:
                        self.children.append(child)
                        self.ready_at[child] = time.monotonic()
                        self._changed()
                        kept = True
                if not kept and failure is None:
                    # Stopped (or given up) while this one was booting: do not keep it. Still
                    # counted in `starting`, so a stop() waiting for starts waits for this too.
                    child.stop(grace=1.0)
        finally:
            with self.cond:
                self.starting -= 1
                if failure is not None:
                    # Judged in the same lock as the counter, so no waiting call sees the
                    # start gone without also seeing the failure (and starts another at once).
                    reason = self._judge_start_failure(failure, prepared)
                    if reason:
                        self.failed = reason
                        self._changed()
                self.cond.notify_all()
        if failure is not None and not (reason and isinstance(failure, LoadError)):
            # (A load error is told once, with the giving up below.)
            log.warning("%s: a process failed to start: %s", self.what,
                        self._first_line(failure))
        if failure is not None:
            if errors is not None:
                errors.append(failure)
            if reason:
                self._report_failed(reason)
        return child if kept else None

    def _judge_start_failure(self, exc: Exception, prepared: bool) -> str | None:
        """Count a failed start (lock held). Returns why the pool gives up, if it does."""
        if not self.accepting or self.failed:
            return None  # stopped meanwhile, or already given up: nothing more to report
        if not prepared:
            # The spec (or the child around it) cannot be built: the same next time.
            if isinstance(exc, IsolationError):
                return f"this host cannot isolate it as its manifest asks: {exc}"
            return f"its processes cannot be prepared: {type(exc).__name__}: {exc}"
        if isinstance(exc, LoadError):
            return f"the code cannot be loaded: {exc}"
        self._count_start_failure()
        if self.start_failures >= MAX_START_FAILURES:
            return (f"its processes keep failing to start ({self.start_failures} times in a "
                    f"row): {exc}")
        return None

    def _count_start_failure(self) -> None:
        self.start_failures += 1
        delay = BACKOFF_S[min(self.start_failures, len(BACKOFF_S) - 1)]
        self.retry_at = max(self.retry_at, time.monotonic() + delay)

    def _first_line(self, text) -> str:
        """A start failure's first line, escaped, and where the rest is: the rest is what the
        function wrote (its traceback), for its deployment's record, never lines of this log."""
        first, _, rest = str(text).strip().partition("\n")
        return one_line(first)[:500] + (f" (and {rest.count(chr(10)) + 1} more lines: dockyard "
                                  f"deployments {self.what.partition('@')[0]})" if rest else "")

    def _report_failed(self, reason: str) -> None:
        log.warning("%s: giving up: %s", self.what, self._first_line(reason))
        log.debug("%s: giving up: %s", self.what, one_line(reason))
        try:
            self.on_failed(reason)
        except Exception:  # noqa: BLE001 - runs in pool threads, nobody else would see it
            log.exception("%s: reporting the failure failed", self.what)

    def _child_exited(self, child: Child) -> None:
        now = time.monotonic()
        reason = None
        with self.cond:
            ready_at = self.ready_at.pop(child, None)
            ours = child in self.children
            self._forget(child)
            early = (ready_at is not None and now - ready_at < MIN_UPTIME_S
                     and child.served_total == 0 and child.in_flight == 0)
            if early and ours and self.accepting and not self.failed:
                self._count_start_failure()
                if self.start_failures >= MAX_START_FAILURES:
                    reason = self.failed = (f"its processes keep dying on start "
                                            f"({self.start_failures} times in a row)")
                    self._changed()
            elif ready_at is not None and not early:
                self.start_failures = 0  # it lived: earlier failures are history
            self.cond.notify_all()
            replace = self.accepting and not self.failed and (
                len(self.children) + self.starting < self.instances)
        if reason:
            self._report_failed(reason)
        if replace:
            error = _spawn(self._replace)
            if error is not None:
                # The next call starts one on demand instead.
                log.warning("%s: cannot replace a process now: %s", self.what, error)

    def _replace(self) -> None:
        """Start a child in place of one that died, after a backoff that grows with the
        failed starts in a row (at MAX_START_FAILURES of them the pool has given up)."""
        while True:
            with self.cond:
                if not self.accepting or self.failed:
                    return
                failures = self.start_failures
            time.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
            with self.cond:
                if not self.accepting or self.failed or (
                        len(self.children) + self.starting >= self.instances):
                    return
                self.starting += 1
            if self._start_one() is not None:
                return

    # -- calls ----------------------------------------------------------------------------

    def invoke(self, frame: dict, timeout: float, queue_wait: float = QUEUE_WAIT_S) -> dict:
        """Run a call on a free process, waiting up to `queue_wait` for one (and for a fenced
        call, until TAKE_S before its start-by); all busy until then: the busy reply."""
        fenced = frame.get("start_by")
        if fenced is not None:
            queue_wait = min(queue_wait, float(fenced) - time.monotonic() - TAKE_S)
        acquired = self._acquire(max(0.0, queue_wait))
        if isinstance(acquired, dict):
            return acquired
        child, deadline = acquired
        # A process waits for the call no longer than its start-by (see Child._read_reply).
        start_by = max(deadline, time.monotonic()) + TAKE_S
        frame = dict(frame, start_by=start_by if fenced is None else
                     min(start_by, float(fenced)))
        try:
            reply = child.invoke(frame, timeout)
        finally:
            with self.cond:
                child.in_flight -= 1
                # One slot freed: wake one waiting call, not all of them.
                self.cond.notify()
        return reply

    def _acquire(self, queue_wait: float) -> tuple[Child, float] | dict:
        """A free process and the end of the call's wait for one (later than `queue_wait`
        after a cold start); the busy reply once `queue_wait` is over. A process freed just
        as the wait ends is taken: each wake-up looks for a free process before the time."""
        deadline = time.monotonic() + queue_wait
        with self.cond:
            while True:
                if self.failed:
                    return _reply(Status.FAILED, f"{self.what} failed: {self.failed}", "VersionFailed")
                if not self.accepting:
                    return _reply(Status.NOT_RUNNING, f"{self.what} is not running here",
                                  "NotRunning")
                best, best_load, blocked = None, 0, False
                for child in self.children:
                    if child.state is ProcessState.RUNNING and child.in_flight < self.concurrency:
                        if child.slot is not None and child.request_blocked():
                            blocked = True   # busy still with what an earlier call waited for
                            continue
                        # A process busy with a call sent straight to it counts as one more.
                        load = child.in_flight + (child.slot is not None and
                                                  child.direct_busy())
                        if best is None or load < best_load:
                            best, best_load = child, load
                if best is not None:
                    if not best.alive():  # died while idle: replaced; look again
                        self._forget(best)
                        continue
                    best.in_flight += 1
                    return best, deadline
                now = time.monotonic()
                wake = deadline
                if len(self.children) + self.starting < self.max_instances and not self.starting:
                    # Scaled to zero (or a child just died): start one now, or once the
                    # backoff after a failed start is over; the caller waits as a cold start.
                    deadline = wake = max(deadline, now + COLD_START_WAIT_S)
                    if now >= self.retry_at:
                        self.starting += 1
                        error = _spawn(self._start_one)
                        if error is not None:
                            self.starting -= 1
                            self.cond.notify_all()
                            return _reply(Status.UNAVAILABLE, f"{self.what} cannot start a process "
                                          f"right now ({error})", "Unavailable")
                    else:
                        wake = self.retry_at
                remaining = deadline - now
                if remaining <= 0:
                    return busy_reply(self.what)
                if blocked:
                    wake = min(wake, now + BLOCKED_LOOK_S)
                self.cond.wait(max(0.0, min(wake, deadline) - now))

    def holding(self, call_id: str) -> Child | None:
        """The live process that has the call `call_id` in hand, if any."""
        with self.cond:
            return next((c for c in [*self.children, *self.gone.values()]
                         if c.state is not ProcessState.EXITED
                         and (call_id in c.calls or _direct_call(c) == call_id)), None)

    def cancel(self, call_id: str) -> bool:
        """Kill the process running the call `call_id`; False if no process has it (yet)."""
        child = self.holding(call_id)
        if child is None:
            return False
        child.cancel(call_id)
        return True

    # -- stopping -------------------------------------------------------------------------

    def busy(self) -> int:
        with self.cond:
            return sum(c.in_flight + c.direct_state()[0] for c in self.children)

    def drain_and_stop(self, grace: float, quiet: float = 0.3) -> None:
        """Keep serving what arrives until nothing is in flight and nothing arrived for
        `quiet` seconds, then stop accepting and stop every child: all within `grace`,
        whatever the processes say (in flight counts what the worker measured, see
        Child.direct_state; the last part of the grace is the children's to exit in)."""
        with self.cond:
            # Straight calls stop first: a web thread then asks the worker again, which
            # relays a call still routed here (or sends it where its version id now leads).
            self.direct_open = False
            self._changed()
        end = time.monotonic() + grace
        drain_until = end - min(STOP_GRACE_S, grace / 2)
        last_busy = time.monotonic()
        while time.monotonic() < drain_until:
            if self.busy():
                last_busy = time.monotonic()
            elif time.monotonic() - last_busy >= quiet:
                break
            time.sleep(0.02)
        self.stop(grace=max(0.1, end - time.monotonic()))

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop accepting, stop every child, and wait (up to `grace`) for starts under way,
        which stop the child they were booting instead of keeping it."""
        with self.cond:
            self.accepting = False
            self._changed()
            children = list(self.children)
            self.cond.notify_all()
        threads = []
        for child in children:
            thread = threading.Thread(target=child.stop, args=(grace,), daemon=True)
            try:
                thread.start()
            except RuntimeError:
                child.stop(grace)
                continue
            threads.append(thread)
        for thread in threads:
            thread.join()
        with self.cond:
            self.cond.wait_for(lambda: self.starting == 0, timeout=grace)
            page, self.page = self.page, None
        if page is not None:
            page.close()   # web processes keep their own mapping of it, which says "closed"
        _remember([*children, *self.gone.values()])
        with _live_lock:
            _live.discard(self)

    def check(self) -> None:
        """Notice children that died while idle, so they are replaced before the next call,
        and stop those burning CPU between calls past their budget."""
        with self.cond:
            idle = [c for c in self.children if c.in_flight == 0]
        for child in idle:
            if not child.over_cpu_budget():
                child.alive()

    def watch(self, cancelled: dict) -> None:
        """The watchdog's look at the one-at-a-time processes, those that left the pool but
        still finish their calls included (see Child.watch); a call that was cancelled while
        it waited in a process's sockets is stopped as it starts."""
        if self.call_timeout is None:
            return
        now = time.monotonic()
        with self.cond:
            children = [c for c in [*self.children, *self.gone.values()]
                        if c.slot is not None and c.state is not ProcessState.EXITED]
        for child in children:
            child.watch(now, self.call_timeout, cancelled)

    def find(self, number: int) -> Child | None:
        """The process numbered `number`, in the pool or recently gone from it."""
        with self.cond:
            return next((c for c in self.children if c.number == number), None) \
                or self.gone.get(number)

    def stop_idle(self, idle_ttl: float) -> None:
        """Scale to zero: stop children of an on-demand pool that served nothing lately."""
        now = time.monotonic()
        idle = []
        with self.cond:
            for child in list(self.children):
                if len(self.children) <= self.instances:
                    break
                if (child.in_flight == 0 and not child.direct_state()[0]
                        and now - child.last_active > idle_ttl):
                    self._forget(child)
                    idle.append(child)
        for child in idle:
            if child.slot is None:
                child.stop(grace=1.0)
                continue
            # A call sent straight to it just before it left is finished first, in its own
            # thread: this runs in the worker's main loop, whose heartbeats must go on.
            grace = (self.call_timeout or 0) + 5.0
            if _spawn(child.stop, grace) is not None:
                child.stop(grace=1.0)

    # -- direct channels ------------------------------------------------------------------

    def channels(self) -> tuple[int, int, list[tuple[Child, object]]]:
        """For a web thread: a descriptor of the pool page (a copy the caller closes; -1 when
        the pool takes no direct calls), its epoch, and a new direct channel to each running
        one-at-a-time process."""
        with self.cond:
            if self.page is None or not self._takes_direct:
                return -1, 0, []
            page_fd = os.dup(self.page.fd)
            epoch = self.epoch
            children = [c for c in self.children
                        if c.state is ProcessState.RUNNING and c.slot is not None]
        out = []
        for child in children:
            try:
                out.append((child, child.channel()))
            except OSError as exc:
                log.info("%s: no direct channel: %s", child.what, exc)
        return page_fd, epoch, out

    def pids(self) -> list[int]:
        with self.cond:
            return [c.pid for c in self.children]

"""The processes of one version: starts `instances` children (or none, to start on the first
call), hands each call to the least busy one, replaces children that die (with backoff, giving
up when they keep dying on start), and drains then stops them all on redeploy."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .process import Child, ChildSpec, LoadError, StartError
from .states import ProcessState

log = logging.getLogger("dockyard.pool")

QUEUE_WAIT_S = 5.0
BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
MAX_START_FAILURES = 5
STOP_GRACE_S = 5.0


class PoolFailed(Exception):
    pass


def _reply(status: str, message: str, error_type: str) -> dict:
    return {"status": status, "error": {"type": error_type, "message": message}}


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
        self.starting = 0
        self.generation = 0
        self.accepting = True
        self.failed: str | None = None
        self.start_failures = 0
        self.cond = threading.Condition()

    # -- starting -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the configured instances and wait until they are ready. Raises LoadError
        (the code does not import) or PoolFailed."""
        self.generation += 1
        if self.instances == 0:
            return
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._start_one, args=(errors,), daemon=True)
                   for _ in range(self.instances)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop(grace=1.0)
            load = [e for e in errors if isinstance(e, LoadError)]
            raise load[0] if load else PoolFailed(str(errors[0]))

    def _start_one(self, errors: list | None = None, counted: bool = False) -> Child | None:
        if not counted:
            with self.cond:
                self.starting += 1
        child = Child(self.make_spec(), self.generation, self._child_exited)
        try:
            child.start()
        except Exception as exc:  # noqa: BLE001 - any start failure counts
            log.warning("%s: a process failed to start: %s", self.what, exc)
            with self.cond:
                self.starting -= 1
                self.start_failures += 1
                self.cond.notify_all()
            if errors is not None:
                errors.append(exc)
            if isinstance(exc, LoadError):
                self._fail(f"the code cannot be loaded: {exc}")
            elif self.start_failures >= MAX_START_FAILURES:
                self._fail(f"its processes keep failing to start: {exc}")
            return None
        with self.cond:
            self.starting -= 1
            self.start_failures = 0
            if not self.accepting:
                # Stopped while this one was booting: do not keep it.
                self.cond.notify_all()
                stale = True
            else:
                self.children.append(child)
                self.cond.notify_all()
                stale = False
        if stale:
            child.stop(grace=1.0)
            return None
        return child

    def _fail(self, reason: str) -> None:
        with self.cond:
            if self.failed:
                return
            self.failed = reason
            self.cond.notify_all()
        self.on_failed(reason)

    def _child_exited(self, child: Child) -> None:
        with self.cond:
            if child in self.children:
                self.children.remove(child)
            self.cond.notify_all()
            replace = self.accepting and not self.failed and (
                len(self.children) + self.starting < self.instances)
            failures = self.start_failures
        if replace:
            threading.Thread(target=self._replace, args=(failures,), daemon=True).start()

    def _replace(self, failures: int) -> None:
        if failures >= MAX_START_FAILURES:
            self._fail(f"its processes keep dying on start ({failures} times in a row)")
            return
        time.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
        with self.cond:
            if not self.accepting or self.failed or (
                    len(self.children) + self.starting >= self.instances):
                return
        if self._start_one() is None and self.accepting and not self.failed:
            with self.cond:
                failures = self.start_failures
            self._replace(failures)

    # -- calls ----------------------------------------------------------------------------

    def invoke(self, frame: dict, timeout: float, queue_wait: float = QUEUE_WAIT_S) -> dict:
        child = self._acquire(queue_wait)
        if isinstance(child, dict):
            return child
        try:
            reply = child.invoke(frame, timeout)
        finally:
            with self.cond:
                child.in_flight -= 1
                # One slot freed: wake one waiting call, not all of them.
                self.cond.notify()
        return reply

    def _acquire(self, queue_wait: float) -> Child | dict:
        deadline = time.monotonic() + queue_wait
        with self.cond:
            while True:
                if self.failed:
                    return _reply("failed", f"{self.what} failed: {self.failed}", "VersionFailed")
                if not self.accepting:
                    return _reply("not_running", f"{self.what} is not running here",
                                  "NotRunning")
                best = None
                for child in self.children:
                    if child.state is ProcessState.RUNNING and child.in_flight < self.concurrency:
                        if best is None or child.in_flight < best.in_flight:
                            best = child
                if best is not None:
                    if not best.alive():  # died while idle: replaced; look again
                        continue
                    best.in_flight += 1
                    return best
                if len(self.children) + self.starting < self.max_instances and not self.starting:
                    # Scaled to zero (or a child just died): start one now; the caller waits
                    # for it as a cold start.
                    deadline = max(deadline, time.monotonic() + 60.0)
                    self.starting += 1
                    threading.Thread(target=self._start_one, kwargs={"counted": True},
                                     daemon=True).start()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _reply("unavailable", f"all instances of {self.what} are busy; "
                                  "retry shortly or raise `instances`/`concurrency`",
                                  "Unavailable")
                self.cond.wait(remaining)

    # -- stopping -------------------------------------------------------------------------

    def busy(self) -> int:
        with self.cond:
            return sum(c.in_flight for c in self.children)

    def drain_and_stop(self, grace: float, quiet: float = 0.3) -> None:
        """Keep serving what arrives until nothing is in flight and nothing arrived for
        `quiet` seconds (or `grace` runs out), then stop accepting and stop every child."""
        end = time.monotonic() + grace
        last_busy = time.monotonic()
        while time.monotonic() < end:
            if self.busy():
                last_busy = time.monotonic()
            elif time.monotonic() - last_busy >= quiet:
                break
            time.sleep(0.02)
        self.stop(grace=STOP_GRACE_S)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        with self.cond:
            self.accepting = False
            children = list(self.children)
            self.cond.notify_all()
        threads = [threading.Thread(target=c.stop, args=(grace,), daemon=True) for c in children]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def check(self) -> None:
        """Notice children that died while idle, so they are replaced before the next call."""
        with self.cond:
            idle = [c for c in self.children if c.in_flight == 0]
        for child in idle:
            child.alive()

    def stop_idle(self, idle_ttl: float) -> None:
        """Scale to zero: stop children of an on-demand pool that served nothing lately."""
        now = time.monotonic()
        with self.cond:
            idle = [c for c in self.children
                    if c.in_flight == 0 and now - c.last_used > idle_ttl
                    and len(self.children) > self.instances]
            for child in idle:
                self.children.remove(child)
        for child in idle:
            child.stop(grace=1.0)

    def pids(self) -> list[int]:
        with self.cond:
            return [c.pid for c in self.children]

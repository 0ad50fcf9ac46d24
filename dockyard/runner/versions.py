"""One container version on this worker: its role (serve or standby), its build, its pool,
its state and build log as reported to the control plane."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pathlib import Path

from ..common.protocol import Role, Status
from ..common.manifest import Manifest
from ..sandbox.view import CODE as VIEW_CODE
from ..sandbox.view import VENV as VIEW_VENV
from ..sandbox.view import sandbox_spec
from .pool import Pool, one_line
from .failures import FailureMemory
from .process import ChildSpec, LoadError
from .states import VersionState, change_state
from .venvs import Builder, VersionPaths

log = logging.getLogger("dockyard.versions")

LOG_CAP = 64 * 1024
IDLE_TTL_S = 60.0

# A version that failed on this worker is served again after 5 s, then 10 s, 20 s, ... at
# most every 5 minutes, for as long as it is to serve here (a download lost, a disk full, a
# build killed, a wheel missing on this host: each can heal). A new deployment of the
# version, or another artifact under its id, starts the count over; so does a success.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0
# What no retry can change for the same content on the same host: the user's code does not
# import (the bootstrap's load error), or the host cannot isolate it as the manifest asks.
# The pool says so in these words (runner/pool.py); such a version waits for a new deployment.
FINAL_REASONS = ("import failed: ", "the code cannot be loaded: ",
                 "this host cannot isolate it")


def retry_delay(failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row (1, 2, ...)."""
    return min(RETRY_FIRST_S * 2 ** max(failures - 1, 0), RETRY_MAX_S)


class VersionRuntime:
    def __init__(self, spec: dict, builder: Builder, make_child_spec: Callable,
                 on_change: Callable[[], None], memory: FailureMemory | None = None):
        self.spec = spec
        self.memory = memory                  # failures kept across the worker's restarts
        self.version_id = spec["version_id"]
        self.manifest = Manifest.from_dict(spec["manifest"])
        self.what = f"{spec['container']}@{spec['version']}"
        self.role = spec["role"]
        self.builder = builder
        self.make_child_spec = make_child_spec
        self.on_change = on_change
        self.state = None
        change_state(self, VersionState.STANDBY, self.what)
        self.error: str | None = None
        self.log_lines: list[str] = []
        self.paths: VersionPaths | None = None
        self.pool: Pool | None = None
        self.lock = threading.Lock()          # one build / start / stop at a time
        self.log_written = 0                  # lines ever written (the log itself is capped)
        self.log_reported = -1
        self.failures = 0                     # failed tries in a row
        self.retry_at: float | None = None    # monotonic time of the next try, if any
        self.final = False                    # failed in a way no retry changes

    # -- reporting ------------------------------------------------------------------------

    def say(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.log_lines.append(f"{stamp} {line}")
        self.log_written += 1
        while sum(len(s) for s in self.log_lines) > LOG_CAP:
            self.log_lines.pop(0)

    def _set(self, state: VersionState, error: str | None = None) -> None:
        change_state(self, state, self.what)
        self.error = error
        self.on_change()

    def report(self) -> dict:
        """State for the heartbeat; the build log only when it grew since the last one."""
        out = {"version_id": self.version_id, "state": str(self.state), "error": self.error,
               "deployment": self.spec.get("deployment")}
        if self.log_written != self.log_reported:
            self.log_reported = self.log_written
            out["log"] = "\n".join(self.log_lines)
        return out

    # -- lifecycle ------------------------------------------------------------------------

    def _build(self) -> None:
        if self.paths is None:
            self._set(VersionState.BUILDING)
            started = time.monotonic()
            self.paths = self.builder.build(self.spec, self.say)
            self.say(f"built in {time.monotonic() - started:.2f}s")

    def _new_pool(self, instances: int) -> Pool:
        limits = self.manifest.limits
        pool = Pool(self.what, lambda: self.make_child_spec(self), instances,
                    limits.concurrency, self._pool_failed)
        pool.call_timeout = float(limits.timeout_s)
        return pool

    def _pool_failed(self, reason: str) -> None:
        self.say(f"failed: {reason}")
        self._failed(reason)

    def _failed(self, reason: str) -> None:
        """Report the version failed here, and when it is tried again (never, for a failure
        that is final for this content: see FINAL_REASONS)."""
        if self.state is VersionState.FAILED and (self.retry_at is not None or self.final):
            return   # the same failure told twice (the pool, and the start that raised)
        self.failures += 1
        self.final = reason.startswith(FINAL_REASONS)
        if self.final:
            self.retry_at = None
            if self.memory is not None:
                self.memory.remember(self.spec, reason, self.log_lines)
            self.say("not tried again: the same code fails the same way; deploy a fixed "
                     "version (or deploy this one again to retry)")
        else:
            delay = retry_delay(self.failures)
            self.retry_at = time.monotonic() + delay
            self.say(f"trying again in {delay:g}s (failure {self.failures} in a row)")
        self._set(VersionState.FAILED, reason)

    def start_over(self) -> None:
        """A new deployment of this version: the next failure waits the shortest delay."""
        self.failures = 0
        self.retry_at = None
        self.final = False
        if self.state is VersionState.FAILED:
            self.error = None

    def retry_due(self, now: float) -> bool:
        """Whether this failed version is to be served again now (and it claims the try).
        Called by the agent's main loop only, so it never waits for `lock`: a build holds
        that for minutes, and the heartbeat must go on meanwhile."""
        due = (self.role == Role.SERVE and self.state is VersionState.FAILED
               and self.retry_at is not None and now >= self.retry_at)
        if due:
            self.retry_at = None
        return due

    def serve(self) -> None:
        """Build, start `instances` children, and report ready (or idle when scaled to zero).
        Runs in its own thread; a failure is reported, never raised."""
        with self.lock:
            if self.role != Role.SERVE:
                return
            if (self.state in (VersionState.READY, VersionState.IDLE) and self.pool is not None
                    and self.pool.instances == self.manifest.limits.instances):
                return  # already serving (an on-demand pool of a standby is replaced)
            kept = self.memory.recall(self.spec) if self.memory is not None else None
            if kept is not None and self.state is not VersionState.FAILED:
                # Failed to load for this deployment before this worker's restart: the same
                # code fails the same way, so it is not built again.
                self.log_lines = list(kept.get("log") or [])
                self.say("not built again after a restart: it failed to load for this "
                         "deployment; deploy it again to retry")
                self.final, self.retry_at, self.failures = True, None, 1
                self._set(VersionState.FAILED, kept.get("reason") or "failed before a restart")
                return
            try:
                self._build()
                instances = self.manifest.limits.instances
                if self.pool is None:
                    # (An on-demand pool keeps serving, and the state routable, meanwhile.)
                    self._set(VersionState.STARTING)
                pool = self._new_pool(instances)
                pool.start()
            except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if isinstance(exc, LoadError):
                    reason = "import failed: " + reason
                if self.state is not VersionState.FAILED:   # the pool said it already
                    log.warning("%s failed: %s", self.what, one_line(exc))
                    self.say(f"failed: {exc}")
                self._failed(reason)
                return
            old, self.pool = self.pool, pool
            self.failures, self.retry_at, self.final = 0, None, False
            if self.memory is not None:
                self.memory.forget(self.version_id)
            self.say(f"{instances} process(es) ready" if instances else
                     "scaled to zero; the first call starts a process")
            self._set(VersionState.READY if instances else VersionState.IDLE)
        if old is not None:
            old.drain_and_stop(grace=self.manifest.limits.timeout_s + 5)

    def _on_demand_pool(self) -> Pool | None:
        """A standby version asked for by a pinned call: build it if needed and give it a
        pool that starts a process on the first call and stops it when idle."""
        with self.lock:
            if self.pool is not None:
                return self.pool
            try:
                self._build()
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                self.say(f"on-demand build failed: {exc}")
                self._set(VersionState.FAILED, str(exc))
                return None
            self.pool = self._new_pool(0)
            self.pool.start()
            self._set(VersionState.IDLE if self.role == Role.STANDBY else self.state)
            return self.pool

    def invoke(self, frame: dict, timeout: float, pinned: bool = False,
               queue_wait: float | None = None) -> dict:
        """Run a call on this version's pool, waiting for a free process up to `queue_wait`
        (default: the manifest's queue_timeout_s)."""
        if queue_wait is None:
            queue_wait = float(self.manifest.limits.queue_timeout_s)
        pool = self.pool
        if pool is None:
            if not pinned and self.role != Role.SERVE:
                # A call routed here just before a redeploy took this version out of service:
                # send it back to be routed again rather than start a process for it.
                return {"status": Status.NOT_RUNNING, "error": {
                    "type": "NotRunning", "message": f"{self.what} is no longer serving"}}
            starting = self.role == Role.SERVE and self.state in (VersionState.BUILDING,
                                                               VersionState.STARTING)
            if starting:
                # Being started for its role (a version an alias or a split has just named,
                # say): the call waits for that start, within its queue time.
                pool = self._started_within(frame, queue_wait)
        if pool is None:
            if self.state is VersionState.FAILED:
                return {"status": Status.FAILED, "error": {"type": "VersionFailed",
                        "message": f"{self.what} failed: {self.error}"}}
            if starting:
                return {"status": Status.UNAVAILABLE, "error": {
                    "type": "Unavailable", "message": f"{self.what} is still starting"}}
            pool = self._on_demand_pool()
            if pool is None:
                return {"status": Status.FAILED, "error": {"type": "VersionFailed",
                        "message": f"{self.what} could not be built: {self.error}"}}
        return pool.invoke(frame, timeout, queue_wait)

    def _started_within(self, frame: dict, queue_wait: float) -> Pool | None:
        """The pool once the start under way (which holds the lock) is over, if that is
        within the call's queue time and its start-by; None if not, or if it failed."""
        wait = queue_wait
        start_by = frame.get("start_by")
        if isinstance(start_by, (int, float)):
            wait = min(wait, float(start_by) - time.monotonic())
        if wait > 0 and self.lock.acquire(timeout=wait):
            self.lock.release()
        return self.pool

    def stop(self, final_state: VersionState = VersionState.STOPPED) -> None:
        """Drain in-flight calls, then stop every child (the whole tree)."""
        with self.lock:
            pool, self.pool = self.pool, None
            if pool is not None:
                self._set(VersionState.DRAINING, self.error)
                pool.drain_and_stop(grace=self.manifest.limits.timeout_s + 5)
            self._set(final_state, self.error if final_state is VersionState.FAILED else None)

    def to_standby(self) -> None:
        self.role = Role.STANDBY
        # A version that failed stays reported as failed (with its reason) until it is
        # activated again.
        self.stop(VersionState.FAILED if self.state is VersionState.FAILED
                  else VersionState.STANDBY)

    def reap_idle(self) -> None:
        pool = self.pool
        if pool is not None:
            pool.check()
            pool.stop_idle(IDLE_TTL_S)

    def pids(self) -> list[int]:
        pool = self.pool
        return pool.pids() if pool else []


def child_spec_factory(isolation, bootstrap_path: str, view_root: Path):
    """How a VersionRuntime turns into ChildSpecs for its processes."""

    def make(runtime: VersionRuntime) -> ChildSpec:
        paths = runtime.paths
        spec = runtime.spec
        uid, gid = isolation.identity(spec["uid_key"])

        manifest = runtime.manifest
        limits = manifest.limits
        cgroups = isolation.cgroups
        make_cgroup = None
        if cgroups is not None:
            def make_cgroup(name: str):
                return cgroups.create(name, limits.memory_mb, limits.processes, limits.cpus)

        init = {"functions": manifest.functions, "container": spec["container"],
                "version": spec["version"], "concurrency": limits.concurrency}
        one_at_a_time = limits.concurrency == 1
        if isolation.view is not None:
            sandbox = sandbox_spec(
                isolation.view, root=view_root, code=paths.code, venv=paths.venv,
                bootstrap=Path(bootstrap_path), uid=uid, gid=gid, tmp_mb=limits.tmp_mb,
                network=limits.network, rlimits=isolation.rlimits(limits),
                env=isolation.env(manifest.env, VIEW_VENV))
            return ChildSpec(
                argv=[], code_dir=paths.code, tmp_root=paths.tmp, run_dir=paths.run, env={},
                # Without the kernel's help the process also arms its own soft limit: the
                # common case then ends with a clear SIGXCPU, the worker's check catches a lift.
                init=dict(init, code_dir=VIEW_CODE, rlimits={},
                          cpu_s=0 if isolation.cpu_by_kernel else limits.timeout_s),
                what=runtime.what, cgroup=make_cgroup, sandbox=sandbox,
                cpu_budget_s=limits.timeout_s if one_at_a_time else None,
                cpu_by_kernel=isolation.cpu_by_kernel, queue_wait=float(limits.queue_timeout_s))
        argv, user, group = isolation.command(
            [str(paths.python), "-I", "-B", bootstrap_path], uid, gid, limits.network)
        rlimits = {name: value for name, (value, _) in isolation.rlimits(limits).items()}
        return ChildSpec(
            argv=argv, code_dir=paths.code, tmp_root=paths.tmp, run_dir=paths.run,
            env=isolation.env(manifest.env, paths.venv),
            init=dict(init, code_dir=str(paths.code), rlimits=rlimits,
                      cpu_s=limits.timeout_s if one_at_a_time else 0),
            what=runtime.what, user=user, group=group,
            owner=(uid, gid) if uid is not None else None, cgroup=make_cgroup,
            queue_wait=float(limits.queue_timeout_s))

    return make

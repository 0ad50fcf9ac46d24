"""A one-at-a-time process's CPU budget: `timeout_s` seconds of CPU per call, enforced from
outside the process so the function cannot lift it. Where the worker may set another process's
rlimits (CAP_SYS_RESOURCE) it sets RLIMIT_CPU on it, soft and hard (SIGXCPU, then SIGKILL a
second later); where it may not, `exceeded()` is checked between calls and the caller kills a
process that went on burning CPU past its last call's budget (a thread the function left
running)."""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import Callable

log = logging.getLogger("dockyard.process")

CPUCLOCK_SCHED = 2    # the kernel's encoding of a process CPU clock: ~pid << 3 | 2


def find_server(monitor_pid: int) -> int:
    """The bootstrap's pid on the host, below a sandbox launcher: the child of the
    namespace's init whose pid inside the namespace is 2 (the launcher may have other children
    beside the init: pasta, for a function with network). 0 if it cannot be found."""
    try:
        for init in _children(monitor_pid):
            try:
                candidates = _children(init)
            except OSError:
                continue    # gone meanwhile (a helper that exited)
            for pid in candidates:
                if _namespace_pids(pid)[1:] == ["2"]:
                    return pid
        log.warning("cannot find the function process below launcher %s", monitor_pid)
    except (OSError, ValueError) as exc:
        log.warning("cannot find the function process below launcher %s: %s", monitor_pid, exc)
    return 0


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _namespace_pids(pid: int) -> list[str]:
    """Its pid in each pid namespace it is in, outermost first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return line.split()[1:]
    except OSError:
        pass
    return []


def process_clock(pid: int) -> int:
    """The process's CPU-time clock (clock_getcpuclockid): one system call per reading, where
    /proc/<pid>/stat costs a read and a parse."""
    return ((~pid) << 3) | CPUCLOCK_SCHED


class CpuBudget:
    """The checks count `tree_used()` — the CPU of the whole process tree (its cgroup) where
    the host has CPU accounting — so a process the function forked and left burning counts
    too. The kernel's RLIMIT_CPU, where it can be set from outside, binds the function's own
    process (rlimits are per process)."""

    def __init__(self, pid: int, seconds: float, by_kernel: bool,
                 tree_used: Callable[[], float] | None = None):
        self.pid = pid
        self.seconds = seconds
        self.by_kernel = by_kernel
        self.allowed = 0.0          # CPU seconds the tree may have used by the next check
        self._clock = process_clock(pid)
        self._limit: float | None = None    # the RLIMIT_CPU last set, and when
        self._armed_at = 0.0
        try:
            self.cpus = max(1, len(os.sched_getaffinity(pid)))
        except OSError:
            self.cpus = os.cpu_count() or 1
        self.used()   # fails now (OSError) if the process cannot be watched
        self.tree_used = tree_used or self.used
        self.settle()  # from its start (imports included) until its first call

    def used(self) -> float:
        return time.clock_gettime(self._clock)

    def arm(self, now: float | None = None) -> None:
        """Before a call, where the kernel can hold it: RLIMIT_CPU of `seconds` on top of
        what the process used so far. (The between-call allowance is set by `settle()`: the
        check runs only on processes with no call in flight.) `now` (monotonic) when armed on
        the process's own word that a call started (its slot, see common/direct.py): the
        limit then grows no faster than the CPUs the process may run on allow (its cgroup's
        `cpus` quota binds it further), so a process that fakes calls gains nothing a real
        call could not use."""
        if not self.by_kernel:
            return
        try:
            limit = self.used() + self.seconds
            if now is not None and self._limit is not None:
                limit = min(limit, self._limit + self.cpus * max(0.0, now - self._armed_at))
            budget = int(limit) + 1
            resource.prlimit(self.pid, resource.RLIMIT_CPU, (budget, budget + 1))
            self._limit, self._armed_at = limit, now if now is not None else time.monotonic()
        except (OSError, ValueError) as exc:
            log.warning("pid %s: cannot arm the CPU budget: %s", self.pid, exc)

    def settle(self) -> None:
        """After a call: what the tree burns from now until the next call is held to
        `seconds` (a call that used many processes at once is not held against it)."""
        try:
            self.allowed = self.tree_used() + self.seconds + 1
        except (OSError, ValueError):
            pass

    def exceeded(self) -> bool:
        if not self.allowed:
            return False
        try:
            return self.tree_used() > self.allowed
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self.allowed = 0.0

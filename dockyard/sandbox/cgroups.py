"""Per-process cgroups: a memory limit that the kernel enforces (and tells us it enforced),
a pids limit that binds even root, a CPU quota (one CPU unless asked otherwise, so that no
way around a per-call CPU budget can take more than that), and a list of every process of a
child's tree however it forked. Works on cgroup v2 (unified) and v1 (memory and pids
hierarchies, cpu and cpuacct where mounted); `detect()` says which, or why neither is
usable."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dockyard.cgroups")

CONTROLLERS = ("memory", "pids")
# cpu: limits.cpus (without it the summary says cpus cannot be enforced); cpuacct: the CPU
# time of a whole tree, for the per-call CPU budget (v2 has it in every group's cpu.stat).
OPTIONAL = ("cpu", "cpuacct")
CPU_PERIOD_US = 100_000
# The CPU quota of a group whose owner asked for none.
DEFAULT_CPUS = 1.0


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(fstype, mountpoint, options) of cgroup mounts."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if rfields and rfields[0] in ("cgroup", "cgroup2"):
                    out.append((rfields[0], fields[4], set(rfields[-1].split(","))))
    except OSError:
        pass
    return out


def _own_paths() -> dict[str, str]:
    """controller (or '' for v2) -> our cgroup path, from /proc/self/cgroup."""
    paths = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                for name in (names.split(",") if names else [""]):
                    paths[name] = path
    except OSError:
        pass
    return paths


@dataclass
class CgroupHost:
    version: int                   # 1 or 2
    roots: dict[str, Path]         # controller -> the folder our children's cgroups go in
    cpu: bool = False              # the cpu controller is ours too (limits.cpus)

    @property
    def cpu_accounting(self) -> bool:
        """The CPU time of a whole group can be read (v2: always; v1: with cpuacct)."""
        return self.version == 2 or "cpuacct" in self.roots

    def create(self, name: str, memory_mb: int, processes: int,
               cpus: float | None = None) -> "Cgroup":
        """A new group below ours, limited: `cpus` is its CPU quota in CPUs (None: one)."""
        dirs = {}
        for controller, root in self.roots.items():
            path = root / name
            path.mkdir(exist_ok=True)
            dirs[controller] = path
        group = Cgroup(self.version, dirs)
        group.limit(memory_mb, processes, cpus)
        return group


class Cgroup:
    def __init__(self, version: int, dirs: dict[str, Path]):
        self.version = version
        self.dirs = dirs
        self._fds: list[int] = []

    def _write(self, controller: str, name: str, value) -> bool:
        try:
            (self.dirs[controller] / name).write_text(str(value))
            return True
        except OSError as exc:
            log.debug("cgroup %s/%s: %s", controller, name, exc)
            return False

    def limit(self, memory_mb: int, processes: int, cpus: float | None = None) -> None:
        limit = int(memory_mb) * 1024 * 1024
        quota = max(1000, int(float(DEFAULT_CPUS if cpus is None else cpus) * CPU_PERIOD_US))
        if self.version == 2:
            self._write("memory", "memory.max", limit)
            self._write("memory", "memory.swap.max", 0)
            self._write("pids", "pids.max", processes)
            if "cpu" in self.dirs:
                self._write("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            self._write("memory", "memory.limit_in_bytes", limit)
            # Without this a v1 group swaps instead of being killed at its limit.
            self._write("memory", "memory.memsw.limit_in_bytes", limit)
            self._write("pids", "pids.max", processes)
            if "cpu" in self.dirs:
                self._write("cpu", "cpu.cfs_period_us", CPU_PERIOD_US)
                self._write("cpu", "cpu.cfs_quota_us", quota)

    def cpu_reader(self):
        """A function returning the CPU seconds used so far by every process that ever ran
        in this group (one pread of a file kept open), or None without CPU accounting."""
        if self.version == 1:
            if "cpuacct" not in self.dirs:
                return None
            path, parse = self.dirs["cpuacct"] / "cpuacct.usage", lambda data: int(data) / 1e9
        else:
            path = next(iter(self.dirs.values())) / "cpu.stat"
            parse = _usage_usec
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        self._fds.append(fd)

        def read() -> float:
            return parse(os.pread(fd, 4096, 0))
        read()
        return read

    def folders(self) -> list[str]:
        """Every folder of this group, once (v2 has one folder for all controllers)."""
        return sorted({str(path) for path in self.dirs.values()})

    def attach(self, pid: int) -> None:
        for folder in self.folders():
            (Path(folder) / "cgroup.procs").write_text(str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.dirs.values():
            try:
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def oom_killed(self) -> bool:
        path = self.dirs.get("memory")
        if path is None:
            return False
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the group until it is empty (a fork racing the kill is
        caught on the next pass)."""
        if self.version == 2:
            self._write("pids", "cgroup.kill", 1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        for path in self.dirs.values():
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _usage_usec(data: bytes) -> float:
    for line in data.splitlines():
        if line.startswith(b"usage_usec "):
            return int(line.split()[1]) / 1e6
    raise ValueError("no usage_usec in cpu.stat")


def detect(tag: str) -> tuple[CgroupHost | None, str]:
    """Find where this process may create child cgroups. Returns (host, explanation)."""
    mounts = _mounts()
    own = _own_paths()
    v2 = [m for m in mounts if m[0] == "cgroup2"]
    v1 = {c: m for m in mounts if m[0] == "cgroup" for c in CONTROLLERS + OPTIONAL
          if c in m[2]}
    reasons = []
    if all(c in v1 for c in CONTROLLERS):
        roots = {}
        for controller, (_, mountpoint, _) in v1.items():
            base = Path(mountpoint) / own.get(controller, "/").lstrip("/")
            if not base.is_dir():
                base = Path(mountpoint)  # a cgroup namespace shows us at the root
            roots[controller] = base / f"dockyard-{tag}"
        host = _try(CgroupHost(1, roots, cpu="cpu" in roots))
        if host is None and set(OPTIONAL) & set(roots):
            for optional in OPTIONAL:
                roots.pop(optional, None)
            host = _try(CgroupHost(1, roots))
        if host:
            return host, "cgroup v1 (" + ", ".join(sorted(host.roots)) + ")"
        reasons.append("cgroup v1 hierarchies are not writable")
    if v2:
        mountpoint = Path(v2[0][1])
        base = mountpoint / own.get("", "/").lstrip("/")
        if not base.is_dir():
            base = mountpoint
        enabled = (base / "cgroup.subtree_control")
        try:
            available = set((base / "cgroup.controllers").read_text().split())
        except OSError:
            available = set()
        if {"memory", "pids"} <= available:
            wanted = ["memory", "pids"] + (["cpu"] if "cpu" in available else [])
            try:
                enabled.write_text(" ".join("+" + c for c in wanted))
            except OSError:
                pass
            root = base / f"dockyard-{tag}"
            host = _try(CgroupHost(2, {c: root for c in wanted}, cpu="cpu" in wanted))
            if host:
                return host, "cgroup v2 (" + ", ".join(sorted(wanted)) + ")"
            reasons.append("the cgroup v2 tree is not writable (no delegation)")
        else:
            reasons.append("cgroup v2 lacks the memory/pids controllers here")
    if not mounts:
        reasons.append("no cgroup filesystem is mounted")
    return None, "; ".join(reasons) or "no usable cgroup controllers"


def _try(host: CgroupHost) -> CgroupHost | None:
    try:
        for root in host.roots.values():
            root.mkdir(exist_ok=True)
        probe = host.create("probe", 64, 8, 0.5 if host.cpu else None)
        probe.remove()
        return host
    except OSError as exc:
        log.debug("cgroups unusable: %s", exc)
        return None


def remove_root(host: CgroupHost) -> None:
    for root in set(host.roots.values()):
        for child in root.glob("*"):
            if child.is_dir():
                Cgroup(host.version, {"x": child}).remove()
        try:
            root.rmdir()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """A zombie (dead, not yet reaped by its parent) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def sweep_stale(host: CgroupHost) -> int:
    """Remove the cgroups of workers that died without cleaning up (killing what is still in
    them, double-forked strays included)."""
    removed = 0
    parents = {root.parent for root in host.roots.values()}
    for parent in parents:
        for folder in parent.glob("dockyard-w*"):
            try:
                pid = int(folder.name[len("dockyard-w"):])
            except ValueError:
                continue
            if pid != os.getpid() and not _alive(pid):
                remove_root(CgroupHost(host.version, {"x": folder}))
                removed += 1
    return removed

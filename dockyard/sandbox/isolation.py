"""What surrounds each child: its identity (an unprivileged uid per container when the worker
runs as root), its environment, its resource limits, and the interpreter its venvs are built
from. `summary()` says what is on, what is off and why; nothing is skipped silently."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import CgroupHost
from .cgroups import detect as detect_cgroups

log = logging.getLogger("dockyard.isolation")

DEFAULT_UID_BASE = 200_000
UID_RANGE = 50_000
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
OPEN_FILES = 1024
FILE_SIZE_BYTES = 1 << 30


class IsolationError(Exception):
    """This host cannot give a version the isolation its manifest asks for."""


@dataclass
class Isolation:
    uid_base: int = DEFAULT_UID_BASE
    drop_privileges: bool = field(default_factory=lambda: os.geteuid() == 0)
    notes: dict = field(default_factory=dict)
    cgroups: CgroupHost | None = None
    cgroup_note: str = "not probed"
    setpriv: str | None = None
    netns: list[str] | None = None       # the command prefix that gives a child no network
    netns_note: str = "not probed"

    def detect(self, tag: str) -> None:
        """Probe the host once at start: cgroups, setpriv, network namespaces."""
        self.cgroups, self.cgroup_note = detect_cgroups(tag)
        self.setpriv = shutil.which("setpriv", path=SAFE_PATH)
        unshare = shutil.which("unshare", path=SAFE_PATH)
        if unshare is None:
            self.netns, self.netns_note = None, "unshare (util-linux) is not installed"
            return
        candidates = [[unshare, "--net", "--"]] if os.geteuid() == 0 else []
        candidates.append([unshare, "--user", "--map-root-user", "--net", "--"])
        for prefix in candidates:
            done = subprocess.run([*prefix, "true"], capture_output=True, text=True)
            if done.returncode == 0:
                self.netns = prefix
                self.netns_note = ("a new network namespace per child (unshare --net)"
                                   if "--user" not in prefix else
                                   "a user + network namespace per child (unprivileged)")
                return
            reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        self.netns, self.netns_note = None, f"network namespaces are not allowed here ({reason})"

    def command(self, argv: list[str], uid: int | None, gid: int | None,
                network: bool) -> tuple[list[str], int | None, int | None]:
        """The child's command line and the uid/gid Popen should switch to (None when a
        wrapper does it). A version that wants no network on a host that cannot provide it is
        refused, never run with network."""
        prefix: list[str] = []
        if not network:
            if self.netns is None:
                raise IsolationError("this version sets network = false, but " +
                                     self.netns_note + "; refusing to run it with network")
            prefix += self.netns
        if uid is not None and (prefix or self.setpriv):
            if not self.setpriv:
                raise IsolationError("network = false needs setpriv (util-linux) to drop "
                                     "privileges inside the namespace")
            # The namespace must be made as root, so the uid drop happens after it; setpriv
            # also drops every capability and sets no_new_privs (setuid binaries gain nothing).
            prefix += [self.setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                       "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--"]
            return prefix + argv, None, None
        return prefix + argv, uid, gid

    def identity(self, container_id: int) -> tuple[int | None, int | None]:
        """A uid/gid of its own per container, so containers cannot touch each other."""
        if not self.drop_privileges:
            return None, None
        uid = self.uid_base + (int(container_id) % UID_RANGE)
        return uid, uid

    @staticmethod
    def env(manifest_env: dict[str, str], venv: Path) -> dict[str, str]:
        """Only the manifest's env plus a safe minimum; never the worker's own variables."""
        env = {"PATH": f"{venv}/bin:{SAFE_PATH}", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONUNBUFFERED": "0", "VIRTUAL_ENV": str(venv)}
        env.update(manifest_env)
        return env

    def rlimits(self, limits) -> dict[str, int]:
        """The rlimits the bootstrap sets on itself before it imports any user code (lowering
        one's own limits needs no privilege; setting another process's needs
        CAP_SYS_RESOURCE, which containers often lack)."""
        wanted = {"RLIMIT_NOFILE": OPEN_FILES, "RLIMIT_FSIZE": FILE_SIZE_BYTES, "RLIMIT_CORE": 0}
        if self.cgroups is None:
            # Without a memory cgroup the address space is the only memory bound we have.
            wanted["RLIMIT_AS"] = int(limits.memory_mb) * 1024 * 1024
            if self.drop_privileges:
                # RLIMIT_NPROC counts every process of the uid (all instances of the container,
                # old and new version during a redeploy) and does not bind root.
                wanted["RLIMIT_NPROC"] = int(limits.processes) * max(1, limits.instances) * 2
        return wanted

    def summary(self) -> dict:
        def item(on: bool, text: str) -> dict:
            return {"on": True, "how": text} if on else {"on": False, "why": text}

        uid_text = (f"a uid/gid per container ({self.uid_base} + container id), no "
                    "supplementary groups" + (", no capabilities, no_new_privs"
                                              if self.setpriv else "")
                    if self.drop_privileges else
                    "the worker does not run as root: children run as the worker's user and "
                    "can read what it can")
        out = {
            "session": item(True, "own session and process group (setsid)"),
            "environment": item(True, "manifest env plus PATH, LANG, HOME, TMPDIR only"),
            "uid": item(self.drop_privileges, uid_text),
            "filesystem": item(self.drop_privileges,
                               "code read-only and root-owned; private tmp per process, wiped "
                               "at exit; data dir, tokens, artifacts and other containers "
                               "unreadable" if self.drop_privileges else
                               "without a uid of their own, children can read the data dir"),
            "cgroups": item(self.cgroups is not None, self.cgroup_note),
            "memory": item(True, "cgroup memory limit per process (OOM kill reported)"
                           if self.cgroups else "RLIMIT_AS per process (no memory cgroup: "
                           + self.cgroup_note + ")"),
            "processes": item(self.cgroups is not None or self.drop_privileges,
                              "cgroup pids.max per process" if self.cgroups else
                              "RLIMIT_NPROC under the container's uid" if self.drop_privileges
                              else "no pids cgroup and no uid drop: RLIMIT_NPROC cannot "
                              "separate children from the worker"),
            "tree_kill": item(True, "every process in the child's cgroup" if self.cgroups else
                              "session and descendants (a process that double-forks into a "
                              "new session can escape: no cgroup)"),
            "network": item(self.netns is not None, self.netns_note + (
                "; versions with network = false are refused" if self.netns is None else "")),
            "rlimits": item(True, "open files, file size, core dumps"
                            + ("" if self.cgroups else ", address space")),
            "cpu_time": item(True, "RLIMIT_CPU re-armed before each call to timeout_s of CPU "
                             "(processes with concurrency = 1; others: the wall-clock "
                             "timeout only)"),
        }
        out.update(self.notes)
        return out


def unreachable_ancestor(path: Path) -> Path | None:
    """The first folder above `path` that other users cannot traverse (children run as
    another uid and must reach their code below it), or None."""
    for folder in [*reversed(path.absolute().parents), path.absolute()]:
        try:
            if not os.stat(folder).st_mode & 0o001:
                return folder
        except FileNotFoundError:
            return None
    return None


def _runnable_by(python: str, uid: int | None) -> str | None:
    """None if `python` runs as `uid`, else the reason it does not."""
    try:
        done = subprocess.run([python, "-I", "-c", "import encodings, json, asyncio"],
                              capture_output=True, text=True, timeout=30,
                              user=uid, group=uid, extra_groups=[] if uid is not None else None,
                              cwd="/", env={"PATH": SAFE_PATH})
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return None


def choose_python(requested: str | None, uid: int | None) -> tuple[str, str]:
    """The interpreter venvs are built from: it must be runnable by the children's uid (a
    Python under root's 0700 home is not). Returns (path, why)."""
    candidates = []
    if requested:
        candidates.append(requested)
    base = getattr(sys, "_base_executable", None) or sys.executable
    candidates += [os.path.realpath(base), "/usr/bin/python3", "/usr/local/bin/python3"]
    found = shutil.which("python3", path=SAFE_PATH)
    if found:
        candidates.append(found)
    seen, rejected = set(), []
    for candidate in candidates:
        if not candidate or candidate in seen or not os.path.exists(candidate):
            continue
        seen.add(candidate)
        reason = _runnable_by(candidate, uid)
        if reason is None:
            if rejected:
                why = "; ".join(rejected) + f"; using {candidate}"
            else:
                why = f"{candidate} runs as the children's uid" if uid is not None else \
                    f"{candidate} (children run as the worker's user)"
            return candidate, why
        rejected.append(f"{candidate} is not runnable by uid {uid} ({reason})")
        if requested and candidate == requested:
            raise RuntimeError(f"--python {requested} cannot be run by the children's uid "
                               f"{uid}: {reason}")
    raise RuntimeError("no Python interpreter is runnable by the children's uid: "
                       + "; ".join(rejected) + ". Install python3 system-wide or pass --python")

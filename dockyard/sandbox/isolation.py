"""What surrounds each child: its view of the system (namespaces, see view.py and launch.py),
its identity (an unprivileged uid per container when the worker runs as root), its
environment, its resource limits, and the interpreter its venvs are built from. `summary()`
says what is on, what is off and why; nothing is skipped silently."""

from __future__ import annotations

import logging
import marshal
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import seccomp
from .cgroups import CgroupHost
from .cgroups import detect as detect_cgroups
from .uids import DEFAULT_UID_BASE, UidRegistry
from .view import LAUNCHER, HostLayout, sandbox_spec

log = logging.getLogger("dockyard.isolation")

NOBODY = 65534
STARTUP_CPU_S = 60
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
    namespaces: bool = True               # False: --no-view, children run without a view
    view: HostLayout | None = None        # a private root, pid, ipc and mount namespace
    view_note: str = "not probed"
    uids: UidRegistry | None = None
    cpu_by_kernel: bool = False            # CAP_SYS_RESOURCE: RLIMIT_CPU set from outside
    setpriv: str | None = None             # the fallback without namespaces
    netns: list[str] | None = None         # the fallback's command prefix for no network
    netns_note: str = "not probed"
    nat_note: str = "not probed"

    def detect(self, tag: str) -> None:
        """Probe the host once at start: cgroups, namespaces (the private view), and the
        util-linux fallback when namespaces are not allowed."""
        self.cgroups, self.cgroup_note = detect_cgroups(tag)
        if self.drop_privileges:
            self.uids = UidRegistry(base=self.uid_base)
        self.view, self.view_note = self._probe_view()
        self.cpu_by_kernel = self.view is not None and _has_capability(CAP_SYS_RESOURCE)
        if self.view is not None:
            self.netns_note = "a new network namespace per child (no interface but loopback)"
            self.nat_note = self._probe_nat(self.view)
            return
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

    def _probe_view(self) -> tuple[HostLayout | None, str]:
        if not self.namespaces:
            return None, "turned off (--no-view): children run without a private view"
        if os.geteuid() != 0:
            return None, ("the worker does not run as root, so it cannot build mount and pid "
                          "namespaces for its children")
        layout = HostLayout.probe()
        true = shutil.which("true", path=SAFE_PATH) or "/bin/true"
        reason = run_sandboxed(layout, [true], network=False)
        if reason is not None:
            return None, f"namespaces are not allowed here ({reason})"
        return layout, ("a private root per child: read-only system folders, code and venv; "
                        "its own /tmp, /dev/shm, /proc (pid namespace) and IPC namespace; the "
                        "data dir, other containers and the host's /tmp do not exist in it")

    @staticmethod
    def _probe_nat(layout: HostLayout) -> str:
        """Set layout.nat when pasta can give a child's own network namespace a way out;
        say how network = true works either way."""
        pasta = shutil.which("pasta", path=SAFE_PATH)
        if pasta is None:
            log.warning("network = true shares the host's network: pasta is not installed "
                        "(apt-get install passt)")
            return ("host: a function with network = true shares the host's network, its "
                    "loopback and abstract sockets (pasta is not installed; `apt-get install "
                    "passt` adds it)")
        layout.nat = {"pasta": pasta}
        reason = run_sandboxed(layout, ["/bin/true"], network=True)
        if reason is not None:
            layout.nat = None
            log.warning("network = true shares the host's network: pasta failed (%s)", reason)
            return f"host: pasta could not give a child its own network ({reason})"
        return ("a network namespace per child with outbound NAT through pasta: the internet "
                "(TCP, UDP, DNS) is reachable; the host's loopback, its own addresses and "
                "abstract sockets are not")

    def runnable(self, python: str, uid: int | None) -> str | None:
        """None if the children's uid can run `python` in their view, else why not."""
        if self.view is None:
            return _runnable_by(python, uid)
        layout = HostLayout(list(self.view.binds), list(self.view.symlinks))
        layout.add_interpreter(python)
        return run_sandboxed(layout, [python, "-I", "-c", "import encodings, json, asyncio"],
                             network=True, uid=uid)

    def use_interpreter(self, python: str) -> None:
        if self.view is not None:
            self.view.add_interpreter(python)

    def command(self, argv: list[str], uid: int | None, gid: int | None,
                network: bool) -> tuple[list[str], int | None, int | None]:
        """Without namespaces (the fallback): the child's command line and the uid/gid Popen
        should switch to (None when a wrapper does it). A version that wants no network on a
        host that cannot provide it is refused, never run with network."""
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

    def identity(self, uid_key: str) -> tuple[int | None, int | None]:
        """A uid/gid of its own per container, never reused and never shared with another
        dockyard on this host."""
        if self.uids is None:
            return None, None
        uid = self.uids.uid_for(uid_key)
        return uid, uid

    @staticmethod
    def env(manifest_env: dict[str, str], venv: Path | str) -> dict[str, str]:
        """Only the manifest's env plus a safe minimum; never the worker's own variables."""
        env = {"PATH": f"{venv}/bin:{SAFE_PATH}", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONUNBUFFERED": "0", "VIRTUAL_ENV": str(venv)}
        env.update(manifest_env)
        return env

    def rlimits(self, limits) -> dict[str, tuple[int, int]]:
        """rlimits, soft and hard: the launcher sets them from outside the function (as root,
        before the uid drop), the fallback has the bootstrap set them on itself before it
        imports user code. Either way the hard limit binds: the function cannot lift them."""
        wanted = {"RLIMIT_NOFILE": OPEN_FILES, "RLIMIT_FSIZE": FILE_SIZE_BYTES, "RLIMIT_CORE": 0}
        if self.cgroups is None:
            # Without a memory cgroup the address space is the only memory bound we have.
            wanted["RLIMIT_AS"] = int(limits.memory_mb) * 1024 * 1024
            if self.drop_privileges:
                # RLIMIT_NPROC counts every process of the uid (all instances of the container,
                # old and new version during a redeploy) and does not bind root.
                wanted["RLIMIT_NPROC"] = int(limits.processes) * max(1, limits.instances) * 2
        out = {name: (value, value) for name, value in wanted.items()}
        if self.cpu_by_kernel and limits.concurrency == 1:
            # Until the worker arms the first call's budget: enough CPU to import the code.
            out["RLIMIT_CPU"] = (STARTUP_CPU_S, STARTUP_CPU_S + 1)
        return out

    def _cpu_time_text(self) -> str:
        if self.view is None:
            return ("RLIMIT_CPU re-armed by the process itself before each call (processes "
                    "with concurrency = 1; the function can lift it: no namespaces here)")
        tree = self.cgroups is not None and self.cgroups.cpu_accounting
        text = ("a budget of timeout_s of CPU per call (processes with concurrency = 1), for "
                + ("the whole process tree (cgroup CPU accounting)" if tree else
                   "the function's own process (no cgroup CPU accounting: a process it "
                   "forks is not counted)")
                + ", checked by the worker between calls")
        if self.cpu_by_kernel:
            return text + "; RLIMIT_CPU set from outside, soft and hard, on the process itself"
        return text + " (no CAP_SYS_RESOURCE to set RLIMIT_CPU from outside; the process also " \
            "arms its own soft limit)"

    def summary(self) -> dict:
        def item(on: bool, text: str) -> dict:
            return {"on": True, "how": text} if on else {"on": False, "why": text}

        view = self.view is not None
        uid_text = (("a uid/gid per container from a host-wide registry (never reused, never "
                     f"shared with another dockyard; from {self.uid_base}), no supplementary "
                     "groups, no capabilities, no_new_privs")
                    if self.drop_privileges else
                    "the worker does not run as root: children run as the worker's user and "
                    "can read what it can")
        fallback_fs = ("code read-only and root-owned; private tmp per process, wiped at exit; "
                       "data dir, tokens, artifacts and other containers unreadable"
                       if self.drop_privileges else
                       "without a uid of their own, children can read the data dir")
        out = {
            "view": item(view, self.view_note),
            "pid_namespace": item(view, "a function sees only its own processes in /proc"
                                  if view else self.view_note),
            "ipc_namespace": item(view, "SysV IPC objects and /dev/shm die with the process"
                                  if view else self.view_note),
            "session": item(True, "own session and process group (setsid)"),
            "environment": item(True, "manifest env plus PATH, LANG, HOME, TMPDIR only"),
            "uid": item(self.drop_privileges, uid_text),
            "filesystem": item(view or self.drop_privileges,
                               "the private view (see view); tmp_mb caps /tmp and /dev/shm"
                               if view else fallback_fs),
            "cgroups": item(self.cgroups is not None, self.cgroup_note),
            "memory": item(True, "cgroup memory limit per process (OOM kill reported)"
                           if self.cgroups else "RLIMIT_AS per process (no memory cgroup: "
                           + self.cgroup_note + ")"),
            "processes": item(self.cgroups is not None or self.drop_privileges,
                              "cgroup pids.max per process" if self.cgroups else
                              "RLIMIT_NPROC under the container's uid" if self.drop_privileges
                              else "no pids cgroup and no uid drop: RLIMIT_NPROC cannot "
                              "separate children from the worker"),
            "cpu_share": item(self.cgroups is not None and self.cgroups.cpu,
                              "limits.cpus as a cgroup CPU quota (one CPU when unset)"
                              if self.cgroups is not None
                              and self.cgroups.cpu else "no cpu cgroup controller: "
                              "limits.cpus cannot be enforced"),
            "tree_kill": item(True, "the pid namespace dies with its first process, and every "
                              "process in the child's cgroup is killed" if view else
                              "every process in the child's cgroup" if self.cgroups else
                              "session and descendants (a process that double-forks into a "
                              "new session can escape: no cgroup)"),
            "network": item(view or self.netns is not None, self.netns_note + (
                "; versions with network = false are refused"
                if not view and self.netns is None else "")),
            "network_true": item(view and self.view.nat is not None,
                                 self.nat_note if view else "host: " + self.view_note),
            "rlimits": item(True, "open files, file size, core dumps"
                            + ("" if self.cgroups else ", address space")
                            + (", soft and hard, set before the uid drop" if view else
                               ", soft and hard")),
            "cpu_time": item(True, self._cpu_time_text()),
            "syscalls": item(view and seccomp.machine() is not None,
                             seccomp.describe(seccomp.machine()) if view else
                             "no seccomp filter: the launcher installs it, and children run "
                             "without one (" + self.view_note + ")"),
        }
        out.update(self.notes)
        return out


def run_sandboxed(layout: HostLayout, argv: list[str], network: bool,
                  uid: int | None = NOBODY, timeout: float = 30.0) -> str | None:
    """Run one short command in a view built from `layout`; None if it exited 0, else why."""
    code, output = run_in_view(layout, argv, network=network, uid=uid, timeout=timeout)
    if code is None:
        return f"the probe did not finish within {timeout:.0f}s"
    if code != 0:
        lines = output.strip().splitlines()
        return lines[-1] if lines else f"exit code {code}"
    return None


def run_in_view(layout: HostLayout, argv: list[str], *, network: bool,
                uid: int | None = NOBODY, gid: int | None = None,
                binds: list[tuple[str, str, str]] = (), env: dict[str, str] | None = None,
                cwd: str = "/", tmp_mb: int = 16, cgroups: list[str] = (),
                timeout: float = 30.0) -> tuple[int | None, str]:
    """Run one command to its end as `uid` in a view built from `layout` plus `binds`
    (source, target, "ro" or "rw"): (its exit code, or None if it ran past `timeout` and was
    killed; what it wrote on stdout and stderr)."""
    root = Path(tempfile.mkdtemp(prefix="dockyard-view-"))
    read_fd, write_fd = os.pipe()
    reply_read, reply_write = os.pipe()
    spec = sandbox_spec(layout, root=root, code=Path("/"), venv=Path("/"), bootstrap=root,
                        uid=uid, gid=uid if gid is None else gid, tmp_mb=tmp_mb,
                        network=network, rlimits={}, env=env or {"PATH": SAFE_PATH},
                        argv=argv)
    # Only the layout and the binds asked for: not the code/venv/bootstrap of a function.
    spec["binds"] = [*layout.binds, *binds]
    spec["cwd"] = cwd
    spec["cgroups"] = list(cgroups)
    if env is not None:
        spec["env"] = dict(env)
    proc = None
    try:
        proc = subprocess.Popen(launcher_argv(read_fd, reply_write),
                                pass_fds=(read_fd, reply_write, lifeline_fd()),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env={"PATH": SAFE_PATH}, cwd="/",
                                start_new_session=True)
        for fd in (read_fd, reply_write):
            os.close(fd)
        read_fd = reply_write = -1
        os.write(write_fd, encode_spec(spec))
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            return None, output.decode("utf-8", "replace")
        return proc.returncode, output.decode("utf-8", "replace")
    except OSError as exc:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        return 1, str(exc)
    finally:
        for fd in (read_fd, write_fd, reply_read, reply_write):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        shutil.rmtree(root, ignore_errors=True)


CAP_SYS_RESOURCE = 24


def _has_capability(number: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> number & 1)
    except (OSError, ValueError):
        pass
    return False


_lifeline: list[int] = []


def lifeline_fd() -> int:
    """The read end of a pipe whose write end only this process holds (never inherited):
    every launcher watches it, so the death of this process, however it dies, ends every
    sandbox it started."""
    if not _lifeline:
        read_end, write_end = os.pipe()
        _lifeline[:] = [read_end, write_end]
    return _lifeline[0]


def launcher_argv(request_fd: int, reply_fd: int) -> list[str]:
    return [sys.executable, "-I", "-S", "-B", str(LAUNCHER), str(request_fd), str(reply_fd),
            str(lifeline_fd())]


def encode_spec(spec: dict) -> bytes:
    body = marshal.dumps(spec)
    return struct.pack(">I", len(body)) + body


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


def choose_python(requested: str | None, uid: int | None,
                  runnable: Callable[[str, int | None], str | None] = _runnable_by
                  ) -> tuple[str, str]:
    """The interpreter venvs are built from: it must be runnable by the children's uid (in
    their view, where its prefix is bound; without a view, a Python under a 0700 home is
    not). Returns (path, why)."""
    candidates = []
    if requested:
        candidates.append(requested)
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    same_version = [f"{folder}/python{sys.version_info[0]}.{sys.version_info[1]}"
                    for folder in ("/usr/bin", "/usr/local/bin")]
    if not base.startswith("/usr/"):
        # A system build of the same version first: a view then needs no bind of a folder
        # below someone's home (a pyenv build), and venvs do not depend on that home.
        candidates += same_version
    candidates += [base, *same_version, "/usr/bin/python3", "/usr/local/bin/python3"]
    found = shutil.which("python3", path=SAFE_PATH)
    if found:
        candidates.append(found)
    if requested and not os.path.exists(requested):
        raise RuntimeError(f"--python {requested} does not exist")
    seen, rejected = set(), []
    for candidate in candidates:
        if not candidate or candidate in seen or not os.path.exists(candidate):
            continue
        seen.add(candidate)
        reason = runnable(candidate, uid)
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

"""What a sandboxed child sees of the filesystem: the spec the launcher (sandbox/launch.py)
builds the child's private root from. Read-only binds of the system folders Python needs, a
few /etc files, the interpreter's prefix when it lives elsewhere, the version's code and venv
at fixed paths, a minimal /dev; /tmp and /dev/shm are private tmpfs mounts the launcher adds.
Nothing else of the host exists in the view: not the data dir, not the tokens, not another
container, not the host's /tmp."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..common.protocol import Frame

LAUNCHER = Path(__file__).resolve().parent / "launch.py"

CODE = "/dockyard/code"
VENV = "/dockyard/venv"
BOOTSTRAP = "/dockyard/bootstrap.py"
HOSTNAME = "sandbox"
USER = "sandbox"

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("hosts", "resolv.conf", "nsswitch.conf", "host.conf", "gai.conf", "services",
             "protocols", "ld.so.cache", "ld.so.conf", "mime.types", "timezone", "localtime",
             "os-release", "mailcap")
ETC_DIRS = ("ssl", "ld.so.conf.d", "ca-certificates", "pki", "alternatives")
DEVICES = ("null", "zero", "full", "random", "urandom")


@dataclass
class HostLayout:
    """The host's side of every view, probed once per worker."""

    binds: list[tuple[str, str, str]] = field(default_factory=list)
    symlinks: list[tuple[str, str]] = field(default_factory=list)
    # network = true through a namespace of its own: {"pasta": path}, or None
    # (the child shares the host's network).
    nat: dict | None = None

    @classmethod
    def probe(cls, interpreters: list[str] = ()) -> "HostLayout":
        layout = cls()
        for folder in SYSTEM_DIRS:
            layout._mirror(folder)
        for name in ETC_FILES + ETC_DIRS:
            layout._mirror(f"/etc/{name}")
        for device in DEVICES:
            if os.path.exists(f"/dev/{device}"):
                layout.binds.append((f"/dev/{device}", f"/dev/{device}", "dev"))
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            layout.symlinks.append((target, f"/dev/{name}"))
        layout.symlinks.append(("/tmp", "/var/tmp"))
        for python in interpreters:
            layout.add_interpreter(python)
        return layout

    def _mirror(self, path: str) -> None:
        """A symlink stays a symlink when it points inside the view's system folders (/bin ->
        usr/bin, /etc/localtime -> /usr/share/zoneinfo/…); anything else is bound read-only
        (a bind follows a symlink to its target, e.g. a resolv.conf managed under /run)."""
        if os.path.islink(path):
            target = os.readlink(path)
            absolute = os.path.normpath(os.path.join(os.path.dirname(path), target))
            if any(absolute == d or absolute.startswith(d + "/") for d in SYSTEM_DIRS):
                self.symlinks.append((target, path))
                return
        if os.path.exists(path):
            self.binds.append((os.path.realpath(path), path, "ro"))

    def covered(self, path: str) -> bool:
        path = os.path.realpath(path)
        return any(path == target or path.startswith(target.rstrip("/") + "/")
                   for _, target, _ in self.binds)

    def add_interpreter(self, python: str) -> None:
        """Venvs point at their base interpreter by absolute path: bind its prefix at the same
        path when it lies outside the system folders (a pyenv build under a home folder)."""
        for prefix in _prefixes(python):
            if prefix and not self.covered(prefix):
                self.binds.append((prefix, prefix, "ro"))


def _prefixes(python: str) -> list[str]:
    real = os.path.realpath(python)
    if real == os.path.realpath(sys.executable):
        found = [sys.base_prefix, sys.base_exec_prefix]
    else:
        try:
            done = subprocess.run([real, "-I", "-S", "-c",
                                   "import sys; print(sys.base_prefix); "
                                   "print(sys.base_exec_prefix)"],
                                  capture_output=True, text=True, timeout=30)
            found = done.stdout.split()
        except (OSError, subprocess.SubprocessError):
            found = []
    # The interpreter's own folder too: its binary may sit outside its prefix.
    return [*found, str(Path(real).parent.parent)]


def passwd(uid: int | None, gid: int | None) -> dict[str, str]:
    """Account files that name only what exists in the view (not the host's users)."""
    users = ["root:x:0:0:root:/root:/usr/sbin/nologin"]
    groups = ["root:x:0:"]
    if uid is not None:
        users.append(f"{USER}:x:{uid}:{gid}:dockyard function:/tmp:/usr/sbin/nologin")
        groups.append(f"{USER}:x:{gid}:")
    users.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
    groups.append("nogroup:x:65534:")
    return {"/etc/passwd": "\n".join(users) + "\n", "/etc/group": "\n".join(groups) + "\n"}


def sandbox_spec(layout: HostLayout, *, root: Path, code: Path, venv: Path, bootstrap: Path,
                 uid: int | None, gid: int | None, tmp_mb: int, network: bool,
                 rlimits: dict[str, tuple[int, int]], env: dict[str, str],
                 argv: list[str] | None = None) -> dict:
    """The first frame the launcher reads; Child.start adds the cgroups and the pipe fds."""
    binds = [*layout.binds, (str(code), CODE, "ro"), (str(venv), VENV, "ro"),
             (str(bootstrap), BOOTSTRAP, "ro")]
    return {
        "type": Frame.SANDBOX, "root": str(root), "binds": binds, "symlinks": layout.symlinks,
        "files": passwd(uid, gid), "tmp_mb": int(tmp_mb), "uid": uid, "gid": gid,
        "network": bool(network), "hostname": HOSTNAME, "rlimits": rlimits, "cwd": CODE,
        "env": dict(env, HOME="/tmp", TMPDIR="/tmp"),
        "argv": argv or [f"{VENV}/bin/python", "-I", "-B", BOOTSTRAP],
        "cgroups": [],
        "nat": dict(layout.nat, block=host_addresses()) if network and layout.nat else None,
    }


def host_addresses() -> list[str]:
    """The host's own addresses (loopback aside, which the namespace has its own of): the
    routes to them are closed inside a function's namespace, so pasta never carries a
    function's connection to a service of the host."""
    import psutil
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = address.address.split("%", 1)[0]
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if not ip.is_loopback and not ip.is_link_local:
                found.append(text)
    return sorted(set(found))

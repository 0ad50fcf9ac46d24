"""Step two of a venv build: create the venv and install into it from the files step one
(fetch.py) downloaded, inside a view with no network (its own, empty network namespace), as the
container's uid, under memory, pids and CPU cgroups and a time limit. This is where package
code runs (the build backends of local projects and source archives): without network,
without a credential, with a cache of this build's own. Then, once every process of the build
is dead, the venv becomes root's, read-only for the function, through directory fds that never
follow a symlink."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path

from ..sandbox.isolation import run_in_view
from ..sandbox.view import CODE as VIEW_CODE
from ..sandbox.view import VENV as VIEW_VENV
from . import fetch
from .fetch import VIEW_LINKS, VIEW_WHEELS, uv_reason

BUILD_TIMEOUT_S = 900
BUILD_TMP_MB = 2048
BUILD_MEMORY_MB = 4096
BUILD_PROCESSES = 512
BUILD_CPUS = 1.0
SEAL_DEPTH = 256
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

assert fetch.VIEW_CODE == VIEW_CODE


class BuildError(Exception):
    pass


def remove_tree(path: Path) -> None:
    """Delete a tree that package code may have written, through directory fds, never
    following a symlink (shutil.rmtree where it avoids symlink attacks, as on Linux). Called
    only once nothing that could write it runs any more."""
    if not shutil.rmtree.avoids_symlink_attacks:
        raise BuildError(f"this platform's rmtree may follow symlinks; not deleting {path}")
    shutil.rmtree(path, ignore_errors=True)


def seal_tree(path: Path) -> None:
    """Give a tree a build wrote (as the container's uid) to root, readable by all and
    writable by no one else, without ever following a symlink or leaving the tree: every
    entry is opened with openat(O_NOFOLLOW) from its folder's fd and checked to be the entry
    that was listed; a symlink is re-owned itself (AT_SYMLINK_NOFOLLOW); anything but folders,
    files and symlinks is removed."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top = os.open(path.name, OPEN_FLAGS | os.O_DIRECTORY, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        _seal_folder(top, os.fstat(top).st_dev, 0)
        os.fchown(top, 0, 0)
        os.fchmod(top, 0o755)
    finally:
        os.close(top)


def _seal_folder(fd: int, device: int, depth: int) -> None:
    if depth > SEAL_DEPTH:
        raise BuildError(f"the venv nests folders deeper than {SEAL_DEPTH}")
    with os.scandir(fd) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            os.chown(name, 0, 0, dir_fd=fd, follow_symlinks=False)
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            os.unlink(name, dir_fd=fd)   # a fifo or a socket has no place in a venv
            continue
        if st.st_dev != device:
            raise BuildError(f"the venv holds a mount point ({name})")
        folder = stat.S_ISDIR(st.st_mode)
        child = os.open(name, OPEN_FLAGS | (os.O_DIRECTORY if folder else 0), dir_fd=fd)
        try:
            now = os.fstat(child)
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                raise BuildError(f"the venv changed while it was sealed ({name})")
            if folder:
                _seal_folder(child, device, depth + 1)
            os.fchown(child, 0, 0)
            os.fchmod(child, 0o755 if folder or now.st_mode & 0o111 else 0o644)
        finally:
            os.close(child)


def install_offline(isolation, uv_bin: str, python: str, manifest, spec: dict, code: Path,
                    venv: Path, fetched: fetch.Fetched, scratch: Path, say) -> None:
    """Step two into `venv` (absent; made here, empty, owned by the container's uid, as is a
    cache of this build's own in `scratch`, a root-only folder the caller removes)."""
    uid, gid = isolation.identity(spec["uid_key"])
    cache = scratch / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, uid, gid)
    venv.mkdir(mode=0o755)
    os.chown(venv, uid, gid)
    wanted = scratch / "requirements.txt"
    wanted.write_text("\n".join(fetched.requirements) + "\n")
    os.chmod(wanted, 0o644)
    binds = [(str(code), VIEW_CODE, "ro"), (str(venv), VIEW_VENV, "rw"),
             (uv_bin, "/dockyard/uv", "ro"), (str(cache), "/dockyard/cache", "rw"),
             (str(fetched.wheels), VIEW_WHEELS, "ro"),
             (str(wanted), "/dockyard/requirements.txt", "ro")]
    # One view for both commands: `uv venv`, then `uv pip install` (argv after the script).
    script = ('uv=$1; python=$2; shift 2; "$uv" venv --relocatable --python "$python" '
              f'{VIEW_VENV} && exec "$uv" "$@"')
    install = ["/bin/sh", "-c", script, "sh", "/dockyard/uv", python,
               "pip", "install", "--python", f"{VIEW_VENV}/bin/python",
               "--link-mode=copy", "--no-config", "--offline", "--no-index",
               "--find-links", VIEW_WHEELS]
    for n, folder in enumerate(fetched.links):
        binds.append((str(folder), f"{VIEW_LINKS}/{n}", "ro"))
        install += ["--find-links", f"{VIEW_LINKS}/{n}"]
    install += ["-r", "/dockyard/requirements.txt"]
    # No index, proxy, CA or credential: there is no network to use them on.
    env = {"PATH": f"{VIEW_VENV}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
           "TMPDIR": "/tmp", "LANG": "C.UTF-8", "UV_CACHE_DIR": "/dockyard/cache",
           "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1", "UV_OFFLINE": "1"}
    group = None
    if isolation.cgroups is not None:
        group = isolation.cgroups.create(
            f"build-{spec['container']}-{secrets.token_hex(4)}",
            max(BUILD_MEMORY_MB, manifest.limits.memory_mb), BUILD_PROCESSES,
            cpus=max(BUILD_CPUS, manifest.limits.cpus or 0))
    alive = False
    say(f"installing {len(fetched.requirements)} package(s) offline (step 2 of 2: in a view "
        "without network)")
    try:
        code_, output = run_in_view(
            isolation.view, install, network=False, uid=uid, gid=gid, binds=binds, env=env,
            cwd=VIEW_CODE, tmp_mb=BUILD_TMP_MB, timeout=BUILD_TIMEOUT_S,
            cgroups=group.folders() if group is not None else [])
    finally:
        # The view's pid namespace died with its init, and the cgroup is emptied: only then
        # does root touch what the build wrote.
        if group is not None:
            group.remove()
            alive = bool(group.pids())
    for line in output.splitlines():
        if line.strip() and not line.lstrip().startswith("Activate with:"):
            say("  " + line.rstrip())
    if alive:
        raise BuildError("the build's processes could not be stopped; its venv is left as is")
    if code_ != 0:
        remove_tree(venv)
        if code_ is None:
            raise BuildError(f"installing took longer than {BUILD_TIMEOUT_S}s")
        raise BuildError(f"uv pip failed: {uv_reason(output)}")
    # Read-only for the function from now on: root's, without following a symlink.
    seal_tree(venv)

"""Step two of a venv build: install into a fresh venv from the files step one (fetch.py)
downloaded, inside a view with no network (its own, empty network namespace), as the
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
    _own_tree(path, 0, 0, readable=True)


def _own_tree(path: Path, uid: int, gid: int, readable: bool) -> None:
    """`path` and everything in it owned by uid/gid, walked as seal_tree says; `readable`:
    folders and executables 0755, other files 0644 (else modes stay)."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top = os.open(path.name, OPEN_FLAGS | os.O_DIRECTORY, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        _own_folder(top, os.fstat(top).st_dev, 0, uid, gid, readable)
        os.fchown(top, uid, gid)
        if readable:
            os.fchmod(top, 0o755)
    finally:
        os.close(top)


def _own_folder(fd: int, device: int, depth: int, uid: int, gid: int, readable: bool) -> None:
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
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
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
                _own_folder(child, device, depth + 1, uid, gid, readable)
            os.fchown(child, uid, gid)
            if readable:
                os.fchmod(child, 0o755 if folder or now.st_mode & 0o111 else 0o644)
        finally:
            os.close(child)


def install_offline(isolation, make_venv, manifest, spec: dict, uv_bin: str, code: Path,
                    venv: Path, fetched: fetch.Fetched, scratch: Path, say) -> None:
    """Step two into `venv` (absent): `make_venv(venv)` creates it as root, and before any
    package code runs it is handed to the container's uid (nothing else could have written it
    yet; the walk follows no symlink all the same). A cache of this build's own is made empty
    for that uid in `scratch`, a root-only folder the caller removes."""
    uid, gid = isolation.identity(spec["uid_key"])
    make_venv(venv)
    _own_tree(venv, uid, gid, readable=False)
    cache = scratch / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, uid, gid)
    wanted = scratch / "requirements.txt"
    wanted.write_text("\n".join(fetched.requirements) + "\n")
    os.chmod(wanted, 0o644)
    binds = [(str(code), VIEW_CODE, "ro"), (str(venv), VIEW_VENV, "rw"),
             (uv_bin, "/dockyard/uv", "ro"), (str(cache), "/dockyard/cache", "rw"),
             (str(fetched.wheels), VIEW_WHEELS, "ro"),
             (str(wanted), "/dockyard/requirements.txt", "ro")]
    install = ["/dockyard/uv", "pip", "install", "--python", f"{VIEW_VENV}/bin/python",
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

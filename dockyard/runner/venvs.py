"""Getting a version onto disk: the artifact (downloaded once), the code (extracted
read-only) and a private virtualenv built with uv."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..common.archive import extract_archive
from ..common.manifest import NAME_RE, Manifest
from ..sandbox.isolation import run_in_view
from ..sandbox.view import CODE as VIEW_CODE
from ..sandbox.view import VENV as VIEW_VENV

log = logging.getLogger("dockyard.venvs")

BUILD_TIMEOUT_S = 900
BUILD_TMP_MB = 2048
BUILD_MEMORY_MB = 4096
BUILD_PROCESSES = 512
# What the operator set for reaching the package index passes into the build's view: proxies,
# uv's index and TLS settings, and the CA bundle (bound in when it lives outside the view).
PROXY_VARIABLES = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
INDEX_VARIABLES = {"UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX",
                   "UV_NATIVE_TLS", "UV_INSECURE_HOST", "UV_HTTP_TIMEOUT", "UV_CONCURRENT_DOWNLOADS"}
CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")


class BuildError(Exception):
    pass


@dataclass(frozen=True)
class UvOptions:
    uv_bin: str
    python: str
    index_url: str | None = None
    find_links: tuple[str, ...] = ()
    offline: bool = False
    cache_dir: str | None = None


@dataclass(frozen=True)
class VersionPaths:
    root: Path
    code: Path
    venv: Path
    tmp: Path
    run: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def version_paths(worker_dir: Path, spec: dict) -> VersionPaths:
    """A version's folder: named by its version and, unless the name is already its content
    hash, by its content too. A container deleted and deployed again with other code under
    the same version name must never find (or be removed with) the old code's folder."""
    version, content = spec["version"], spec.get("content_sha256") or ""
    name = version if content.startswith(version) else f"{version}-{content[:12]}"
    root = worker_dir / spec["container"] / name
    return VersionPaths(root, root / "code", root / "venv", root / "tmp", root / "run")


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return []


def _make_read_only(tree: Path) -> None:
    """Code belongs to the worker's user and is read-only for everyone else."""
    for dirpath, dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o111 else 0o644)


def uv_reason(output: str) -> str:
    """The cause of a failed uv run in one line: its error lines (`error:`, `cause:`, `×`, `╰─▶`,
    `Caused by:`), not the `hint:` it ends with."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    causes = [ln.lstrip("×╰─▶ ").strip() for ln in lines
              if ln.startswith(("error:", "cause:", "×", "╰─▶", "Caused by:"))]
    if causes:
        return "; ".join(causes)[:1000]
    useful = [ln for ln in lines if not ln.startswith("hint:")]
    return (useful or lines or ["no output"])[-1][:1000]


def _chown_tree(root: Path, uid: int | None, gid: int | None, readable: bool = False) -> None:
    if uid is None:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
            os.lchown(name, uid, gid)
            if readable and not os.path.islink(name):
                mode = os.lstat(name).st_mode
                os.chmod(name, 0o755 if (mode & 0o111 or name == dirpath) else 0o644)


def _link_tree(source: Path, dest: Path) -> None:
    """A copy of a wheelhouse in a folder every uid can read: hard links to files that are
    readable by all already (where the filesystem allows), copies of the others."""
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest.parent, 0o755)
    os.chmod(dest, 0o755)
    if not source.is_dir():
        return
    for entry in source.iterdir():
        if entry.is_file():
            target = dest / entry.name
            if entry.stat().st_mode & 0o004:
                try:
                    os.link(entry, target)   # already readable by all: share it
                    continue
                except OSError:
                    pass
            shutil.copyfile(entry, target)
            os.chmod(target, 0o644)


class Builder:
    def __init__(self, worker_dir: Path, uv: UvOptions,
                 download: Callable[[str, Path], None],
                 group_of: Callable[[dict], int | None] = lambda spec: None,
                 private: bool = False, isolation=None):
        self.worker_dir = worker_dir
        self.group_of = group_of
        # With a view, dependencies are installed inside one, as the container's uid: a
        # package's build backend is the package author's code.
        self.isolation = isolation
        # Children that see the version through a private view (bind mounts made as root)
        # need no path to it on the host: everything stays root-only.
        self.private = private
        self.artifacts = worker_dir / ".artifacts"
        self.uv = uv
        self.download = download
        # One lock per version folder: a build into it and its removal never overlap.
        self._folder_locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()

    def _folder_lock(self, spec: dict) -> threading.Lock:
        return self._folder_lock_at(version_paths(self.worker_dir, spec).root)

    def _folder_lock_at(self, root: Path) -> threading.Lock:
        with self._guard:
            return self._folder_locks.setdefault(root, threading.Lock())

    def artifact(self, sha256: str) -> Path:
        """The package file, downloaded once per sha256 and verified."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        os.chmod(self.artifacts, 0o700)
        path = self.artifacts / sha256
        if path.exists():
            return path
        partial = path.with_suffix(".part")
        self.download(sha256, partial)
        digest = hashlib.sha256()
        with open(partial, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise BuildError(f"artifact {sha256[:12]} arrived corrupted; retrying on next sync")
        os.replace(partial, path)
        return path

    def build(self, spec: dict, say: Callable[[str], None]) -> VersionPaths:
        with self._folder_lock(spec):
            return self._build(spec, say)

    def _build(self, spec: dict, say: Callable[[str], None]) -> VersionPaths:
        manifest = Manifest.from_dict(spec["manifest"])
        paths = version_paths(self.worker_dir, spec)
        paths.root.mkdir(parents=True, exist_ok=True)
        container_dir = self.worker_dir / spec["container"]
        if self.private:
            for folder in (self.worker_dir, container_dir, paths.root):
                os.chmod(folder, 0o700)
            return self._build_in(spec, manifest, paths, say)
        # Children may traverse the worker dir but not list it; a container's folder is open
        # only to that container's group, so containers cannot read each other's code.
        os.chmod(self.worker_dir, 0o711)
        group = self.group_of(spec)
        if group is not None:
            os.chown(container_dir, 0, group)
            os.chmod(container_dir, 0o750)
        else:
            os.chmod(container_dir, 0o755)
        os.chmod(paths.root, 0o755)
        return self._build_in(spec, manifest, paths, say)

    def _build_in(self, spec: dict, manifest: Manifest, paths: VersionPaths,
                  say: Callable[[str], None]) -> VersionPaths:
        if not (paths.root / ".code-ready").exists():
            say(f"fetching package {spec['artifact_sha256'][:12]}")
            with self._folder_lock_at(self.artifacts / spec["artifact_sha256"]):
                archive = self.artifact(spec["artifact_sha256"])
                shutil.rmtree(paths.code, ignore_errors=True)
                extract_archive(archive, paths.code)
            _make_read_only(paths.code)
            (paths.root / ".code-ready").write_text(spec["content_sha256"])
        self._venv(manifest, paths, say, spec)
        for d in (paths.tmp, paths.run):
            d.mkdir(exist_ok=True)
        os.chmod(paths.tmp, 0o711)
        os.chmod(paths.run, 0o700)
        return paths

    def _venv(self, manifest: Manifest, paths: VersionPaths, say, spec: dict) -> None:
        wanted = {"python": self.uv.python, "dependencies": manifest.dependencies,
                  "requirements": manifest.requirements, "relocatable": True}
        marker = paths.root / ".venv-ready"
        if marker.exists() and paths.python.exists():
            try:
                if json.loads(marker.read_text()) == wanted:
                    say("virtualenv already built")
                    return
            except ValueError:
                pass
        shutil.rmtree(paths.venv, ignore_errors=True)
        say(f"creating virtualenv with {self.uv.python}")
        # Relocatable: entry-point scripts must work where the view puts the venv.
        self._uv(["venv", "--relocatable", "--python", self.uv.python, str(paths.venv)], say)
        if manifest.requirements:
            req = (paths.code / manifest.requirements).resolve()
            if not req.is_relative_to(paths.code.resolve()) or not req.is_file():
                raise BuildError(f"requirements file '{manifest.requirements}' is not in the "
                                 "package")
        if manifest.requirements or manifest.dependencies:
            say("installing " + " ".join(manifest.dependencies or [manifest.requirements]))
            if self.isolation is not None and self.isolation.view is not None:
                self._install_in_view(manifest, paths, say, spec)
            else:
                args = (["-r", str(paths.code / manifest.requirements)]
                        if manifest.requirements else []) + list(manifest.dependencies)
                self._uv(self._pip_install(str(paths.python), self.uv.find_links) + args, say)
        marker.write_text(json.dumps(wanted))

    def _pip_install(self, python: str, find_links) -> list[str]:
        cmd = ["pip", "install", "--python", python, "--link-mode=copy", "--no-config"]
        if self.uv.index_url:
            cmd += ["--index-url", self.uv.index_url]
        for folder in find_links:
            cmd += ["--find-links", folder]
        if self.uv.offline:
            cmd += ["--offline"]
        return cmd

    def _install_in_view(self, manifest: Manifest, paths: VersionPaths, say,
                         spec: dict) -> None:
        """`uv pip install` in a view of its own, as the container's uid: the venv bound
        read-write, the code and the wheelhouses read-only, a cache of the container's own,
        the network; nothing of the data dir, the tokens or the worker's environment."""
        isolation = self.isolation
        uid, gid = isolation.identity(spec["uid_key"])
        container_dir = self.worker_dir / spec["container"]
        cache = container_dir / ".uv-cache"
        links = container_dir / ".build-links"
        shutil.rmtree(links, ignore_errors=True)
        cache.mkdir(exist_ok=True)
        binds = [(str(paths.code), VIEW_CODE, "ro"), (str(paths.venv), VIEW_VENV, "rw"),
                 (self.uv.uv_bin, "/dockyard/uv", "ro"), (str(cache), "/dockyard/cache", "rw")]
        find_links = []
        for n, folder in enumerate(self.uv.find_links):
            # The wheelhouse may sit in a folder the container's uid cannot enter: its files
            # are linked (or copied) into one it can read.
            copy = links / str(n)
            _link_tree(Path(folder), copy)
            binds.append((str(copy), f"/dockyard/links/{n}", "ro"))
            find_links.append(f"/dockyard/links/{n}")
        for path in (paths.venv, cache):
            _chown_tree(path, uid, gid)
        args = (["-r", f"{VIEW_CODE}/{manifest.requirements}"] if manifest.requirements
                else []) + list(manifest.dependencies)
        env = {"PATH": f"{VIEW_VENV}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
               "TMPDIR": "/tmp", "LANG": "C.UTF-8", "UV_CACHE_DIR": "/dockyard/cache",
               "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
        env.update({k: v for k, v in os.environ.items()
                    if k.lower() in PROXY_VARIABLES or k in INDEX_VARIABLES})
        for name in CA_VARIABLES:
            path = os.environ.get(name)
            if path and os.path.exists(path):
                env[name] = path
                if not isolation.view.covered(path):
                    binds.append((os.path.realpath(path), path, "ro"))
        # A build is bounded like a function is: memory (its /tmp included) and processes.
        group = None
        if isolation.cgroups is not None:
            group = isolation.cgroups.create(
                f"build-{spec['container']}-{spec['version']}",
                max(BUILD_MEMORY_MB, manifest.limits.memory_mb), BUILD_PROCESSES)
        try:
            code, output = run_in_view(
                isolation.view, ["/dockyard/uv", *self._pip_install(f"{VIEW_VENV}/bin/python",
                                                                    find_links), *args],
                network=True, uid=uid, gid=gid, binds=binds, env=env, cwd=VIEW_CODE,
                tmp_mb=BUILD_TMP_MB, timeout=BUILD_TIMEOUT_S,
                cgroups=group.folders() if group is not None else [])
        finally:
            if group is not None:
                group.remove()
            shutil.rmtree(links, ignore_errors=True)
            # Back to root and readable by all: the function may read its venv, not change it.
            _chown_tree(paths.venv, 0, 0, readable=True)
        for line in output.splitlines():
            if line.strip():
                say("  " + line.rstrip())
        if code is None:
            raise BuildError(f"uv pip install took longer than {BUILD_TIMEOUT_S}s")
        if code != 0:
            raise BuildError(f"uv pip failed: {uv_reason(output)}")

    def _uv(self, args: list[str], say) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
        env["UV_PYTHON_DOWNLOADS"] = "never"
        env["UV_NO_PROGRESS"] = "1"
        if self.uv.cache_dir:
            env["UV_CACHE_DIR"] = self.uv.cache_dir
        try:
            # umask 022: the venv must be readable by the children's uid.
            done = subprocess.run([self.uv.uv_bin, *args], capture_output=True, text=True,
                                  env=env, timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL,
                                  umask=0o022)
        except subprocess.TimeoutExpired:
            raise BuildError(f"uv {args[0]} took longer than {BUILD_TIMEOUT_S}s") from None
        for line in (done.stdout + done.stderr).splitlines():
            if line.strip() and not line.lstrip().startswith("Activate with:"):
                say("  " + line.rstrip())
        if done.returncode != 0:
            raise BuildError(f"uv {args[0]} failed: {uv_reason(done.stderr)}")

    def folder(self, spec: dict) -> Path:
        return version_paths(self.worker_dir, spec).root

    def forget_artifact(self, sha256: str, in_use: Callable[[], bool]) -> None:
        """Drop a cached package file, unless `in_use()` says a version held here uses it
        (asked under the lock a build holds while it reads the file)."""
        with self._folder_lock_at(self.artifacts / sha256):
            if not in_use():
                (self.artifacts / sha256).unlink(missing_ok=True)

    def sweep(self, held: list[dict]) -> int:
        """Remove what no held version needs: version folders (a container's whole folder when
        none of its versions is held) and cached package files, left by versions removed
        while this worker was down or before it was killed. Returns how many were removed."""
        keep = {self.folder(spec) for spec in held}
        containers = {spec["container"] for spec in held}
        removed = 0
        for container_dir in _subfolders(self.worker_dir):
            if not NAME_RE.fullmatch(container_dir.name):
                continue   # .artifacts, .view, the socket: not a container's
            if container_dir.name not in containers:
                shutil.rmtree(container_dir, ignore_errors=True)
                removed += 1
                continue
            for folder in _subfolders(container_dir):
                if folder.name.startswith(".") or folder in keep:
                    continue   # .uv-cache, .build-links: the container's own
                with self._folder_lock_at(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        wanted = {spec.get("artifact_sha256") for spec in held}
        for path in _files(self.artifacts):
            if path.name not in wanted:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def remove(self, spec: dict, in_use: Callable[[Path], bool]) -> None:
        """Delete a version's folder, unless `in_use(folder)` says a version held now lives
        there (a container deleted and deployed again with the same content has the same
        folder, and its build may already be under way)."""
        folder = self.folder(spec)
        with self._folder_lock(spec):
            if not in_use(folder):
                shutil.rmtree(folder, ignore_errors=True)

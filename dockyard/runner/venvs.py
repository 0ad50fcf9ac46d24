"""Getting a version onto disk: the artifact (downloaded once), the code (extracted
read-only) and a private virtualenv built with uv: in a view, in two steps that trust each
other nothing (fetch.py resolves and downloads, install.py installs without network)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..common.archive import extract_archive
from ..common.manifest import NAME_RE, Manifest
from ..sandbox.uids import fetch_key
from . import fetch
from .fetch import FetchError, uv_reason
from .install import BUILD_TIMEOUT_S, BuildError, install_offline, remove_tree

log = logging.getLogger("dockyard.venvs")

# Folders a container's folder held for builds before each build had its own cache: they were
# written by package code, and are removed with care wherever they are found.
LEGACY = (".uv-cache", ".build-links")
SCRATCH_PREFIX = ".build-"


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
        # One build at a time per container (by name: a container deleted and made again
        # under its name shares its folder), and its leftovers removed only between builds.
        self._container_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _folder_lock(self, spec: dict) -> threading.Lock:
        return self._folder_lock_at(version_paths(self.worker_dir, spec).root)

    def _folder_lock_at(self, root: Path) -> threading.Lock:
        with self._guard:
            return self._folder_locks.setdefault(root, threading.Lock())

    def _container_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._container_locks.setdefault(name, threading.Lock())

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
        with self._container_lock(spec["container"]), self._folder_lock(spec):
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
            # The archive as uploaded (its sha256), of the content the version is named by.
            say(f"fetching package file {spec['artifact_sha256'][:12]} (content "
                f"{spec['content_sha256'][:12]})")
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
                  "requirements": manifest.requirements, "relocatable": True, "steps": 2}
        marker = paths.root / ".venv-ready"
        if marker.exists() and paths.python.exists():
            try:
                if json.loads(marker.read_text()) == wanted:
                    say("virtualenv already built")
                    return
            except ValueError:
                pass
        marker.unlink(missing_ok=True)
        remove_tree(paths.venv)
        if manifest.requirements:
            req = (paths.code / manifest.requirements).resolve()
            if not req.is_relative_to(paths.code.resolve()) or not req.is_file():
                raise BuildError(f"requirements file '{manifest.requirements}' is not in the "
                                 "package")
        deps = bool(manifest.requirements or manifest.dependencies)
        if deps and self.isolation is not None and self.isolation.view is not None:
            self._build_in_view(manifest, paths, say, spec)
        else:
            self._make_venv(paths.venv, say)
            if deps:
                # No view (the worker is not root, or --no-view): one step, as the worker's
                # user; the index URL goes in the environment, not on the command line.
                say("installing " + " ".join(manifest.dependencies or [manifest.requirements]))
                args = (["-r", str(paths.code / manifest.requirements)]
                        if manifest.requirements else []) + list(manifest.dependencies)
                self._uv(self._pip_install(str(paths.python), self.uv.find_links) + args, say)
        marker.write_text(json.dumps(wanted))

    def _make_venv(self, venv: Path, say) -> None:
        say(f"creating virtualenv with {self.uv.python}")
        # Relocatable: entry-point scripts must work where the view puts the venv.
        self._uv(["venv", "--relocatable", "--python", self.uv.python, str(venv)], say)

    def _pip_install(self, python: str, find_links) -> list[str]:
        cmd = ["pip", "install", "--python", python, "--link-mode=copy", "--no-config"]
        for folder in find_links:
            cmd += ["--find-links", folder]
        if self.uv.offline:
            cmd += ["--offline"]
        return cmd

    def _build_in_view(self, manifest: Manifest, paths: VersionPaths, say,
                       spec: dict) -> None:
        """The two steps. One: resolve and download as the container's fetch uid, outside any
        view, with the index's credentials (fetch.py); no package code runs. Two: create the
        venv and install from those files inside a view with no network, as the container's
        uid, under cgroups and a time limit, with a cache of this build's own; then, once every
        process of the build is dead, give the venv to root without following a symlink."""
        isolation = self.isolation
        uid, _ = isolation.identity(spec["uid_key"])
        fetch_uid, fetch_gid = isolation.identity(fetch_key(spec["uid_key"], self.worker_dir))
        if uid is None or fetch_uid is None:
            raise BuildError("a build in a view needs uids of its own (the worker runs as root)")
        container_dir = self.worker_dir / spec["container"]
        for name in LEGACY:
            remove_tree(container_dir / name)
        say("resolving and downloading "
            + " ".join(manifest.dependencies or [manifest.requirements])
            + " (step 1 of 2: no package code runs)")
        fetcher = fetch.Fetcher(uv_bin=self.uv.uv_bin, python=self.uv.python,
                                index_url=self.uv.index_url, find_links=self.uv.find_links,
                                offline=self.uv.offline, uid=fetch_uid, gid=fetch_gid, say=say)
        try:
            fetched = fetcher.fetch(paths.code, manifest.requirements, manifest.dependencies)
        except FetchError as exc:
            raise BuildError(str(exc)) from None
        # Everything the build may write is made here, empty, owned by its uid: the venv and
        # a cache of this build's own (removed after it; never shared, never kept).
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=container_dir))
        try:
            install_offline(isolation, lambda venv: self._make_venv(venv, say), manifest,
                            spec, self.uv.uv_bin, paths.code, paths.venv, fetched, scratch, say)
        finally:
            remove_tree(scratch)
            fetch.discard(fetched.folder, fetch_uid)

    def _uv(self, args: list[str], say) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
        env["UV_PYTHON_DOWNLOADS"] = "never"
        env["UV_NO_PROGRESS"] = "1"
        if self.uv.index_url:
            env["UV_INDEX_URL"] = self.uv.index_url
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
        none of its versions is held), what builds left in a container's folder, build folders
        of workers that died mid-build, and cached package files, left by versions removed
        while this worker was down or before it was killed. Returns how many were removed."""
        keep = {self.folder(spec) for spec in held}
        containers = {spec["container"] for spec in held}
        removed = fetch.sweep_folders()
        for container_dir in _subfolders(self.worker_dir):
            if not NAME_RE.fullmatch(container_dir.name):
                continue   # .artifacts, .view, the socket: not a container's
            lock = self._container_lock(container_dir.name)
            if not lock.acquire(blocking=False):
                continue   # a build is under way: it removes its own scratch folders
            try:
                if container_dir.name not in containers:
                    remove_tree(container_dir)
                    removed += 1
                    continue
                for folder in _subfolders(container_dir):
                    if folder.name in LEGACY or folder.name.startswith(SCRATCH_PREFIX):
                        remove_tree(folder)
                        removed += 1
                        continue
                    if folder.name.startswith(".") or folder in keep:
                        continue
                    with self._folder_lock_at(folder):
                        remove_tree(folder)
                    removed += 1
            finally:
                lock.release()
        wanted = {spec.get("artifact_sha256") for spec in held}
        for path in _files(self.artifacts):
            if path.name in wanted:
                continue
            # A download (`<sha256>.part`) goes only when no build of this run holds its
            # artifact: the worker sweeps before its first build, and no other process works
            # in a worker folder (its lock), so a `.part` here was cut off by an earlier run.
            lock = self._folder_lock_at(self.artifacts / path.name.removesuffix(".part"))
            if not lock.acquire(blocking=False):
                continue
            try:
                path.unlink(missing_ok=True)
            finally:
                lock.release()
            removed += 1
        return removed

    def remove(self, spec: dict, in_use: Callable[[Path], bool]) -> None:
        """Delete a version's folder, unless `in_use(folder)` says a version held now lives
        there (a container deleted and deployed again with the same content has the same
        folder, and its build may already be under way)."""
        folder = self.folder(spec)
        with self._folder_lock(spec):
            if not in_use(folder):
                remove_tree(folder)

    def forget_container(self, spec: dict, in_use: Callable[[], bool]) -> None:
        """After a version's removal: unless `in_use()` says a version of a container of that
        name is held here, remove the container's folder with whatever builds left in it, so
        that nothing of it (a cache above all) reaches a later container of the same name."""
        name = spec["container"]
        with self._container_lock(name):
            if not in_use():
                remove_tree(self.worker_dir / name)

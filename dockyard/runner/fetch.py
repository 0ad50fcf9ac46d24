"""Step one of a venv build: resolve a version's dependencies and download the files, with the
operator's index, credentials, proxy and CA, as an unprivileged uid of dockyard's own (one per
container, never the container's), into a folder of this build only. No code of any package
runs here: uv resolves with `--no-build` (wheels, and local projects whose metadata is static),
and the files it chose are fetched by the downloader below, not by an installer. Step two
(venvs.py) installs from this folder inside a view with no network.

Credentials reach this step through its own processes' environment only (never a command line,
never a file another uid can read); step two gets none.

Run as a script (`python -I -S -B fetch.py`, as the fetch uid, by `_download`), this file is
the downloader: standard library only, the list of files on stdin, the credentials from the
environment."""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FETCH_TIMEOUT_S = 900
PREFIX = "dockyard-build-"
TOOLS_PREFIX = "dockyard-tools-"     # a worker's copy of uv (reachable_uv), not a build's
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_TOML = 4 << 20
# Where step two finds what this step prepared, inside its view.
VIEW_CODE = "/dockyard/code"
VIEW_WHEELS = "/dockyard/wheels"
VIEW_LINKS = "/dockyard/links"
# What the operator set for reaching the package index: passed to this step only.
PROXY_VARIABLES = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
INDEX_VARIABLES = {"UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX",
                   "UV_NATIVE_TLS", "UV_INSECURE_HOST", "UV_HTTP_TIMEOUT", "UV_CONCURRENT_DOWNLOADS"}
CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")
FILENAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!~-]*\.(whl|zip|tar\.gz|tgz|tar\.bz2|tar\.xz)")
# What `uv pip compile --no-build` says of a dependency it could resolve only by building it.
NEEDS_BACKEND = (re.compile(r"Building source distributions for `([^`]+)` is disabled"),
                 re.compile(r"Wheels are required for `([^`]+)`"))


class FetchError(Exception):
    """A dependency could not be resolved or downloaded; the message is one line."""


@dataclass
class Fetched:
    """What step two installs from: `requirements` (the resolution, one line each, in the
    paths of step two's view), the downloaded files and the wheelhouses it may bind."""
    folder: Path
    wheels: Path
    links: list[Path] = field(default_factory=list)
    requirements: list[str] = field(default_factory=list)


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


def needs_backend(output: str) -> str | None:
    """The one line a build log and the deployment get when uv could resolve a dependency only
    by running its build backend, or None."""
    for pattern in NEEDS_BACKEND:
        found = pattern.search(output)
        if found:
            name = found.group(1).split(" @ ")[0].strip()
            return (f"{name} can only be resolved by running its build backend, which dockyard "
                    "never runs while it resolves: give it static metadata (pyproject.toml's "
                    "[project] with name, version and dependencies, none of them dynamic) or "
                    "ship a wheel of it (in the package, or in a --find-links wheelhouse)")
    return None


# -- the root side ---------------------------------------------------------------------------

def _temp_root() -> Path:
    """A folder every uid may traverse, for the per-build folders (the data dir is often below
    a folder only root can enter)."""
    for candidate in (tempfile.gettempdir(), "/var/tmp", "/tmp"):
        path = Path(candidate)
        if path.is_dir() and all(os.stat(p).st_mode & 0o001
                                 for p in [*reversed(path.absolute().parents), path]):
            return path
    raise FetchError("no temporary folder that an unprivileged uid can enter (TMPDIR, "
                     "/var/tmp, /tmp) for the build's downloads")


_uv_copies: dict[tuple[str, int], str] = {}


def reachable_uv(uv_bin: str) -> str:
    """uv's binary where the fetch uid can run it. It usually sits in the venv dockyard was
    installed in, and that venv often lies below a home folder only its owner may enter
    (/root is 0700): then a copy of it, root's and read-only, goes to a folder of this
    worker's in the temporary folder (removed when the worker exits, or by the next worker's
    sweep if it died)."""
    path = Path(uv_bin)
    if _readable_by_all(path) and os.stat(path).st_mode & 0o001:
        return uv_bin
    key = (os.path.realpath(uv_bin), os.getpid())
    if key not in _uv_copies:
        folder = Path(tempfile.mkdtemp(prefix=f"{TOOLS_PREFIX}{os.getpid()}-",
                                       dir=_temp_root()))
        os.chmod(folder, 0o755)
        copy = folder / "uv"
        shutil.copyfile(uv_bin, copy)
        os.chmod(copy, 0o755)
        _uv_copies[key] = str(copy)
        atexit.register(shutil.rmtree, folder, True)
    return _uv_copies[key]


def _readable_by_all(path: Path) -> bool:
    """Every folder above `path` can be entered by anyone, and `path` (a file, or a folder
    and its files) can be read by anyone."""
    try:
        if any(not os.stat(p).st_mode & 0o001 for p in reversed(path.absolute().parents)):
            return False
        if not path.is_dir():
            return bool(os.stat(path).st_mode & 0o004)
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        return all(entry.stat().st_mode & 0o004 for entry in path.iterdir() if entry.is_file())
    except OSError:
        return False


def link_tree(source: Path, dest: Path) -> None:
    """A copy of a wheelhouse in a folder every uid can read: hard links to files that are
    readable by all already (where the filesystem allows), copies of the others."""
    dest.mkdir(parents=True, exist_ok=True)
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


def _copy_code(code: Path, dest: Path) -> None:
    """The package's files, readable by the fetch uid (the code folder itself is not: it lies
    in the data dir). Symlinks stay symlinks."""
    shutil.copytree(code, dest, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644)


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        text = f.read(MAX_TOML + 1)
    if len(text) > MAX_TOML:
        raise FetchError(f"{path.name} is larger than {MAX_TOML >> 20} MB")
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FetchError(f"{path.name} cannot be read: {str(exc)[:200]}") from None


def _requirement_lines(values, what: str) -> list[str]:
    """Requirement strings written one a line into a requirements file: never an option."""
    lines = []
    for value in values:
        text = str(value).strip()
        if not text or "\n" in text or "\r" in text or text.startswith("-"):
            raise FetchError(f"{what} {text[:80]!r} is not a requirement (options belong in "
                             "the requirements file)")
        lines.append(text)
    return lines


class Fetcher:
    """Step one for one build, as `uid`/`gid` (dockyard's fetch uid for the container)."""

    def __init__(self, *, uv_bin: str, python: str, index_url: str | None,
                 find_links: tuple[str, ...], offline: bool, uid: int, gid: int, say,
                 timeout: float = FETCH_TIMEOUT_S):
        self.uv_bin, self.python = reachable_uv(uv_bin), python
        self.index_url, self.find_links, self.offline = index_url, find_links, offline
        self.uid, self.gid, self.say = uid, gid, say
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout

    def fetch(self, code: Path, requirements: str | None, dependencies: list[str]) -> Fetched:
        folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=_temp_root()))
        try:
            return self._fetch(folder, code, requirements, dependencies)
        except BaseException:
            discard(folder, self.uid)
            raise

    def _fetch(self, folder: Path, code: Path, requirements: str | None,
               dependencies: list[str]) -> Fetched:
        # Only root and the fetch uid (through its group) enter the build's folder; the fetch
        # uid writes only in home/ and wheels/, both made for it here, never a tree it made.
        os.chown(folder, 0, self.gid)
        os.chmod(folder, 0o750)
        src, home, wheels = folder / "src", folder / "home", folder / "wheels"
        _copy_code(code, src)
        for path, mode in ((home, 0o700), (wheels, 0o755)):
            path.mkdir()
            os.chown(path, self.uid, self.gid)
            os.chmod(path, mode)
        links = []
        (folder / "links").mkdir(mode=0o755)
        os.chmod(folder / "links", 0o755)   # whatever the worker's umask
        for n, wheelhouse in enumerate(self.find_links):
            source = Path(wheelhouse)
            if _readable_by_all(source):
                links.append(source)
            else:
                links.append(folder / "links" / str(n))
                link_tree(source, links[-1])
        env = self._env(folder)
        inputs = []
        if requirements:
            inputs.append(str(src / requirements))
        if dependencies:
            deps = folder / "dependencies.txt"
            deps.write_text("\n".join(_requirement_lines(dependencies, "dependency")) + "\n")
            os.chmod(deps, 0o644)
            inputs.append(str(deps))
        fetched = Fetched(folder, wheels, links)
        lock = self._compile(inputs, home / "pylock.toml", src, env, links)
        downloads: dict[str, dict] = {}
        build_requires = self._read_lock(lock, folder, src, links, fetched.requirements,
                                         downloads)
        if build_requires:
            build_in = folder / "build-requirements.txt"
            build_in.write_text("\n".join(sorted(set(build_requires))) + "\n")
            os.chmod(build_in, 0o644)
            self.say("resolving the build requirements of the local projects: "
                     + ", ".join(sorted(set(build_requires))))
            build_lock = self._compile([str(build_in)], home / "pylock.build.toml", src, env,
                                       links)
            self._read_lock(build_lock, folder, src, links, [], downloads, build=True)
        if downloads:
            self._download(list(downloads.values()), wheels, env, folder)
        return fetched

    def _env(self, folder: Path) -> dict[str, str]:
        home = folder / "home"
        env = {"PATH": SAFE_PATH, "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8",
               "UV_CACHE_DIR": str(home / "cache"), "UV_PYTHON_DOWNLOADS": "never",
               "UV_NO_PROGRESS": "1"}
        env.update({k: v for k, v in os.environ.items()
                    if k.lower() in PROXY_VARIABLES or k in INDEX_VARIABLES})
        if self.index_url:
            env["UV_INDEX_URL"] = self.index_url
        for name in CA_VARIABLES:
            # The operator's CA may sit where the fetch uid cannot read it: a copy it can.
            path = os.environ.get(name)
            if not path or not os.path.exists(path):
                continue
            if _readable_by_all(Path(path)):
                env[name] = path
                continue
            copy = folder / f"ca-{name.lower()}"
            if os.path.isdir(path):
                copy.mkdir(mode=0o755)
                for entry in Path(path).iterdir():
                    if entry.is_file():
                        shutil.copyfile(entry, copy / entry.name)
                        os.chmod(copy / entry.name, 0o644)
            else:
                shutil.copyfile(path, copy)
                os.chmod(copy, 0o644)
            env[name] = str(copy)
        return env

    def _run(self, argv: list[str], env: dict, cwd: Path, stdin: bytes | None = None,
             what: str = "uv pip compile") -> tuple[int, str, str]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"resolving and downloading took longer than {self.timeout:.0f}s")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None
                                else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=cwd, user=self.uid,
                                group=self.gid, extra_groups=[], umask=0o022,
                                start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=remaining)
        except subprocess.TimeoutExpired:
            _kill_uid(self.uid)
            proc.communicate()
            raise FetchError(f"{what} took longer than {self.timeout:.0f}s") from None
        finally:
            # Whatever it left behind: nothing runs as the fetch uid between builds.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            _kill_uid(self.uid)
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def _compile(self, inputs: list[str], output: Path, cwd: Path, env: dict,
                 links: list[Path]) -> Path:
        argv = [self.uv_bin, "pip", "compile", "--no-build", "--no-config", "--format",
                "pylock.toml", "--python", self.python, "--output-file", str(output)]
        for folder in links:
            argv += ["--find-links", str(folder)]
        if self.offline:
            argv.append("--offline")
        code, _, err = self._run(argv + inputs, env, cwd)
        for line in err.splitlines():
            if line.strip():
                self.say("  " + line.rstrip())
        if code != 0:
            plain = needs_backend(err)
            if plain:
                self.say(plain)
                raise FetchError(plain)
            raise FetchError(f"resolving the dependencies failed: {uv_reason(err)}")
        return output

    def _read_lock(self, lock: Path, folder: Path, src: Path, links: list[Path],
                   requirements: list[str], downloads: dict, build: bool = False) -> list[str]:
        """Turn uv's resolution into step two's requirement lines and the files to download;
        returns the build requirements of the local projects in it."""
        build_requires: list[str] = []
        base = lock.parent
        for package in _load_toml(lock).get("packages", []):
            name = str(package.get("name", ""))
            version = package.get("version")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise FetchError(f"the resolution names a package {name[:80]!r}")
            if "vcs" in package:
                raise FetchError(f"{name} comes from version control, which needs the network "
                                 "to build: ship a wheel of it (in the package, or in a "
                                 "--find-links wheelhouse)")
            if "directory" in package:
                local = self._local(package["directory"], base, src, name)
                if build:
                    raise FetchError(f"the build requirement {name} is a local folder: only "
                                     "wheels can be build requirements")
                requirements.append(f"{name} @ file://{VIEW_CODE}/{local.relative_to(src)}")
                build_requires += self._build_requires(local, name)
                continue
            entries = package.get("wheels") or []
            archive = package.get("archive")
            if entries and version:
                where = [self._want(entry, base, src, links, downloads, name)
                         for entry in entries]
                in_package = [w for w in where if w.startswith(VIEW_CODE + "/")]
                # A wheel the package ships is named by its path (step two does not read the
                # package's requirements file, nor any --find-links in it); the others are
                # found in the downloads and the wheelhouses.
                requirements.append(f"{name} @ file://{in_package[0]}" if in_package
                                    else f"{name}=={version}")
            elif archive:
                where = self._want(archive, base, src, links, downloads, name)
                requirements.append(f"{name} @ file://{where}")
            else:
                raise FetchError(f"{name} has no wheel that fits this interpreter")
        return build_requires

    def _local(self, entry: dict, base: Path, src: Path, name: str) -> Path:
        path = (base / str(entry.get("path", ""))).resolve()
        if not path.is_relative_to(src.resolve()):
            raise FetchError(f"{name} is a folder outside the package ({entry.get('path')})")
        return path

    def _want(self, entry: dict, base: Path, src: Path, links: list[Path], downloads: dict,
              name: str) -> str:
        """Where step two finds this file (a path in its view); a remote one is queued for
        download."""
        url = str(entry.get("url") or "")
        if entry.get("path") or url.startswith("file://"):
            path = (base / str(entry["path"])).resolve() if entry.get("path") else \
                Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
            if path.is_relative_to(src.resolve()):
                return f"{VIEW_CODE}/{path.relative_to(src.resolve())}"
            for n, folder in enumerate(links):
                if path.parent == folder.resolve():
                    return f"{VIEW_LINKS}/{n}/{path.name}"
            raise FetchError(f"{name} is a file outside the package and the wheelhouses "
                             f"({path})")
        if not url.startswith(("http://", "https://")):
            raise FetchError(f"{name} comes from {url[:80]!r}, which builds cannot fetch")
        filename = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        if not FILENAME_RE.fullmatch(filename):
            raise FetchError(f"{name}: the file {filename[:80]!r} has no name a build can use")
        sha256 = str((entry.get("hashes") or {}).get("sha256") or "")
        known = downloads.get(filename)
        if known is not None and known["sha256"] != sha256:
            raise FetchError(f"{filename} is wanted twice with different hashes")
        downloads[filename] = {"url": url, "name": filename, "sha256": sha256}
        return f"{VIEW_WHEELS}/{filename}"

    def _build_requires(self, project: Path, name: str) -> list[str]:
        pyproject = project / "pyproject.toml"
        if not pyproject.is_file():
            return []   # uv resolved it, so its metadata was static; nothing to add
        system = _load_toml(pyproject).get("build-system")
        if not isinstance(system, dict):
            return ["setuptools>=40.8.0"]   # what a project without [build-system] gets
        requires = system.get("requires", [])
        if not isinstance(requires, list):
            raise FetchError(f"{name}: build-system.requires is not a list")
        return _requirement_lines(requires, f"{name}'s build requirement")

    def _download(self, files: list[dict], wheels: Path, env: dict, folder: Path) -> None:
        script = folder / "download.py"
        shutil.copyfile(__file__, script)
        os.chmod(script, 0o644)
        self.say(f"downloading {len(files)} file(s)")
        job = json.dumps({"dest": str(wheels), "files": files}).encode()
        code, out, err = self._run([self.python, "-I", "-S", "-B", str(script)], env,
                                   folder / "home", stdin=job, what="downloading")
        for line in (out + err).splitlines():
            if line.strip():
                self.say("  " + line.rstrip())
        if code != 0:
            raise FetchError(f"downloading the dependencies failed: {uv_reason(err)}")


def _kill_uid(uid: int) -> None:
    """Kill every process of `uid` (the fetch uid of one container: only this build's)."""
    import psutil
    for _ in range(50):
        found = []
        for proc in psutil.process_iter(["uids"]):
            try:
                if proc.info["uids"] and uid in (proc.info["uids"].real,
                                                 proc.info["uids"].effective):
                    found.append(proc)
                    proc.kill()
            except psutil.Error:
                pass
        if not found:
            return
        psutil.wait_procs(found, timeout=1)


def discard(folder: Path, uid: int | None = None) -> None:
    """Remove a build's folder once nothing runs as its fetch uid any more (through directory
    fds, never following a symlink)."""
    if uid is not None:
        _kill_uid(uid)
    if not shutil.rmtree.avoids_symlink_attacks:
        raise RuntimeError("this platform's rmtree may follow symlinks")
    shutil.rmtree(folder, ignore_errors=True)


def sweep_folders() -> int:
    """Remove the build folders of workers that died mid-build (their pid is in the name)."""
    removed = 0
    try:
        root = _temp_root()
        entries = [(prefix, entry) for prefix in (PREFIX, TOOLS_PREFIX)
                   for entry in root.glob(prefix + "*")]
    except (FetchError, OSError):
        return 0
    for prefix, entry in entries:
        pid = entry.name[len(prefix):].split("-", 1)[0]
        try:
            st = entry.lstat()
        except OSError:
            continue
        if not pid.isdigit() or st.st_uid != 0 or not entry.is_dir() or entry.is_symlink():
            continue
        if int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            discard(entry)
            removed += 1
    return removed


# -- the downloader (run as the fetch uid) -------------------------------------------------

def _realm(parts: urllib.parse.SplitResult) -> tuple[str, str, int]:
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _index_credentials(env) -> dict:
    """Credentials of the index URLs in the environment, by realm (scheme, host, port), the way
    uv applies them: to every URL of that realm, and only to those."""
    urls = []
    for name in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL", "UV_INDEX"):
        for item in (env.get(name) or "").split():
            urls.append(item.split("=", 1)[1] if re.match(r"^[\w-]+=", item) else item)
    realms = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.username:
            realms[_realm(parts)] = (urllib.parse.unquote(parts.username),
                                     urllib.parse.unquote(parts.password or ""))
    return realms


class _Credentials(urllib.request.BaseHandler):
    handler_order = 400

    def __init__(self, realms: dict):
        self.realms = realms

    def _add(self, request):
        creds = self.realms.get(_realm(urllib.parse.urlsplit(request.full_url)))
        if creds and not request.has_header("Authorization"):
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            # Unredirected: a redirect to another realm never carries it (the redirected
            # request passes through here again and gets its own realm's, if any).
            request.add_unredirected_header("Authorization", "Basic " + token)
        return request

    http_request = https_request = _add


def _shown(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _download_one(opener, item: dict, dest: str, timeout: float) -> int:
    parts = urllib.parse.urlsplit(item["url"])
    url = item["url"]
    if parts.username:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
    target = os.path.join(dest, item["name"])
    partial = target + ".part"
    digest = hashlib.sha256()
    size = 0
    with opener.open(url, timeout=timeout) as response, \
            open(partial, "xb") as out:
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    if item.get("sha256") and digest.hexdigest() != item["sha256"]:
        os.unlink(partial)
        raise ValueError(f"sha256 {digest.hexdigest()[:12]}… is not the index's "
                         f"{item['sha256'][:12]}…")
    os.rename(partial, target)
    return size


def main() -> int:
    job = json.loads(sys.stdin.read())
    env = os.environ
    handlers = [urllib.request.ProxyHandler(),
                urllib.request.HTTPSHandler(context=ssl.create_default_context()),
                _Credentials(_index_credentials(env))]
    opener = urllib.request.build_opener(*handlers)
    try:
        timeout = float(env.get("UV_HTTP_TIMEOUT") or 60)
    except ValueError:
        timeout = 60.0
    failed = []

    def one(item):
        try:
            return _download_one(opener, item, job["dest"], timeout)
        except Exception as exc:  # noqa: BLE001 - each failure is reported
            failed.append(f"error: cannot download {item['name']} from {_shown(item['url'])}: "
                          f"{exc}")
            return 0

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(one, job["files"]))
    for line in failed:
        print(line, file=sys.stderr)
    print(f"downloaded {len(job['files']) - len(failed)} file(s), "
          f"{sum(sizes) / 1e6:.1f} MB in {time.monotonic() - started:.2f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: a real `dockyard serve` (gunicorn on a free port, a real worker building
real uv venvs) on a temp data dir, a wheelhouse built inside the tests, and a package builder."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import psutil
import pytest
import requests

# A real PostgreSQL server for the session (started on first use), a fresh database per test,
# and the store's database on each engine: see tests/postgres.py.
from postgres import db_url, pg_url, postgres_server, store_target  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = Path(__file__).resolve().parent / "functions"
UID_REGISTRY = Path("/var/lib/dockyard/uids.json")

# A shell that is not interactive starts `pytest … &` with Ctrl-C ignored, and every process a
# test starts would inherit that (an ignored signal stays ignored across exec): the tests of
# what Ctrl-C does would wait on processes that cannot hear it, as `nohup` asks. The suite
# runs with the default, however it was started (each xdist worker imports this too).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- a wheelhouse with one tiny pure-Python wheel, written by hand (no index needed) -------

def build_wheel(folder: Path, name: str, version: str, modules: dict[str, str]) -> Path:
    dist = f"{name}-{version}.dist-info"
    files = dict(modules)
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    files[f"{dist}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: dockyard-tests\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory):
    """Where `serve` leaves its note for the CLI: a folder of this test session's, so that
    the tests leave nothing in the home folder of whoever runs them."""
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    build_wheel(folder, "dytiny", "1.0", {
        "dytiny/__init__.py": 'VERSION = "1.0"\n\ndef shout(text):\n    return text.upper() + "!"\n'})
    return folder


# -- packages -------------------------------------------------------------------------------

def make_package(tmp_path: Path, source: str, manifest_extra: str = "", name: str | None = None,
                 version: str | None = None, files: dict[str, str] | None = None) -> Path:
    """Copy tests/functions/<source> to a temp folder, optionally renaming it, versioning it
    or appending manifest text and extra files."""
    dest = tmp_path / f"{source}-{name or ''}-{version or ''}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(FUNCTIONS / source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = (dest / "dockyard.toml").read_text()
    if name:
        manifest = re.sub(r'^name = ".*"$', f'name = "{name}"', manifest, flags=re.M)
    if version:
        manifest = _merge(manifest, f'version = "{version}"\n')
    manifest = _merge(manifest, manifest_extra)
    (dest / "dockyard.toml").write_text(manifest)
    for rel, text in (files or {}).items():
        (dest / rel).write_text(text)
    return dest


def _merge(manifest: str, extra: str) -> str:
    """Merge `extra` (TOML) into `manifest` table by table and write it back out."""
    if not extra:
        return manifest
    data = tomllib.loads(manifest)
    for key, value in tomllib.loads(extra).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return _toml(data)


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _toml(data: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                zf.write(path, path.relative_to(folder))
    return buf.getvalue()


# -- a running server -----------------------------------------------------------------------

class Server:
    def __init__(self, data: Path, extra_args: list[str], env: dict | None = None,
                 workers: int = 1):
        self.data = data
        cmd = [sys.executable, "-m", "dockyard", "--data", str(data), "serve", "--port", "0",
               "--deploy-dir", "", *extra_args]
        self.log_path = data.parent / f"{data.name}-serve.log"
        self.log = open(self.log_path, "w")
        # Its own process group, so that a test can kill serve's whole group as an operator's
        # `kill -9 -PGID` would, without killing pytest.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=ROOT, env=env or dict(os.environ),
                                     start_new_session=True)
        self.url = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            match = re.search(r"dockyard listening on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                break
        if not self.url:
            self.stop()
            raise RuntimeError("serve did not start:\n" + self.log_path.read_text()[-4000:])
        self.admin = (data / "tokens" / "admin").read_text().strip()
        self.worker_token = (data / "tokens" / "worker").read_text().strip()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.admin}"
        if workers:
            try:
                self.wait_workers(workers)
            except BaseException:
                self.stop()   # a server that never got ready is never left running
                raise

    def wait_workers(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if requests.get(self.url + "/healthz", timeout=5).json()["workers"] >= n:
                return
            time.sleep(0.1)
        raise AssertionError(f"{n} worker(s) never became ready")

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return self.http.request(method, self.url + path, **kwargs)

    def deploy(self, folder: Path, wait: bool = True, expect: str = "ready") -> dict:
        response = self.api("POST", "/api/containers", data=zip_folder(folder))
        assert response.status_code in (200, 201), response.text
        record = response.json()
        if wait and record.get("deployment"):
            dep = self.wait_deployment(record["deployment"])
            assert dep["status"] == expect, dep
            record["deployment_detail"] = dep
        return record

    def wait_deployment(self, deployment_id: str, timeout: float = 180) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            dep = self.api("GET", f"/api/deployments/{deployment_id}").json()
            if dep["status"] in ("ready", "failed", "superseded"):
                return dep
            time.sleep(0.1)
        raise AssertionError(f"deployment {deployment_id} did not finish: {dep}")

    def invoke(self, target: str, event=None, **kwargs) -> requests.Response:
        data = None if event is None else json.dumps(event)
        return requests.post(f"{self.url}/invoke/{target}", data=data, timeout=120, **kwargs)

    def wait_invocation(self, invocation_id: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            inv = self.api("GET", f"/api/invocations/{invocation_id}").json()
            if inv["status"] not in ("queued", "running"):
                return inv
            time.sleep(0.1)
        raise AssertionError(f"invocation {invocation_id} still {inv['status']}")

    def cli(self, *args: str, check: bool = True, input: str | None = None):
        env = dict(os.environ, DOCKYARD_URL=self.url, DOCKYARD_TOKEN=self.admin)
        done = subprocess.run([sys.executable, "-m", "dockyard", "--data", str(self.data), *args],
                              capture_output=True, text=True, env=env, input=input, timeout=300)
        if check:
            assert done.returncode == 0, (done.stdout, done.stderr)
        return done

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        procs = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        gone, alive = psutil.wait_procs(procs, timeout=10)
        leftovers = [p for p in sandbox_processes(self.data) if p not in alive]
        self.leftovers = []
        for p in alive + leftovers:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    self.leftovers.append(p)
                p.kill()
            except psutil.NoSuchProcess:
                pass   # it ended on its own between the listing and now
        self.log.close()
        return self.proc.returncode


def terminate(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, and a kill if it has not ended within `timeout`: a process's graceful stop."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def poll_until(check, timeout: float, what: str, every: float = 0.05):
    """`check()`'s first truthy answer within `timeout` seconds; fails saying `what` if none."""
    end = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > end:
            raise AssertionError(f"{what} within {timeout:g}s")
        time.sleep(every)


def one_line_error(done) -> str:
    """A CLI command's error: exit 1, one line `Error: …` on stderr, no traceback."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def instance_uids(data: Path) -> set[int]:
    """The uids the host-wide registry gave this data dir's containers."""
    try:
        with sqlite3.connect(data / "dockyard.db") as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = 'instance_id'").fetchone()
        registry = json.loads(UID_REGISTRY.read_text())
    except (sqlite3.Error, OSError, ValueError):
        return set()
    if not row:
        return set()
    return {uid for key, uid in registry["uids"].items() if key.startswith(row[0] + ".")}


def sandbox_processes(data: Path) -> list[psutil.Process]:
    """Any process still running for this data dir: a function process (one of its
    containers' uids) or a launcher (working directory below the data dir)."""
    found = []
    marker = str(data)
    uids = instance_uids(data)
    for p in psutil.process_iter(["cmdline", "cwd", "uids"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["uids"] and p.info["uids"].real in uids:
                found.append(p)
            elif marker in cmd or (p.info["cwd"] or "").startswith(marker):
                found.append(p)
        except psutil.Error:
            pass
    return found


def container_processes(data: Path, container: str) -> dict[int, str]:
    """The function processes (host pids) of a container: bootstrap pid -> version. Each one
    runs below a launcher whose working directory is the version's folder on the host."""
    found = {}
    folder = str(data / "worker" / container) + "/"
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cwd = (p.info["cwd"] or "") + "/"
            if "launch.py" in " ".join(p.info["cmdline"] or []) and cwd.startswith(folder):
                for child in p.children(recursive=True):
                    if "bootstrap" in " ".join(child.cmdline()):
                        found[child.pid] = cwd[len(folder):].strip("/")
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="session")
def private_tmp(tmp_path_factory):
    """Data dirs go here: a folder only root can enter (0700, like every home folder), as a
    user's checkout would be."""
    root = tmp_path_factory.mktemp("data")
    os.chmod(root, 0o700)
    return root


@pytest.fixture(scope="session")
def server(private_tmp, wheelhouse):
    data = private_tmp / "serve" / "data"
    data.parent.mkdir()
    # An operator variable that must never reach a function.
    env = dict(os.environ, OPERATOR_SECRET="hunter2")
    srv = Server(data, ["--find-links", str(wheelhouse), "--offline"], env=env)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert not srv.leftovers, srv.leftovers


@pytest.fixture
def pkg(tmp_path):
    def make(source: str, **kwargs) -> Path:
        return make_package(tmp_path, source, **kwargs)
    return make

"""Starting what the benchmarks measure: a real `dockyard serve` on a free port, the bare
Flask baseline under the same gunicorn settings, and a throwaway PostgreSQL server for a
`serve --db` (devtools/postgres.py, the tests' server too)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import requests

from devtools.postgres import PostgresServer, unavailable_reason

# The function every warm-path measurement calls: it returns its event.
NOOP = "def f(event):\n    return event\n"
GUNICORN_SETTINGS = ["--workers", "2", "--worker-class", "gthread", "--threads", "8",
                     "--keep-alive", "75"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dockyard:
    """`dockyard serve` on its own temp data dir: its state in SQLite there (the default),
    or in PostgreSQL when extra_args has `--db URL`; never by a DOCKYARD_DB of the caller's."""

    def __init__(self, extra_args: list[str] = (), prefix: str = "dockyard-bench-",
                 tokens_of: "Dockyard | None" = None):
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        if "--no-view" in extra_args:
            # Without a view, children reach their code through host paths.
            self.root.chmod(0o711)
        self.data = self.root / "data"
        if tokens_of is not None:
            # A second control plane on the same database takes the first one's tokens.
            shutil.copytree(tokens_of.data / "tokens", self.data / "tokens")
        self.log = open(self.root / "serve.log", "w")
        env = {k: v for k, v in os.environ.items() if k != "DOCKYARD_DB"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dockyard", "--data", str(self.data), "serve", "--port", "0",
             "--deploy-dir", "", *extra_args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        try:
            self._wait_started(extra_args)
        except BaseException:
            self.stop()   # neither the server nor its folder outlives a failed or interrupted start
            raise

    def _wait_started(self, extra_args) -> None:
        self.url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                break
            found = re.search(r"dockyard listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
        if not self.url:
            raise RuntimeError("dockyard serve did not start:\n" +
                               (self.root / "serve.log").read_text(errors="replace")[-3000:])
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Bearer " + (
            self.data / "tokens" / "admin").read_text().strip()
        while "--no-local-worker" not in extra_args and \
                requests.get(self.url + "/healthz", timeout=5).json()["workers"] < 1:
            time.sleep(0.05)

    def upload(self, package: bytes) -> dict:
        response = self.http.post(self.url + "/api/containers", data=package, timeout=60)
        response.raise_for_status()
        return response.json()

    def wait_ready(self, deployment: str) -> None:
        while True:
            dep = self.http.get(f"{self.url}/api/deployments/{deployment}", timeout=60).json()
            if dep["status"] == "ready":
                return
            if dep["status"] in ("failed", "superseded"):
                raise RuntimeError(f"deploy {dep['status']}: {dep['error']}")
            time.sleep(0.002)

    def deploy(self, package: bytes) -> dict:
        record = self.upload(package)
        if record.get("deployment"):
            self.wait_ready(record["deployment"])
        return record

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_database(name: str = "dockyard_bench"):
    """A throwaway PostgreSQL server with one empty database: yields (its URL, "") for
    `serve --db`, or (None, why) when no server can be started here (PostgreSQL not
    installed). The server is stopped and its folder removed however the block ends."""
    why = unavailable_reason()
    if why:
        yield None, why
        return
    server = PostgresServer()
    try:
        server.start()
        yield server.url(server.create_database(name)), ""
    finally:
        server.stop()


class BareFlask:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}",
             *GUNICORN_SETTINGS, "--log-level", "warning", "bench.bare_app:app"],
            cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.post(self.url + "/echo", data="{}", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.05)
        raise RuntimeError("the bare Flask baseline did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def package(name: str, source: str, manifest: str = "", version: str | None = None) -> bytes:
    """A zip package with `main.py` = source."""
    buf = io.BytesIO()
    head = f'name = "{name}"\n' + (f'version = "{version}"\n' if version else "")
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dockyard.toml", head + manifest)
        zf.writestr("main.py", source)
    return buf.getvalue()


def tiny_wheelhouse(folder: Path) -> Path:
    """A wheelhouse with one pure-Python wheel, written by hand (no index needed)."""
    import base64
    import hashlib
    folder.mkdir(parents=True, exist_ok=True)
    files = {"benchdep/__init__.py": "def value():\n    return 42\n",
             "benchdep-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: benchdep\n"
                                                 "Version: 1.0\n",
             "benchdep-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: bench\n"
                                             "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text)}")
    files["benchdep-1.0.dist-info/RECORD"] = "\n".join(record) + "\nbenchdep-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / "benchdep-1.0-py3-none-any.whl", "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return folder

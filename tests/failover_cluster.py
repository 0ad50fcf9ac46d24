"""A control plane with no local worker and extra `dockyard worker` processes on this host, each
with its own data dir: what the failover tests and the failover benchmark freeze and kill.
Every process started here is ended by `stop()` (a frozen one is continued first)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from conftest import terminate

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerProcess:
    data: Path
    proc: subprocess.Popen
    log: object
    frozen: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def freeze(self) -> None:
        self.frozen = True
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.frozen:
            os.kill(self.pid, signal.SIGCONT)
            self.frozen = False

    def processes(self) -> list[psutil.Process]:
        """The worker and every process under it (its function processes)."""
        try:
            me = psutil.Process(self.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.thaw()
        terminate(self.proc)
        self.log.close()


def start_worker(url: str, token: str, data: Path, extra: list[str] = ()) -> WorkerProcess:
    data.parent.mkdir(parents=True, exist_ok=True)
    token_file = data.parent / f"{data.name}-token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    log = open(data.parent / f"{data.name}-worker.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "DOCKYARD_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "--data", str(data), "worker", "--server", url,
         "--token-file", str(token_file), *extra], env=env, stdout=log, stderr=log,
        cwd=ROOT, start_new_session=True)
    return WorkerProcess(data, proc, log)


def workers(url: str, admin: str) -> list[dict]:
    return requests.get(url + "/api/workers", headers={"Authorization": f"Bearer {admin}"},
                        timeout=10).json()["workers"]


def runs(worker: WorkerProcess) -> collections.Counter:
    """How often the failover function ran each invocation id on `worker`'s processes: the
    markers in each process's private /tmp, read through /proc (as root)."""
    found: collections.Counter = collections.Counter()
    roots = set()
    for p in worker.processes():
        try:
            root = os.stat(f"/proc/{p.pid}/root/tmp")
            if (root.st_dev, root.st_ino) in roots:
                continue    # the same /tmp seen through another process of the same view
            roots.add((root.st_dev, root.st_ino))
            found.update(os.listdir(f"/proc/{p.pid}/root/tmp/runs"))
        except OSError:
            pass
    return found


@dataclass
class Answer:
    started: float
    finished: float
    status: int
    invocation_id: str | None
    may_have_run: bool | None
    worker: str | None = None


@dataclass
class Load:
    """Client threads calling one function in a loop, each answer noted with its times."""

    url: str
    target: str
    clients: int
    event: dict = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Load":
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _client(self) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                response = session.post(f"{self.url}/invoke/{self.target}", json=self.event,
                                        timeout=60)
            except requests.RequestException:
                self.answers.append(Answer(started, time.monotonic(), 0, None, None))
                continue
            finished = time.monotonic()
            invocation_id = response.headers.get("X-Dockyard-Invocation-Id")
            may_have_run = None
            if response.status_code != 200:
                try:
                    body = response.json()
                    invocation_id = body.get("invocation_id") or invocation_id
                    may_have_run = bool(body["error"].get("may_have_run"))
                except (ValueError, KeyError, AttributeError):
                    pass
                if response.status_code == 429:
                    time.sleep(0.05)
            self.answers.append(Answer(started, finished, response.status_code, invocation_id,
                                       may_have_run))

    def stop(self) -> list[Answer]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)
        return list(self.answers)


def wait_for(what: str, check, timeout: float, interval: float = 0.02):
    """Poll `check` until it returns something true; its value, or AssertionError."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)

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


def _markers(worker: WorkerProcess) -> dict[tuple, set[str]]:
    """The failover function's markers in each private /tmp under `worker`, read through /proc
    (as root), by the view they are in: its /tmp's device and inode, and when the view's
    oldest process (its first, which it lives as long as) started."""
    views: dict[tuple, list[psutil.Process]] = {}
    for p in worker.processes():
        try:
            root = os.stat(f"/proc/{p.pid}/root/tmp")
            views.setdefault((root.st_dev, root.st_ino), []).append(p)
        except OSError:
            pass
    found: dict[tuple, set[str]] = {}
    for root, procs in views.items():
        for p in procs:
            try:
                ids = set(os.listdir(f"/proc/{p.pid}/root/tmp/runs"))
                first = min(q.create_time() for q in procs if q.is_running())
            except (OSError, psutil.Error, ValueError):
                continue
            found[(*root, first)] = ids
            break
    return found


def runs(worker: WorkerProcess) -> collections.Counter:
    """How often the failover function ran each invocation id on `worker`'s live processes."""
    return collections.Counter(i for ids in _markers(worker).values() for i in ids)


class RunLog:
    """How often the failover function ran each call on some workers, processes that ended
    since included: their markers are read every 0.1 s while it runs (a process replaced
    after a frozen call takes its private /tmp with it)."""

    def __init__(self, workers: list[WorkerProcess]):
        self.workers = workers
        self.seen: dict[tuple, set[str]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._scan_until_stopped, daemon=True)

    def start(self) -> "RunLog":
        self.thread.start()
        return self

    def _scan(self) -> None:
        for worker in self.workers:
            for key, ids in _markers(worker).items():
                self.seen.setdefault(key, set()).update(ids)

    def _scan_until_stopped(self) -> None:
        while not self.stopped.wait(0.1):
            self._scan()

    def stop(self) -> collections.Counter:
        self.stopped.set()
        self.thread.join(10)
        self._scan()
        return collections.Counter(i for ids in self.seen.values() for i in ids)


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

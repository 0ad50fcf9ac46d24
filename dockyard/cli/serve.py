"""`dockyard serve`: the control plane under gunicorn, the async dispatcher, the scheduler, the
deploy-folder watcher and one local worker, supervised together. SIGTERM / Ctrl-C stops them
all once the calls under way have ended (saying what it waits for, and answering health
checks meanwhile); a second one stops those calls at once."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ..app.datadir import DataDir, InUse, hold_lock, process_start, record_server
from ..app.datadir import TOKEN_KINDS
from ..app.store import tokens as token_store
from ..app.store.db import connect, migrate
from ..app.store.engine import redacted, transient_errors
from ..app.store.route_listener import RouteListener
from ..app.invoke.dispatcher import Dispatcher
from ..app.jobs.retention import Retention
from ..app.processes.scheduler import SchedulerProcess
from ..app.processes.watcher import WatcherProcess
from ..app.processes.web import WebServer
from ..app.processes.worker import LocalWorkerProcess
from .serve_stop import ServeStop
from ..common.protocol import WORKER_CONFIG_EXIT

log = logging.getLogger("dockyard.serve")

PR_SET_PDEATHSIG = 1
# serve says it listens once the deploy folder's packages are deployed, or after this long.
DEPLOY_FOLDER_WAIT_S = 60.0


def _raise_open_files(wanted: int = 65536) -> None:
    """Web threads keep a socket per function process they call (direct channels): lift the
    soft limit on open files (1024 by default) towards the hard one, for serve and all it
    starts. Function processes get their own limit from the sandbox."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass


def _die_with_parent() -> None:
    """Children get SIGTERM if serve itself is killed, so nothing is left behind. Ctrl-C
    reaches the terminal's whole process group: it is serve's to act on (see serve_stop.py),
    so they start with it ignored (gunicorn and the worker keep it so), and SIGHUP too."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def retention_options(keep_invocations: str, keep_versions: str, prune_every: str,
                      forget_workers_after: str = "10m") -> Retention:
    """serve's retention options; a bad one is a usage error naming it."""
    import click

    from ..app.jobs.retention import setting
    from ..common.durations import parse_duration

    def versions(text: str) -> int:
        number = int(text)
        if number < 0:
            raise ValueError
        return number

    try:
        invocations_s = setting(keep_invocations, parse_duration)
    except ValueError:
        raise click.BadParameter("give a duration such as 90s, 10m, 2h or 7d (0 or off: keep "
                                 "every record)", param_hint="--keep-invocations") from None
    try:
        kept_versions = setting(keep_versions, versions)
    except ValueError:
        raise click.BadParameter("give a number of versions, such as 10 (0 or off: keep them "
                                 "all)", param_hint="--keep-versions") from None
    try:
        every_s = parse_duration(prune_every)
        if every_s <= 0:
            raise ValueError
    except ValueError:
        raise click.BadParameter("give a duration above 0, such as 60s or 10m",
                                 param_hint="--prune-every") from None
    try:
        forget_s = setting(forget_workers_after, parse_duration)
    except ValueError:
        raise click.BadParameter("give a duration such as 90s, 10m or 1h (0 or off: keep "
                                 "every worker)", param_hint="--forget-workers-after") from None
    return Retention(invocations_s, kept_versions, every_s, forget_s)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    data: str | None = None
    deploy_dir: str | None = "deploy"
    deploy_poll: float | None = None
    web_workers: int = 2
    threads: int = 8
    # Threads per web process on top of `threads` that one container's synchronous calls
    # never take: kept for the other containers (see app/invoke/sync.py). 0: no bound.
    web_reserve: int = 4
    local_worker: bool = True
    invoke_auth: bool = False
    # /metrics without a token (it lists every container and its call counts).
    public_metrics: bool = False
    worker_args: list[str] = field(default_factory=list)
    retention: Retention = field(default_factory=Retention)


class Supervisor(ServeStop):
    def __init__(self, options: ServeOptions):
        self.options = options
        self.data = DataDir.at(options.data)
        self.signals: list[int] = []
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        self.web: WebServer | None = None
        self.worker: LocalWorkerProcess | None = None
        self.dispatcher: Dispatcher | None = None
        self.scheduler: SchedulerProcess | None = None
        self.deploy_watcher: WatcherProcess | None = None
        self.routes: RouteListener | None = None   # other control planes' route changes
        self.url = ""
        self.started_at = time.time()
        self.server_note: Path | None = None   # where the CLI finds this server (datadir.py)
        self.worker_lock: int | None = None    # the worker folder's, for the local worker
        self.server_lock: int | None = None    # held by the serve that owns server.json
        self.owns_server_json = False          # the first serve on a data dir writes it

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.signals.append(signum)
        try:
            os.write(self.wake_write, b".")
        except BlockingIOError:
            pass

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self.options.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Set before listen(): connections accepted before gunicorn is up inherit it (gunicorn
        # sets it only on what it accepts itself), so no answer waits for a delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.options.host, self.options.port))
        except OSError as exc:
            raise SystemExit(f"dockyard: cannot listen on {self.options.host}:"
                             f"{self.options.port}: {exc.strerror}; pick another --port "
                             "(0 = any free port)") from None
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def _env(self) -> dict:
        env = dict(os.environ)
        env["DOCKYARD_DATA_DIR"] = str(self.data.root)
        env["DOCKYARD_INVOKE_AUTH"] = "true" if self.options.invoke_auth else "false"
        env["DOCKYARD_PUBLIC_METRICS"] = "true" if self.options.public_metrics else "false"
        env["DOCKYARD_WEB_THREADS"] = str(self.web_threads)
        env["DOCKYARD_WEB_RESERVE"] = str(self.options.web_reserve)
        return env

    @property
    def web_threads(self) -> int:
        """A web process's threads: one container may hold `threads` of them (as many as a
        lone container always had), the reserve is on top."""
        return self.options.threads + self.options.web_reserve

    def _start_web(self, sock: socket.socket) -> None:
        self.web = WebServer(self.options.web_workers, self.web_threads, self._env(),
                             _die_with_parent)
        self.web.start(sock)

    def _start_worker(self) -> None:
        self.worker = LocalWorkerProcess(self.data, self.url, self.options.worker_args,
                                         self._env(), _die_with_parent, self.worker_lock)
        self.worker.start()

    def _wait_worker(self, timeout: float = 60.0) -> None:
        """Until the local worker registered: a worker that cannot run on this host stops serve
        here, with its one line above, instead of serve saying it listens and retrying."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.signals:
            code = self.worker.poll()
            if code == WORKER_CONFIG_EXIT:
                raise SystemExit("dockyard: the local worker cannot run on this host (its "
                                 "reason is above); stopping")
            if code is not None:
                return  # another failure: supervised and restarted like any later one
            try:
                if requests.get(self.url + "/healthz", timeout=1).json().get("workers"):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)

    def _wait_deploy_folder(self, timeout: float = DEPLOY_FOLDER_WAIT_S) -> None:
        """Until the packages in the deploy folder are deployed (or failed): a call sent when
        serve says it listens finds them. At most `timeout`; then serve goes on, saying what
        is still deploying."""
        start = time.monotonic()
        said = False
        while not self.signals:
            left = self.deploy_watcher.first_pass_left()
            if not left:
                return
            if not said and time.monotonic() > start + 1.0:
                print(f"deploying {', '.join(left)} from {self.options.deploy_dir}/ …",
                      flush=True)
                said = True
            if time.monotonic() > start + timeout:
                print(f"still deploying {', '.join(left)}; taking calls meanwhile "
                      "(`dockyard status` shows how it goes)", flush=True)
                return
            time.sleep(0.1)

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.web.poll() is not None:
                raise SystemExit("dockyard: the web server exited while starting; see above")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise SystemExit(f"dockyard: the web server did not answer within {timeout:.0f}s")

    def _take_ownership(self) -> None:
        """Before anything starts: the worker folder for the local worker (a data dir whose
        worker folder another serve or worker owns stops this serve here, with one line,
        having touched nothing), and `server.json` if no other serve on this data dir has
        it (several `serve --no-local-worker` may share one data dir)."""
        if self.options.local_worker:
            try:
                self.worker_lock = hold_lock(self.data.worker_lock)
            except InUse as exc:
                raise SystemExit(
                    f"dockyard: the data dir {self.data.root} is in use: its worker folder is "
                    f"held by {exc.holder} (a dockyard serve or worker); stop that one, give "
                    f"this serve its own --data, or start it with --no-local-worker") from None
        try:
            self.server_lock = hold_lock(self.data.server_lock)
            self.owns_server_json = True
        except InUse as exc:
            log.info("%s keeps %s (the CLI finds that serve)", exc.holder,
                     self.data.server_json)

    def run(self) -> int:
        # Everything serve and gunicorn write (the database and its WAL, uploads) is private;
        # what sandboxed children must read is opened up explicitly.
        os.umask(0o077)
        self._take_ownership()
        _raise_open_files()
        self._open_database()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        sock = self._bind()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self._start_web(sock)
        try:
            self._wait_healthy()
        except SystemExit:
            self._stop()
            raise
        sock.close()
        if self.owns_server_json:
            self.data.server_json.write_text(json.dumps({
                "url": self.url, "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                "started_at": self.started_at,
                "retention": self.options.retention.describe()}))
        self.server_note = record_server(self.url, self.data.root, os.getpid())
        self.dispatcher = Dispatcher(self.data.db_target, self.data.read_token("worker"))
        self.dispatcher.start()
        self.scheduler = SchedulerProcess(self.data, _die_with_parent, self.options.retention)
        self.scheduler.start()
        if self.options.local_worker:
            self._start_worker()
            try:
                self._wait_worker()
            except SystemExit:
                self._stop()
                raise
        self.deploy_watcher = WatcherProcess(self.data, self.options.deploy_dir, self.url,
                                             self.options.deploy_poll, _die_with_parent)
        self.deploy_watcher.start()
        if self.options.local_worker:
            self._wait_deploy_folder()
        print(f"dockyard listening on {self.url}", flush=True)
        print(f"admin token: {self.data.token_path('admin')} (the CLI finds it by itself)",
              flush=True)
        code = self._supervise()
        self._stop()
        print("stopped", flush=True)
        return code

    def _open_database(self) -> None:
        """The data dir, and the database brought up to date. A shared database (PostgreSQL)
        keeps the tokens' hashes: the first control plane's tokens are everyone's."""
        data = self.data
        if not data.shared_db:
            data.ensure()
            migrate(data.db_target)
            return
        target = data.db_target
        try:
            migrate(target)
            db = connect(target)
            try:
                have = token_store.stored(db)
                data.ensure(create_tokens=not have)
                local = {kind: data.read_token(kind) for kind in TOKEN_KINDS}
                if not have and all(local.values()):
                    have = token_store.adopt(db, local)
            finally:
                db.close()
        except transient_errors() as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SystemExit(f"dockyard: cannot use the database {redacted(target)}: {first}; "
                             "check the URL given with --db or DOCKYARD_DB") from None
        wrong = [kind for kind in TOKEN_KINDS
                 if not local.get(kind) or token_store.digest(local[kind]) != have.get(kind)]
        if wrong:
            raise SystemExit(
                f"dockyard: the database {redacted(target)} has its own tokens, made by the "
                f"control plane that used it first; this data dir's "
                f"{'are missing' if not any(local.values()) else 'are others'} "
                f"({', '.join(wrong)}): copy that control plane's {data.tokens.name}/ folder "
                f"to {data.tokens} and start again")
        self.routes = RouteListener(target).start()

    def _supervise(self) -> int:
        while not self.signals:
            ready, _, _ = select.select([self.wake_read], [], [], 0.5)
            if ready:
                os.read(self.wake_read, 4096)
            if self.web.poll() is not None:
                log.error("the web server exited (code %s); stopping", self.web.returncode)
                return 1
            if self.deploy_watcher is not None and not self.signals:
                self.deploy_watcher.check()
            if self.scheduler is not None and not self.signals:
                self.scheduler.check()
            if self.worker is not None and not self.signals:
                self.worker.check()
                if self.worker.cannot_run:
                    log.error("the local worker cannot run on this host (its reason is above); "
                              "stopping")
                    return 1
        return 0

    def _stop(self) -> None:
        """Everything serve started (see serve_stop.py), then the notes that point the CLI
        here."""
        self.stop_processes()
        if self.routes is not None:
            self.routes.stop()
        if self.server_note is not None:
            self.server_note.unlink(missing_ok=True)
        if not self.owns_server_json:
            return
        try:
            current = json.loads(self.data.server_json.read_text())
            if current.get("pid") == os.getpid():
                self.data.server_json.unlink()
        except (OSError, ValueError):
            pass

"""serve's handle on the deploy-folder watcher process: started once the control plane
answers, restarted with backoff if it dies, stopped with serve. A folder that is off,
missing or unreadable is one log line, and serve goes on without it."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from .datadir import DataDir
from .db import connect
from .deployfiles import folder_problem
from .deploywatch import FOLDER_GONE_EXIT
from .store import deployfolder as store

log = logging.getLogger("dockyard.serve")

STOP_GRACE_S = 10.0
HEALTHY_AFTER_S = 60.0    # a watcher that ran this long starts its backoff afresh


class WatcherProcess:
    def __init__(self, data: DataDir, folder: str | None, url: str,
                 poll_s: float | None = None, preexec_fn=None):
        self.data = data
        self.folder = Path(folder).absolute() if folder else None
        self.url = url
        self.poll_s = poll_s
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        if self.folder is None:
            self._record(enabled=False, folder=None)
            return
        problem = folder_problem(self.folder)
        if problem:
            log.warning("deploy folder %s %s; serving without it (--deploy-dir DIR picks "
                        "another, --no-deploy-dir turns it off)", self.folder, problem)
            self._record_problem(problem)
            return
        self._spawn()

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "dockyard.app.deploywatch", "--data", str(self.data.root),
               "--folder", str(self.folder), "--server", self.url]
        if self.poll_s:
            cmd += ["--poll", str(self.poll_s)]
        self.proc = subprocess.Popen(cmd, preexec_fn=self.preexec_fn)
        self.started_at = time.monotonic()
        self._record(enabled=True, folder=str(self.folder), pid=self.proc.pid)

    def check(self) -> None:
        """From serve's loop: restart a watcher that exited, after a growing delay."""
        if self.proc is None or self.proc.poll() is None:
            return
        moment = time.monotonic()
        if self.restart_at is None:
            code = self.proc.returncode
            problem = folder_problem(self.folder)
            if code == FOLDER_GONE_EXIT and problem:
                log.warning("deploy folder %s %s; serving without it", self.folder, problem)
                self._record_problem(problem)
                self.proc = None
                return
            if moment - self.started_at > HEALTHY_AFTER_S:
                self.restarts = 0
            delay = min(30.0, 2.0 ** min(self.restarts, 5))
            log.warning("the deploy-folder watcher exited (code %s); restarting in %.0fs",
                        code, delay)
            self.restart_at = moment + delay
        elif moment >= self.restart_at:
            self.restarts += 1
            self.restart_at = None
            self._spawn()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _record_problem(self, problem: str) -> None:
        self._record(enabled=False, folder=str(self.folder), problem=f"{self.folder} {problem}")

    def _record(self, **status) -> None:
        db = connect(self.data.db_path)
        try:
            store.save_status(db, **status)
        finally:
            db.conn.close()

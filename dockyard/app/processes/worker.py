"""serve's handle on its local worker: started once the control plane answers, restarted with
a growing delay if it dies (what it ran is started again from the venvs on disk), stopped
after the scheduler and the dispatcher, with time to drain. A worker that cannot run on this
host (exit 78) is not restarted: serve stops with the worker's reason. What happens to it is
recorded for the 503s that say why no worker is there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ...common.protocol import WORKER_CONFIG_EXIT
from ...runner.agent import STOP_REASON_ENV
from ...runner.server import UNIX_PATH_MAX
from ..datadir import LOCK_FD_ENV, DataDir
from ..store.db import connect
from ..store import workers as worker_store
from .supervised import SupervisedProcess, log

# Why a call serve stopped at once ended (a second Ctrl-C), in its record.
STOP_REASON = "server stopped"


class LocalWorkerProcess(SupervisedProcess):
    name = "local worker"
    stop_grace_s = 90.0          # the worker drains its calls first

    def __init__(self, data: DataDir, url: str, worker_args: list[str], env: dict,
                 preexec_fn=None, lock_fd: int | None = None):
        super().__init__(preexec_fn)
        self.data = data
        # serve's lock on the worker folder, handed to each run of the worker (the same open
        # file: it holds it with serve, and nobody else can take the folder between runs).
        self.lock_fd = lock_fd
        self.url = url
        self.worker_args = worker_args
        self.base_env = env
        self.listen = self._listen()
        self.cannot_run = False      # it exited 78: serve stops

    def _listen(self) -> str:
        """A Unix socket inside the data dir: sandboxed functions never see the data dir,
        while a loopback port is open to every function that has network access."""
        path = self.data.worker / "invoke.sock"
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            log.warning("the local worker listens on 127.0.0.1, not on a Unix socket: %s is "
                        "longer than the %d bytes a socket path may have", path, UNIX_PATH_MAX)
            return "127.0.0.1:0"
        return f"unix:{path}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dockyard", "--data", str(self.data.root), "worker",
                "--server", self.url, "--listen", self.listen, *self.worker_args]

    def env(self) -> dict:
        env = dict(self.base_env, DOCKYARD_TOKEN=self.data.read_token("worker") or "")
        # What the calls it stops at once are told (see halt).
        env[STOP_REASON_ENV] = STOP_REASON
        if self.lock_fd is not None:
            env[LOCK_FD_ENV] = str(self.lock_fd)
        return env

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.command(), preexec_fn=self.preexec_fn, env=self.env(),
                                     pass_fds=() if self.lock_fd is None else (self.lock_fd,))
        self.started_at = time.monotonic()
        self.spawned()

    def spawned(self) -> None:
        self._state("running")

    def halt(self) -> None:
        """Stop every call it runs, now (each answered cancelled, "server stopped"), and exit
        (SIGUSR1: two SIGTERMs sent at once may arrive as one)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def exited(self, code: int) -> bool:
        if code == WORKER_CONFIG_EXIT:
            self.cannot_run = True
            self._state("stopped", "cannot run on this host (see serve's log)")
            return True
        self._state("exited", f"exited (code {code}) and is restarting")
        return False

    def _state(self, state: str, reason: str = "") -> None:
        db = connect(self.data.db_target)
        try:
            worker_store.set_local_worker_state(db, state, reason)
        finally:
            db.close()

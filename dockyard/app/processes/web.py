"""serve's handle on its web processes: gunicorn (gthread processes) on the socket serve bound,
running the app behind the stop gate (app/stopping.py), with the page through which serve
tells them it stops and they tell it the calls they have in flight (app/serve_state.py); and
their stop, graceful (answers under way are written, kept-alive connections closed) or at
once. gunicorn's control socket (a file in the home folder, the same for every gunicorn of
the user) is off: serve alone starts and stops it."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time

import psutil

from ..serve_state import FD_ENV, InFlight, ServeState

log = logging.getLogger("dockyard.serve")

# A web process that has not said what it has in flight this long after serve began to stop
# is not waited for (it is stuck, or still starting: gunicorn's own graceful stop still lets
# whatever it runs finish).
REPORT_WAIT_S = 5.0
GRACEFUL_WAIT_S = 70.0       # gunicorn's --graceful-timeout and a margin


class WebServer:
    def __init__(self, workers: int, threads: int, env: dict, preexec_fn=None):
        self.workers = workers
        self.threads = threads
        self.env = env
        self.preexec_fn = preexec_fn
        self.page = ServeState.create()
        self.proc: subprocess.Popen | None = None
        self.stopping_since: float | None = None     # epoch
        self.sent: set[int] = set()      # the stop signals sent
        self.not_reporting: set[int] = set()

    def start(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        cmd = [sys.executable, "-m", "gunicorn", "--bind", f"fd://{fd}",
               "--workers", str(self.workers), "--worker-class", "gthread",
               "--threads", str(self.threads), "--keep-alive", "75",
               "--graceful-timeout", "60", "--timeout", "120", "--log-level", "warning",
               "--name", "dockyard-web", "--no-control-socket",
               "--config", "python:dockyard.app.processes.gunicorn_hooks",
               "dockyard.app.stopping:served_app()"]
        env = dict(self.env, **{FD_ENV: str(self.page.fd)})
        self.proc = subprocess.Popen(cmd, pass_fds=(fd, self.page.fd), env=env,
                                     stdin=subprocess.DEVNULL, preexec_fn=self.preexec_fn)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def pids(self) -> list[int]:
        """The web processes (gunicorn's arbiter's children)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []

    # -- the stop ---------------------------------------------------------------------------

    def set_state(self, state: int) -> None:
        """Tell the web processes (serve_state: STOPPING, HALTING)."""
        if self.stopping_since is None:
            self.stopping_since = time.time()
        if self.page is not None:
            self.page.set(state)

    def in_flight(self) -> InFlight | None:
        """The synchronous calls the web processes have in flight, as they said since serve
        began to stop; None until each one has said it (one that has not within
        REPORT_WAIT_S is not waited for)."""
        if self.stopping_since is None or self.page is None:
            return None
        total, unknown = self.page.in_flight(self.pids(), self.stopping_since)
        if unknown and time.time() - self.stopping_since < REPORT_WAIT_S:
            return None
        for pid in set(unknown) - self.not_reporting:
            self.not_reporting.add(pid)
            log.warning("web process %d does not say what it has in flight; not waiting for "
                        "it", pid)
        return total

    def terminate(self) -> None:
        """Stop gracefully (SIGTERM): what is under way is answered, kept-alive connections
        are closed within two seconds."""
        self._signal(signal.SIGTERM)

    def quit(self) -> None:
        """Stop at once (SIGQUIT): for when the calls have been answered already (the
        answers being written still are, then each web process exits)."""
        self._signal(signal.SIGQUIT)

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None and signum not in self.sent:
            self.sent.add(signum)
            self.proc.send_signal(signum)

    def finish(self) -> None:
        """If it is still there: stop at once, and kill it a second later."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.quit()
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self._kill()
        if self.page is not None:
            self.page.close()
            self.page = None

    def _kill(self) -> None:
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()

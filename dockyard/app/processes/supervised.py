"""A helper process that `serve` runs beside gunicorn (the scheduler, the deploy-folder
watcher, the local worker): started, restarted with a growing delay if it dies, stopped on
the way out. One
shape for all of them, in the way of gunicorn's arbiter: serve's loop calls `check()`."""

from __future__ import annotations

import logging
import signal
import subprocess
import time

log = logging.getLogger("dockyard.serve")

STOP_GRACE_S = 10.0
HEALTHY_AFTER_S = 60.0    # a process that ran this long starts its backoff afresh
MAX_DELAY_S = 30.0


class SupervisedProcess:
    name = "helper process"
    first_delay_s = 0.5       # the wait before the first restart; it doubles each time
    stop_grace_s = STOP_GRACE_S

    def __init__(self, preexec_fn=None):
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.restart_at: float | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict | None:
        """The process's environment (None: serve's own)."""
        return None

    def start(self) -> None:
        self.spawn()

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.command(), preexec_fn=self.preexec_fn, env=self.env())
        self.started_at = time.monotonic()
        self.spawned()

    def spawned(self) -> None:
        """Called after each start (the first and every restart)."""

    def poll(self) -> int | None:
        """The exit code once the process has exited (None while it runs or before it ran)."""
        return None if self.proc is None else self.proc.poll()

    def exited(self, code: int) -> bool:
        """Called once when the process has exited; True means: do not restart it."""
        return False

    def check(self) -> None:
        """From serve's loop: restart a process that exited, after a growing delay."""
        if self.proc is None or self.proc.poll() is None:
            return
        moment = time.monotonic()
        if self.restart_at is None:
            if self.exited(self.proc.returncode):
                self.proc = None
                return
            if moment - self.started_at > HEALTHY_AFTER_S:
                self.restarts = 0
            delay = min(MAX_DELAY_S, self.first_delay_s * 2 ** min(self.restarts, 10))
            log.warning("the %s exited (code %s); restarting in %.1fs", self.name,
                        self.proc.returncode, delay)
            self.restart_at = moment + delay
        elif moment >= self.restart_at:
            self.restarts += 1
            self.restart_at = None
            self.spawn()

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM); `wait_stopped` waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` (default: stop_grace_s) for the process to exit, then kill
        it."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=self.stop_grace_s if timeout is None else max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

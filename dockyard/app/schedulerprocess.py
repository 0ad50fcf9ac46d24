"""serve's handle on the scheduler process: started once the control plane answers, restarted
with a growing delay if it dies (fires are not lost meanwhile: the next scheduler runs the
latest missed one within its starting deadline and records the rest as missed), stopped
first on the way out."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from .datadir import DataDir

log = logging.getLogger("dockyard.serve")

STOP_GRACE_S = 10.0
HEALTHY_AFTER_S = 60.0    # a scheduler that ran this long starts its backoff afresh


class SchedulerProcess:
    def __init__(self, data: DataDir, preexec_fn=None):
        self.data = data
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dockyard.app.scheduler", "--data", str(self.data.root)],
            preexec_fn=self.preexec_fn)
        self.started_at = time.monotonic()

    def check(self) -> None:
        """From serve's loop: restart a scheduler that exited, after a growing delay."""
        if self.proc is None or self.proc.poll() is None:
            return
        moment = time.monotonic()
        if self.restart_at is None:
            if moment - self.started_at > HEALTHY_AFTER_S:
                self.restarts = 0
            delay = min(30.0, 0.5 * 2 ** min(self.restarts, 6))
            log.warning("the scheduler exited (code %s); restarting in %.1fs",
                        self.proc.returncode, delay)
            self.restart_at = moment + delay
        elif moment >= self.restart_at:
            self.restarts += 1
            self.restart_at = None
            self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

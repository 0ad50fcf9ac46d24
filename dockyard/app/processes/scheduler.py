"""serve's handle on the scheduler process: started once the control plane answers, restarted
with a growing delay if it dies (fires are not lost meanwhile: the next scheduler runs the
latest missed one within its starting deadline and records the rest as missed), stopped
first on the way out."""

from __future__ import annotations

import sys

from ..datadir import DataDir
from ..jobs.retention import Retention
from .supervised import SupervisedProcess


class SchedulerProcess(SupervisedProcess):
    name = "scheduler"

    def __init__(self, data: DataDir, preexec_fn=None, retention: Retention | None = None):
        super().__init__(preexec_fn)
        self.data = data
        self.retention = retention or Retention()

    def command(self) -> list[str]:
        r = self.retention
        return [sys.executable, "-m", "dockyard.app.jobs.scheduler", "--data", str(self.data.root),
                "--keep-invocations", "off" if not r.invocations_s else f"{r.invocations_s:g}s",
                "--keep-versions", "off" if not r.versions else str(r.versions),
                "--prune-every", f"{r.every_s:g}s",
                "--forget-workers-after",
                "off" if not r.forget_workers_s else f"{r.forget_workers_s:g}s"]

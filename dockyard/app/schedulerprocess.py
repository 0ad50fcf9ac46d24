"""serve's handle on the scheduler process: started once the control plane answers, restarted
with a growing delay if it dies (fires are not lost meanwhile: the next scheduler runs the
latest missed one within its starting deadline and records the rest as missed), stopped
first on the way out."""

from __future__ import annotations

import sys

from .datadir import DataDir
from .supervised import SupervisedProcess


class SchedulerProcess(SupervisedProcess):
    name = "scheduler"

    def __init__(self, data: DataDir, preexec_fn=None):
        super().__init__(preexec_fn)
        self.data = data

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dockyard.app.scheduler", "--data", str(self.data.root)]

"""serve's handle on the deploy-folder watcher process: started once the control plane
answers, restarted with backoff if it dies, stopped with serve. A folder that is off,
missing or unreadable is one log line, and serve goes on without it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..datadir import DataDir
from ..store.db import connect
from ..deployfolder.entry import EntryState
from ..deployfolder.files import folder_problem, packages_in
from ..deployfolder.watch import FOLDER_GONE_EXIT
from ..store import deployfolder as store
from .supervised import SupervisedProcess

log = logging.getLogger("dockyard.serve")

# An entry in one of these states has been looked at and is not on its way anywhere: deployed,
# failed, undeployed, skipped, or not whole yet (waiting for its writer: nothing to wait for).
LOOKED_AT = {EntryState.DEPLOYED, EntryState.FAILED, EntryState.UNDEPLOYED, EntryState.SKIPPED,
             EntryState.PENDING}

class WatcherProcess(SupervisedProcess):
    name = "deploy-folder watcher"
    first_delay_s = 1.0

    def __init__(self, data: DataDir, folder: str | None, url: str,
                 poll_s: float | None = None, preexec_fn=None):
        super().__init__(preexec_fn)
        self.data = data
        self.folder = Path(folder).absolute() if folder else None
        self.url = url
        self.poll_s = poll_s

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
        self.spawn()

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "dockyard.app.deployfolder.watch", "--data", str(self.data.root),
               "--folder", str(self.folder), "--server", self.url]
        if self.poll_s:
            cmd += ["--poll", str(self.poll_s)]
        return cmd

    def spawn(self) -> None:
        super().spawn()
        self._record(enabled=True, folder=str(self.folder), pid=self.proc.pid)

    def exited(self, code: int) -> bool:
        """A watcher that left because its folder is gone is not restarted."""
        problem = folder_problem(self.folder)
        if code == FOLDER_GONE_EXIT and problem:
            log.warning("deploy folder %s %s; serving without it", self.folder, problem)
            self._record_problem(problem)
            return True
        return False

    def first_pass_left(self) -> list[str]:
        """The packages in the folder the watcher has not deployed (or failed, or found not
        whole) yet: what serve waits for before it says it listens, so that the tour's first
        call finds the example container. [] when no watcher runs."""
        if self.folder is None or self.proc is None or self.proc.poll() is not None:
            return []
        try:
            present = sorted(packages_in(self.folder))
        except OSError:
            return []
        db = connect(self.data.db_target)
        try:
            states = {e.get("name"): e.get("state")
                      for e in store.load_entries(db, str(self.folder))}
        finally:
            db.close()
        return [name for name in present if states.get(name) not in LOOKED_AT]

    def _record_problem(self, problem: str) -> None:
        self._record(enabled=False, folder=str(self.folder), problem=f"{self.folder} {problem}")

    def _record(self, **status) -> None:
        db = connect(self.data.db_target)
        try:
            store.save_status(db, **status)
        finally:
            db.close()

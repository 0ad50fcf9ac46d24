"""Writes finished synchronous invocation records in batches, off the request path: one
transaction per batch instead of one per call (with several gunicorn processes, per-call
commits contend for SQLite's write lock and cost more CPU than the call itself). A record
lands a millisecond or so after its answer was sent; a graceful stop flushes what is queued.

One call's record never costs another's: every field is checked before it is bound (see
store.invocations.checked), a batch that still fails is written again record by record, and
a record that fails on its own is stored with only the control plane's own fields and an
error that says so."""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from pathlib import Path

from ..store.db import get_db, transaction
from ..store.engine import transient_errors
from ..store.invocations import bare, record_finished

TRANSIENT = transient_errors()
log = logging.getLogger("dockyard.records")

BATCH = 256
LINGER_S = 0.02


class RecordWriter:
    def __init__(self, db_target: Path):
        self.db_target = db_target
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pid = None
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def put(self, record: dict) -> None:
        if self.pid != os.getpid():
            self._start()
        self.queue.put(record)

    def _start(self) -> None:
        # Started lazily in each process (gunicorn forks after the app is imported).
        with self.lock:
            if self.pid == os.getpid():
                return
            self.pid = os.getpid()
            self.thread = threading.Thread(target=self._run, name="records", daemon=True)
            self.thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            # Linger a moment so a busy process commits many records at once.
            time.sleep(LINGER_S)
            while len(batch) < BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            # The thread's connection, or a new one if it was lost.
            self._write(get_db(self.db_target), batch)

    def _write(self, db, batch: list[dict]) -> None:
        try:
            with transaction(db):
                for record in batch:
                    record_finished(db, record)
            return
        except Exception as exc:  # noqa: BLE001 - never lose the thread, nor the batch
            if len(batch) == 1:
                self._write_alone(db, batch[0], exc)
                return
            log.warning("a batch of %d invocation records failed (%s: %s); storing them one "
                        "by one", len(batch), type(exc).__name__, exc)
        for i, record in enumerate(batch):
            if not self._write_one(db, record):
                # The database itself fails (locked, full, unwritable), not this record: the
                # others would fail the same way, each after the busy timeout.
                rest = batch[i + 1:]
                if rest:
                    log.error("could not store %d more invocation record(s): %s", len(rest),
                              ", ".join(str(r.get("id")) for r in rest[:5]))
                return

    def _write_one(self, db, record: dict) -> bool:
        """Store one record; False if the database failed rather than the record."""
        try:
            with transaction(db):
                record_finished(db, record)
            return True
        except Exception as exc:  # noqa: BLE001 - see _write_alone
            return self._write_alone(db, record, exc)

    def _write_alone(self, db, record: dict, failure: Exception) -> bool:
        """A record that failed on its own: store what the control plane knows of the call
        (its identity, status and times) with an error that says why the rest is missing."""
        if isinstance(failure, TRANSIENT):
            log.error("could not store invocation record %s: %s", record.get("id"), failure)
            return False
        reason = f"{type(failure).__name__}: {failure}"
        try:
            with transaction(db):
                record_finished(db, bare(record, reason))
        except Exception as exc:  # noqa: BLE001 - say what was lost
            log.error("could not store invocation record %s (%s; then %s: %s)",
                      record.get("id"), reason, type(exc).__name__, exc)
            return not isinstance(exc, TRANSIENT)
        log.warning("invocation record %s stored without its report: %s", record.get("id"),
                    reason)
        return True

    def flush(self) -> None:
        batch = []
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if batch:
            self._write(get_db(self.db_target), batch)

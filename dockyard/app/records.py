"""Writes finished synchronous invocation records in batches, off the request path: one
transaction per batch instead of one per call (with several gunicorn processes, per-call
commits contend for SQLite's write lock and cost more CPU than the call itself). A record
lands a millisecond or so after its answer was sent; a graceful stop flushes what is queued."""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from pathlib import Path

from .db import get_db, transaction
from .store.invocations import record_finished

log = logging.getLogger("dockyard.records")

BATCH = 256
LINGER_S = 0.02


class RecordWriter:
    def __init__(self, db_path: Path):
        self.db_path = db_path
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
        db = get_db(self.db_path)
        while True:
            batch = [self.queue.get()]
            # Linger a moment so a busy process commits many records at once.
            time.sleep(LINGER_S)
            while len(batch) < BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self._write(db, batch)

    def _write(self, db, batch: list[dict]) -> None:
        try:
            with transaction(db):
                for record in batch:
                    record_finished(db, record)
        except Exception:  # noqa: BLE001 - never lose the thread; say what was lost
            log.exception("could not store %d invocation record(s): %s", len(batch),
                          ", ".join(r["id"] for r in batch[:5]))

    def flush(self) -> None:
        batch = []
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if batch:
            self._write(get_db(self.db_path), batch)

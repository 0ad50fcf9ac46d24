"""Writes synchronous invocation records in batches, off the request path: one transaction
per batch instead of one per call (with several gunicorn processes, per-call commits contend
for the database's write lock and cost more CPU than the call itself). A call is recorded
`running` once it has run for START_AFTER_S (a moment: any call a person could look at while
it runs is listed), and finished when it ends; a call that ends sooner is written once,
finished (most calls: a warm call is a millisecond). A record lands a few milliseconds after
its answer was sent; a graceful stop flushes what is queued.

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
from ..store.invocations import (bare, forget_started, record_finished,
                                 record_started)

TRANSIENT = transient_errors()
log = logging.getLogger("dockyard.records")

BATCH = 256
LINGER_S = 0.02
# A call's `running` record is written once it has run this long: a call over by then is
# written once, with its finish, never twice (and never finished on its caller's thread).
START_AFTER_S = 0.1


class RecordWriter:
    def __init__(self, db_target: Path):
        self.db_target = db_target
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pid = None
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        # Calls whose `running` record is committed, and those of the batch being written (see
        # finished()); the batch is drained under `drain`, and `written` says when it is done.
        self.written_starts: set[str] = set()
        self.writing: set[str] = set()
        self.drain = threading.Lock()
        self.written = threading.Condition()
        # Starts too young to write yet, by call id (the writer thread's, and flush's).
        self.deferred: dict[str, Started] = {}

    def put(self, record: dict) -> None:
        """A finished call's record."""
        if self.pid != os.getpid():
            self._start()
        self.queue.put(record)

    def finished(self, record: dict) -> None:
        """A finished call's record. A call whose `running` record is written already is
        finished at once, in the caller's thread: whoever got its answer reads it finished.
        Any other goes with the next batch (with its start, if that is still queued)."""
        invocation_id = record.get("id")
        with self.drain:
            # Either its start is still queued or deferred (then the finish goes with it,
            # written once) or the writer has it: then it is written (or being written) and
            # the finish waits for that, so that no reader of the answer sees the call still
            # running.
            if invocation_id not in self.writing and invocation_id not in self.written_starts:
                self.put(record)
                return
        with self.written:
            self.written.wait_for(lambda: invocation_id not in self.writing, timeout=5)
        if invocation_id not in self.written_starts:
            self.put(record)      # its start failed to be written: the batch path says why
            return
        self.written_starts.discard(invocation_id)
        try:
            with transaction(get_db(self.db_target)):
                record_finished(get_db(self.db_target), record)
        except Exception:  # noqa: BLE001 - the batch writer retries it and says why
            self.put(record)

    def started(self, record: dict, owner: str, lease_until: float) -> None:
        """A call handed to a worker: recorded `running` (see store.record_started)."""
        if self.pid != os.getpid():
            self._start()
        self.queue.put(Started(record, owner, lease_until))

    def forget(self, invocation_id: str) -> None:
        """A started call that ran nothing after all: its `running` record goes."""
        self.queue.put(Forget(invocation_id))

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
            wait = None
            if self.deferred:
                oldest = min(op.at for op in self.deferred.values())
                wait = max(0.0, oldest + START_AFTER_S - time.monotonic())
            try:
                ops = [self.queue.get(timeout=wait)]
                # Linger a moment so a busy process commits many records at once.
                time.sleep(LINGER_S)
            except queue.Empty:
                ops = []    # a deferred start is due
            with self.drain:
                while len(ops) < BATCH:
                    try:
                        ops.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                batch = self._due(ops)
                self.writing = {op.record.get("id") for op in batch if op.__class__ is Started}
            if not batch:
                continue
            try:
                # The thread's connection, or a new one if it was lost.
                self._write(get_db(self.db_target), batch)
            finally:
                with self.written:
                    self.writing = set()
                    self.written.notify_all()

    def _due(self, ops: list) -> list:
        """What to write now of `ops` and the deferred starts: a start once its call has run
        START_AFTER_S (a younger one waits, and goes with its finish if that comes first);
        a finish or forget takes its deferred start along (merged by _collapsed)."""
        now = time.monotonic()
        batch = []
        for op in ops:
            if op.__class__ is Started:
                if now - op.at < START_AFTER_S:
                    self.deferred[op.record.get("id")] = op
                    continue
            elif op.__class__ is Forget:
                if self.deferred.pop(op.invocation_id, None) is not None:
                    continue    # never written: nothing to forget
            else:
                self.deferred.pop(op.get("id"), None)
            batch.append(op)
        for call_id, op in list(self.deferred.items()):
            if now - op.at >= START_AFTER_S:
                del self.deferred[call_id]
                batch.append(op)
        return batch

    def _write(self, db, batch: list) -> None:
        starts, forgets, batch = _collapsed(batch)
        try:
            with transaction(db):
                for op in starts:
                    record_started(db, op.record, op.owner, op.lease_until)
                for record in batch:
                    record_finished(db, record)
                for op in forgets:
                    forget_started(db, op.invocation_id)
            self._started(starts)
            return
        except Exception as exc:  # noqa: BLE001 - never lose the thread, nor the batch
            if len(batch) == 1 and not starts and not forgets:
                self._write_alone(db, batch[0], exc)
                return
            log.warning("a batch of %d invocation records failed (%s: %s); storing them one "
                        "by one", len(batch), type(exc).__name__, exc)
        for op in [*starts, *forgets]:
            try:
                with transaction(db):
                    if isinstance(op, Started):
                        record_started(db, op.record, op.owner, op.lease_until)
                        self._started([op])
                    else:
                        forget_started(db, op.invocation_id)
            except Exception as exc:  # noqa: BLE001 - its finish still comes
                log.error("could not record invocation %s as %s: %s",
                          getattr(op, "invocation_id", None) or op.record.get("id"),
                          "started" if isinstance(op, Started) else "not started", exc)
        for i, record in enumerate(batch):
            if not self._write_one(db, record):
                # The database itself fails (locked, full, unwritable), not this record: the
                # others would fail the same way, each after the busy timeout.
                rest = batch[i + 1:]
                if rest:
                    log.error("could not store %d more invocation record(s): %s", len(rest),
                              ", ".join(str(r.get("id")) for r in rest[:5]))
                return

    def _started(self, starts: list) -> None:
        for op in starts:
            self.written_starts.add(op.record.get("id"))
        if len(self.written_starts) > 100_000:     # finishes that never came (a bug): bound
            self.written_starts.clear()

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
        with self.drain:    # the writer thread changes them under it
            batch = list(self.deferred.values())
            self.deferred.clear()
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if batch:
            self._write(get_db(self.db_target), batch)


class Started:
    __slots__ = ("record", "owner", "lease_until", "at")

    def __init__(self, record: dict, owner: str, lease_until: float):
        self.record, self.owner, self.lease_until = record, owner, lease_until
        self.at = time.monotonic()


class Forget:
    __slots__ = ("invocation_id",)

    def __init__(self, invocation_id: str):
        self.invocation_id = invocation_id


def _collapsed(batch: list) -> tuple[list[Started], list[Forget], list[dict]]:
    """The batch's starts, forgets and finishes, each call's ops merged: a call started and
    finished within one batch is written once, finished; one started and forgotten, never."""
    starts: dict[str, Started] = {}
    forgets: list[Forget] = []
    finishes: list[dict] = []
    for op in batch:
        if op.__class__ is Started:
            starts[op.record.get("id")] = op
        elif op.__class__ is Forget:
            if starts.pop(op.invocation_id, None) is None:
                forgets.append(op)
        else:
            starts.pop(op.get("id"), None)
            finishes.append(op)
    return list(starts.values()), forgets, finishes

"""Runs queued (async) invocations. Exactly one dispatcher per data dir is active, holding a
lease; one that takes over requeues what its dead predecessor left running (a call that was
running is retried once, then failed with the reason), so no call stays queued or running."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...common.protocol import Status
from ...errors import DockyardError, NotFound
from ..store.db import get_db
from .execute import execute
from ..store import invocations as store
from ..store import leases
from .cancel import tell_workers
from .worker_client import WorkerConnections

log = logging.getLogger("dockyard.dispatcher")

LEASE_NAME = "dispatcher"
LEASE_TTL_S = 10.0
RUNNING_LEASE_S = 24 * 3600.0   # the dispatcher lease, not this, detects a dead runner
# A queued call no worker can take yet goes back to the queue for RETRY_S, for up to
# UNAVAILABLE_RETRY_S; each try waits at most QUEUE_WAIT_S for a free instance, so that a busy
# container holds no dispatcher thread for long.
UNAVAILABLE_RETRY_S = 120.0
RETRY_S = 1.0
QUEUE_WAIT_S = 1.0
# A call halted (serve stopped at once) that is still under way this much later: its worker is
# told to kill it.
HALT_TELL_AFTER_S = 0.8


class Dispatcher:
    def __init__(self, db_target: Path, worker_token: str, threads: int = 16,
                 poll_s: float = 0.05):
        self.db_target = db_target
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.connections = WorkerConnections(worker_token)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="async")
        self.threads = threads
        self.poll_s = poll_s
        self.busy = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.freed = threading.Event()       # a thread finished its call
        self.thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self.fencing: int | None = None
        self.running: dict[str, dict] = {}   # the calls its threads run, by id

    def _defer(self, db, row: dict, result: dict) -> bool:
        """Nothing ran: put the call back in the queue, to be claimed again in RETRY_S, and
        free this thread for other containers' calls. False once it has been turned away for
        UNAVAILABLE_RETRY_S: it fails then. When stopping, it is only given back."""
        if self.stop_event.is_set():
            store.release(db, row["id"], self.holder)
            return True
        t = time.time()
        since = row.get("unavailable_since") or t
        if t - since > UNAVAILABLE_RETRY_S:
            return False
        log.info("%s: %s; trying again in %gs", row["id"],
                 (result.get("error") or {}).get("message"), RETRY_S)
        store.defer(db, row["id"], self.holder, t + RETRY_S, since)
        return True

    def start(self) -> None:
        self.thread.start()

    def stop_claiming(self) -> None:
        """Claim no more calls (serve is stopping); the calls running go on."""
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def in_flight(self) -> list[dict]:
        """The calls this dispatcher runs now (their records as claimed)."""
        with self.lock:
            return list(self.running.values())

    def halt(self, reason: str) -> int:
        """Stop every call this dispatcher runs, now: each is recorded cancelled with
        `reason` (a worker's answer after that does not change it), and the workers are told
        to kill those still under way HALT_TELL_AFTER_S later (serve's local worker stops its
        own at once). Returns how many."""
        self.stop_claiming()
        db = get_db(self.db_target)
        stopped = []
        for row in self.in_flight():
            try:
                previous = store.stop(db, row["id"], Status.CANCELLED,
                                      {"type": "Cancelled", "message": reason})
            except Exception:  # noqa: BLE001 - the others are still stopped
                log.exception("%s: could not record it cancelled", row["id"])
                continue
            if previous in (Status.QUEUED, Status.RUNNING):
                stopped.append(row["id"])
        if stopped:
            threading.Thread(target=self._tell, args=(stopped,), name="halt",
                             daemon=True).start()
        return len(stopped)

    def _tell(self, ids: list[str]) -> None:
        time.sleep(HALT_TELL_AFTER_S)
        db = get_db(self.db_target)
        for invocation_id in [i for i in ids if i in self.running]:
            try:
                tell_workers(db, self.connections, invocation_id)
            except Exception:  # noqa: BLE001 - best effort: the call is recorded cancelled
                log.exception("%s: could not tell the workers to stop it", invocation_id)

    def stop(self, wait: bool = True) -> None:
        self.stop_claiming()
        self.executor.shutdown(wait=wait)
        self.connections.close()
        try:
            leases.release(get_db(self.db_target), LEASE_NAME, self.holder)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def _loop(self) -> None:
        renew_at = 0.0
        while not self.stop_event.is_set():
            more = False   # every thread was busy or got a call: more may be queued
            self.freed.clear()
            try:
                db = get_db(self.db_target)   # the thread's connection, or a new one if lost
                if time.monotonic() >= renew_at:
                    fencing = leases.acquire(db, LEASE_NAME, self.holder, LEASE_TTL_S)
                    if fencing is not None and fencing != self.fencing:
                        recovered = store.recover(db, self.holder, lease_expired_only=False)
                        log.info("dispatcher active (fencing %d); recovered %d call(s)",
                                 fencing, recovered)
                    self.fencing = fencing
                    wait = LEASE_TTL_S / 3
                    if fencing is None:
                        wait = leases.retry_in(db, LEASE_NAME, wait)
                    renew_at = time.monotonic() + wait
                    if fencing is not None:
                        lost = store.abandoned_web_calls(db, time.time())
                        if lost:
                            log.warning("%d synchronous call(s) left running by a web process "
                                        "that is gone: recorded failed", lost)
                if self.fencing is not None:
                    with self.lock:
                        free = self.threads - self.busy
                    rows = []
                    if free > 0:
                        rows = store.claim_queued(db, self.holder, free, RUNNING_LEASE_S,
                                                  fencing=(LEASE_NAME, self.fencing))
                        for row in rows:
                            with self.lock:
                                self.busy += 1
                                self.running[row["id"]] = row
                            self.executor.submit(self._run, row)
                    more = len(rows) == free
            except leases.LeaseLost as exc:
                log.warning("dispatcher inactive: %s", exc)
                self.fencing, renew_at = None, 0.0
            except Exception:  # noqa: BLE001 - keep dispatching whatever happened
                log.exception("dispatcher loop error")
            if more:
                # A burst (many cron fires at once): claim again as soon as a thread is free
                # rather than after a whole poll interval.
                self.freed.wait(self.poll_s)
            else:
                self.stop_event.wait(self.poll_s)

    def _handed(self, db, row: dict, worker: dict) -> None:
        try:
            store.handed_to(db, row["id"], self.holder, worker["id"])
        except Exception as exc:  # noqa: BLE001 - only `logs ID` while it runs misses it
            log.warning("%s: could not note its worker %s: %s", row["id"], worker["id"], exc)

    def _run(self, row: dict) -> None:
        try:
            db = get_db(self.db_target)
            event = json.loads(row["input"]) if row["input"] else None
            try:
                result = execute(db, self.connections, row["id"], row["container"],
                                 row["version"], row["function"], event, row["trigger"],
                                 queue_wait=QUEUE_WAIT_S,
                                 on_handoff=lambda _, worker: self._handed(db, row, worker))
            except NotFound as exc:
                result = {"status": Status.FAILED, "error": exc.to_dict()}
            except DockyardError as exc:
                # No worker could take it (none connected, or each one turned it away).
                result = {"status": Status.UNAVAILABLE, "error": exc.to_dict()}
            if result.get("status") == Status.UNAVAILABLE and self._defer(db, row, result):
                return
            if result.get("status") in (Status.UNAVAILABLE, Status.NOT_RUNNING):
                result["status"] = Status.FAILED
            output = json.dumps(result.get("result")) if result["status"] == Status.SUCCEEDED else None
            store.finish(db, row["id"], self.holder, dict(result, output=output))
        except Exception:  # noqa: BLE001 - the lease recovery retries it
            log.exception("%s: async call failed in the dispatcher", row["id"])
        finally:
            with self.lock:
                self.busy -= 1
                self.running.pop(row["id"], None)
            self.freed.set()

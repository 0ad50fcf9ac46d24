"""The scheduler: fires cron jobs. It runs as its own process under `dockyard serve`
(`python -m dockyard.app.jobs.scheduler --data DIR`). Exactly one scheduler per data dir is
active: it holds the `scheduler` lease, and each of its transactions commits only while it
still holds the lease with its fencing number. A fire is a run row unique on (job, scheduled
time), written in the same transaction that queues the call, so a scheduled time fires at
most once; the dispatcher then runs the call as it runs any queued (async) call."""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

from ...common import jobs as job_rules
from ...common import schedule as schedules
from ...common.durations import parse_duration
from . import retention
from ..artifacts import ArtifactStore
from ..invoke.cancel import tell_workers
from ..datadir import DataDir
from ..store.db import get_db, migrate
from ..store import invocations, job_runs, jobs, leases
from ..invoke.worker_client import WorkerConnections

log = logging.getLogger("dockyard.scheduler")

LEASE_NAME = "scheduler"
LEASE_TTL_S = 10.0
MAX_SLEEP_S = 0.2          # also how soon a new or changed job is seen
MANIFEST_CHECK_S = 1.0


class Scheduler:
    def __init__(self, db_target: Path, worker_token: str | None, clock=time.time,
                 retention_settings: retention.Retention | None = None,
                 artifacts: ArtifactStore | None = None):
        self.db_target = db_target
        # Without settings (a scheduler made by hand): job history retention only.
        self.retention = retention_settings or retention.Retention(None, None)
        self.artifacts = artifacts
        self.pruner: threading.Thread | None = None
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.connections = WorkerConnections(worker_token or "")
        self.clock = clock
        self.fencing: int | None = None
        self.renew_at = 0.0
        self.next_manifest_check = 0.0
        self.next_prune = 0.0
        self.containers_seen: tuple | None = None
        self.schedules: dict[tuple[str, str], schedules.Schedule] = {}
        self.stop_event = threading.Event()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        db = get_db(self.db_target)
        while not self.stop_event.is_set():
            try:
                wait = self.step(db)
            except Exception:  # noqa: BLE001 - keep scheduling whatever happened
                log.exception("scheduler loop error")
                wait = 1.0
            self.stop_event.wait(wait)
        if self.pruner is not None:
            self.pruner.join(timeout=10)   # a pass is short batches; one cut off is rolled back
        self.connections.close()
        if self.fencing is not None:
            leases.release(db, LEASE_NAME, self.holder)
        log.info("scheduler stopped")
        return 0

    def step(self, db) -> float:
        """One pass; returns how long to sleep before the next."""
        if time.monotonic() >= self.renew_at:
            self._renew(db)
        if self.fencing is None:
            return max(0.005, self.renew_at - time.monotonic())
        t = self.clock()
        if time.monotonic() >= self.next_prune:
            self._start_pruning(t)
        if time.monotonic() >= self.next_manifest_check:
            self._sync_manifest_jobs(db)
        if not job_runs.work_waiting(db, t):
            return self._sleep_s(db)
        cancels: list[str] = []
        try:
            with leases.holding(db, LEASE_NAME, self.holder, self.fencing) as conn:
                lateness = self._fire_due(db, conn, t, cancels)
                self._fire_retries(conn, t)
                self._follow_runs(conn, t, cancels)
                if lateness:
                    job_runs.observe_lateness(conn, lateness)
        except leases.LeaseLost as exc:
            log.warning("scheduler stands down: %s", exc)
            self.fencing = None
            self.renew_at = 0.0
            return LEASE_TTL_S / 3
        for invocation_id in cancels:
            tell_workers(db, self.connections, invocation_id)
        return self._sleep_s(db)

    def _start_pruning(self, t: float) -> None:
        """Retention, in a thread of its own (with its own connection) so that fires are
        never late behind it; one pass at a time."""
        self.next_prune = time.monotonic() + self.retention.every_s
        if self.pruner is not None and self.pruner.is_alive():
            return
        self.pruner = threading.Thread(target=self._prune, args=(t,), name="retention",
                                       daemon=True)
        self.pruner.start()

    def _prune(self, t: float) -> None:
        try:
            retention.run(get_db(self.db_target), self.artifacts, self.retention, t)
        except Exception:  # noqa: BLE001 - tried again next time
            log.exception("retention pass failed")

    def _sleep_s(self, db) -> float:
        wake = jobs.earliest_wake(db)
        if wake is None:
            return MAX_SLEEP_S
        return min(MAX_SLEEP_S, max(0.005, wake - self.clock()))

    def _renew(self, db) -> None:
        fencing = leases.acquire(db, LEASE_NAME, self.holder, LEASE_TTL_S)
        if fencing is not None and fencing != self.fencing:
            log.info("scheduler active (fencing %d)", fencing)
            self.next_manifest_check = 0.0
        self.fencing = fencing
        wait = LEASE_TTL_S / 3
        if fencing is None:
            wait = leases.retry_in(db, LEASE_NAME, wait)
        self.renew_at = time.monotonic() + wait

    def _sync_manifest_jobs(self, db) -> None:
        self.next_manifest_check = time.monotonic() + MANIFEST_CHECK_S
        seen = jobs.containers_signature(db)
        if seen == self.containers_seen:
            return
        added, changed, removed = jobs.sync_manifest_jobs(db)
        self.containers_seen = seen
        if added or changed or removed:
            log.info("manifest jobs: %d added, %d changed, %d removed", added, changed, removed)

    def _schedule(self, job: dict) -> schedules.Schedule:
        key = (job["schedule"], job["timezone"])
        schedule = self.schedules.get(key)
        if schedule is None:
            schedule = self.schedules[key] = schedules.parse(*key)
        return schedule

    # -- fires ----------------------------------------------------------------------------

    def _fire_due(self, db, conn, t: float, cancels: list[str]) -> list[float]:
        lateness = []
        for job in jobs.due(db, t):
            try:
                schedule = self._schedule(job)
            except schedules.ScheduleError as exc:
                log.error("job %s: its schedule cannot be used (%s); disabling it",
                          job["name"], exc)
                jobs.set_next_fire(conn, job["id"], None, disable=True)
                continue
            plan = schedules.due(schedule, job["next_fire_at"], t, job["anchor"],
                                 job["starting_deadline_s"])
            self._record_missed(conn, job, plan, t)
            if plan.fire is not None and self._fire(conn, job, plan.fire, t, cancels):
                lateness.append(max(0.0, t - plan.fire))
            jobs.set_next_fire(conn, job["id"], plan.next_fire_at,
                               disable=schedule.kind == "at")
        return lateness

    def _record_missed(self, conn, job: dict, plan: schedules.Due, t: float) -> None:
        missed = 0
        for i, scheduled in enumerate(plan.missed):
            newest = i == len(plan.missed) - 1 and plan.fire is None
            if newest:
                reason = (f"past its starting deadline: the scheduler reached it "
                          f"{t - scheduled:.0f}s late (starting_deadline_s = "
                          f"{job['starting_deadline_s']:g})")
            else:
                reason = ("the scheduler was not running (or was late) at this time; after a "
                          "gap only the latest fire runs")
            count = 1
            if i == 0 and plan.missed_before:
                count += plan.missed_before
                reason += (f"; {plan.missed_before} earlier fire(s) since "
                           f"{schedules.iso(job['next_fire_at'], job['timezone'])} were missed "
                           "too")
            if job_runs.insert(conn, job["id"], "cron", scheduled, 1, "missed", self.fencing,
                               reason=reason, fired_at=t, count=count):
                missed += count
        if missed:
            jobs.count(conn, job["id"], missed=missed)
            log.info("job %s: %d fire(s) missed", job["name"], missed)

    def _fire(self, conn, job: dict, scheduled: float, t: float, cancels: list[str]) -> bool:
        under_way = job_runs.active(conn, job["id"])
        when = schedules.iso(scheduled, job["timezone"])
        if under_way and job["concurrency"] == "forbid":
            run = under_way[0]
            what = run["invocation_id"] or "a retry"
            reason = (f"the previous run ({what}) was still "
                      f"{run['call_status'] or run['status']} (concurrency = forbid)")
            if job_runs.insert(conn, job["id"], "cron", scheduled, 1, "skipped", self.fencing,
                               reason=reason, fired_at=t):
                jobs.count(conn, job["id"], skipped=1)
                log.info("job %s: fire at %s skipped: %s", job["name"], when, reason)
            return False
        invocation_id = invocations.new_id()
        if not job_runs.insert(conn, job["id"], "cron", scheduled, 1, "queued", self.fencing,
                               invocation_id, fired_at=t):
            return False  # this time fired already
        if job["concurrency"] == "replace":
            for run in under_way:
                self._stop_run(conn, run, "cancelled", f"replaced by the fire at {when}", t,
                               cancels)
        job_runs.queue_call(conn, job, invocation_id, "cron")
        jobs.count(conn, job["id"], fires=1)
        jobs.mark(conn, job["id"], last_fire_at=t)
        log.debug("%s job %s: fired for %s (%.3fs late)", invocation_id, job["name"], when,
                  t - scheduled)
        return True

    def _stop_run(self, conn, run: dict, status: str, reason: str, t: float,
                  cancels: list[str]) -> None:
        if run["invocation_id"]:
            error = {"type": "Timeout" if status == "timed_out" else "Cancelled",
                     "message": reason}
            before = invocations.stop_in_transaction(conn, run["invocation_id"], status, error)
            if before == "running":
                cancels.append(run["invocation_id"])
        job_runs.update(conn, run["id"], status=status, reason=reason, finished_at=t)
        log.info("%s: run stopped (%s): %s", run["invocation_id"] or f"run {run['id']}",
                 status, reason)

    def _fire_retries(self, conn, t: float) -> None:
        for run in job_runs.due_retries(conn, t):
            invocation_id = invocations.new_id()
            if job_runs.update(conn, run["id"], only_if=("waiting",), status="queued",
                               invocation_id=invocation_id, fired_at=t):
                job_runs.queue_call(conn, run, invocation_id, run["trigger"])
                log.info("%s job %s: attempt %d", invocation_id, run["name"], run["attempt"])

    # -- following runs -------------------------------------------------------------------

    def _follow_runs(self, conn, t: float, cancels: list[str]) -> None:
        """Bring runs up to date with their calls: running, then finished (with the outcome
        counted, and a retry scheduled after a failure while attempts are left); a run past
        its job's own timeout is stopped."""
        for run in job_runs.pending(conn):
            call = run["call_status"]
            if call is None:
                job_runs.update(conn, run["id"], status="failed", finished_at=t,
                                reason="its invocation record is gone")
                self._failed(conn, run, t)
            elif call == "running":
                if run["status"] == "queued":
                    job_runs.update(conn, run["id"], status="running",
                                    started_at=run["started_at"])
                limit = run["timeout_s"]
                if limit and run["started_at"] and t - run["started_at"] > limit:
                    self._stop_run(conn, run, "timed_out", f"the job's timeout_s of {limit:g}s "
                                   "ran out; the call was stopped", t, cancels)
                    self._failed(conn, run, t)
            elif call != "queued":
                job_runs.update(conn, run["id"], status=call,
                                finished_at=run["finished_at"] or t,
                                duration_ms=run["duration_ms"],
                                reason=job_runs.error_text(run["error"]))
                if call == "succeeded":
                    jobs.mark(conn, run["job_id"], last_success_at=run["finished_at"] or t)
                elif call in job_runs.FAILURES:
                    self._failed(conn, run, t)

    def _failed(self, conn, run: dict, t: float) -> None:
        jobs.count(conn, run["job_id"], failures=1)
        if run["attempt"] > run["retries"]:
            return
        delay = job_rules.backoff_s(run["retry_backoff_s"], run["attempt"], random.random())
        attempt = run["attempt"] + 1
        job_runs.insert(conn, run["job_id"], run["trigger"], run["scheduled_at"], attempt,
                        "waiting", self.fencing, retry_at=t + delay, fired_at=None,
                        reason=f"attempt {attempt} of {run['retries'] + 1}, after "
                               f"{delay:.1f}s")
        log.info("job %s: attempt %d failed; attempt %d in %.1fs", run["name"],
                 run["attempt"], attempt, delay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dockyard.app.jobs.scheduler",
                                     description="Fire the cron jobs of a dockyard data dir.")
    parser.add_argument("--data", help="data dir (default: DOCKYARD_HOME or ./.dockyard)")
    parser.add_argument("--keep-invocations", default="7d",
                        help="remove invocation records older than this (90s, 10m, 2h, 7d; "
                             "0 or off: keep them all)")
    parser.add_argument("--keep-versions", default="10",
                        help="keep this many newest versions of each container (0 or off: "
                             "keep them all)")
    parser.add_argument("--prune-every", default="60s",
                        help="how often retention runs (90s, 10m, …)")
    parser.add_argument("--forget-workers-after", default="10m",
                        help="forget workers stopped or lost for this long (0 or off: keep "
                             "them)")
    args = parser.parse_args(argv)
    from .. import LOG_FORMAT
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    data = DataDir.at(args.data)
    data.ensure()
    migrate(data.db_target)
    settings = retention.Retention(retention.setting(args.keep_invocations, parse_duration),
                                   retention.setting(args.keep_versions, int),
                                   parse_duration(args.prune_every),
                                   retention.setting(args.forget_workers_after, parse_duration))
    scheduler = Scheduler(data.db_target, data.read_token("worker"),
                          retention_settings=settings,
                          artifacts=ArtifactStore.of(data))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Only sets the event: the loop notices it within one sleep.
        signal.signal(signum, lambda *_: scheduler.stop_event.set())
    return scheduler.run()


if __name__ == "__main__":
    raise SystemExit(main())

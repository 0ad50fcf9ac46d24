"""A job's runs: one row per fire and attempt (unique on job, trigger, scheduled time and
attempt, written in the same transaction that queues the call), the runs a fire was skipped
or missed for, the status of each run as its invocation goes, and history retention."""

from __future__ import annotations

import json
import math

from .engine import Database

from .db import now, transaction
from . import invocations
from ...common.protocol import FAILED_STATUSES, RECORD_STATUSES
from ...errors import BadRequest

ACTIVE = ("waiting", "queued", "running")    # waiting: a retry not yet due
# Every status a run can hold (the list's filter accepts exactly these): its call's, or why
# no call was made for a fire.
STATUSES = ("waiting", *RECORD_STATUSES, "skipped", "missed")
FAILURES = FAILED_STATUSES
KEEP_SUCCESSES = 3
# Fire lateness histogram buckets (seconds); the last is +Inf.
LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)


def insert(conn, job_id: str, trigger: str, scheduled_at: float, attempt: int, status: str,
           fencing: int | None, invocation_id: str | None = None, reason: str | None = None,
           fired_at: float | None = None, retry_at: float | None = None, count: int = 1
           ) -> bool:
    """Write a run; False when that (job, trigger, scheduled time, attempt) exists already,
    which is what makes a scheduled time fire at most once."""
    cursor = conn.execute(
        "INSERT INTO job_runs (job_id, trigger, scheduled_at, attempt, status, "
        "reason, invocation_id, fired_at, retry_at, count, fencing) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [job_id, trigger, scheduled_at, attempt, status, reason, invocation_id, fired_at,
         retry_at, count, fencing])
    return cursor.rowcount == 1


def queue_call(conn, job: dict, invocation_id: str, trigger: str) -> None:
    conn.execute(
        "INSERT INTO invocations (id, container, version, function, trigger, status, attempt, "
        "input, created_at) VALUES (?, ?, NULL, ?, ?, 'queued', 0, ?, ?)",
        [invocation_id, job["container"], job["function"], trigger, job["payload"], now()])


def active(conn, job_id: str) -> list[dict]:
    """The job's runs still under way: a retry waiting for its time, or a call queued or
    running (as its invocation says, which is ahead of the run's own status)."""
    rows = conn.execute(
        "SELECT r.id, r.status, r.invocation_id, i.status FROM job_runs r "
        "LEFT JOIN invocations i ON i.id = r.invocation_id "
        "WHERE r.job_id = ? AND r.status IN ('waiting', 'queued', 'running')", [job_id]
    ).fetchall()
    return [{"id": r[0], "status": r[1], "invocation_id": r[2], "call_status": r[3]}
            for r in rows if r[1] == "waiting" or r[3] in ("queued", "running")]


def update(conn, run_id: int, only_if: tuple[str, ...] = ACTIVE, **values) -> bool:
    sets = ", ".join(f"{key} = ?" for key in values)
    marks = ", ".join("?" * len(only_if))
    cursor = conn.execute(f"UPDATE job_runs SET {sets} WHERE id = ? AND status IN ({marks})",
                          [*values.values(), run_id, *only_if])
    return cursor.rowcount == 1


def pending(conn) -> list[dict]:
    """Runs with a call queued or running, with their call's state and their job's retry and
    timeout settings."""
    cursor = conn.execute(
        "SELECT r.id, r.job_id, r.trigger, r.scheduled_at, r.attempt, r.status, "
        "r.invocation_id, i.status AS call_status, i.started_at, i.finished_at, "
        "i.duration_ms, i.error, j.name, j.retries, j.retry_backoff_s, j.timeout_s "
        "FROM job_runs r JOIN jobs j ON j.id = r.job_id "
        "LEFT JOIN invocations i ON i.id = r.invocation_id "
        "WHERE r.status IN ('queued', 'running')")
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def work_waiting(db: Database, t: float) -> bool:
    """Whether the scheduler has anything to do now (read without taking the write lock):
    a job or a retry due, or a run whose call is under way."""
    return bool(db.execute(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE enabled = 1 AND next_fire_at <= ?) "
        "OR EXISTS (SELECT 1 FROM job_runs WHERE status IN ('queued', 'running') "
        "OR (status = 'waiting' AND retry_at <= ?))", [t, t]).fetchone()[0])


def due_retries(conn, t: float) -> list[dict]:
    cursor = conn.execute(
        "SELECT r.id, r.job_id, r.trigger, r.scheduled_at, r.attempt, j.name, j.container, "
        "j.function, j.payload FROM job_runs r JOIN jobs j ON j.id = r.job_id "
        "WHERE r.status = 'waiting' AND r.retry_at <= ?", [t])
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def observe_lateness(conn, samples: list[float]) -> None:
    """Add fire lateness samples (seconds) to the histogram (per bucket, not cumulative)."""
    buckets: dict[float, list[float]] = {}
    for late in samples:
        le = next(b for b in LATENESS_BUCKETS if late <= b)
        buckets.setdefault(le, []).append(late)
    for le, values in buckets.items():
        stored = -1.0 if math.isinf(le) else le
        conn.execute("INSERT INTO job_lateness (le, count, total_s) VALUES (?, ?, ?) "
                     "ON CONFLICT (le) DO UPDATE SET count = job_lateness.count + excluded.count, "
                     "total_s = job_lateness.total_s + excluded.total_s", [stored, len(values), sum(values)])


def lateness_histogram(db: Database) -> tuple[list[tuple[float, int]], float]:
    """([(upper bound, cumulative count)] for every bucket, sum of seconds)."""
    stored = {le: (count, total) for le, count, total in db.execute(
        "SELECT le, count, total_s FROM job_lateness").fetchall()}
    buckets, cumulative = [], 0
    for le in LATENESS_BUCKETS:
        cumulative += stored.get(-1.0 if math.isinf(le) else le, (0, 0.0))[0]
        buckets.append((le, cumulative))
    return buckets, sum(total for _, total in stored.values())


def manual(db: Database, job: dict) -> dict:
    """A run by hand: queued at once, whatever the policy (it still counts as a run under way
    for the policy of later fires)."""
    with transaction(db) as conn:
        t = round(now(), 3)
        invocation_id = invocations.new_id()
        while not insert(conn, job["id"], "manual", t, 1, "queued", None, invocation_id,
                         fired_at=t):
            t = round(t + 0.001, 3)  # two runs by hand in one millisecond
        queue_call(conn, job, invocation_id, "manual")
        conn.execute("UPDATE jobs SET fires = fires + 1, last_fire_at = ? WHERE id = ?",
                     [t, job["id"]])
    return get(db, job["id"], "manual", t, 1)


def get(db: Database, job_id: str, trigger: str, scheduled_at: float,
        attempt: int) -> dict:
    rows = list(db.query(_RUNS_SQL + " WHERE r.job_id = ? AND r.trigger = ? AND "
                         "r.scheduled_at = ? AND r.attempt = ?",
                         [job_id, trigger, scheduled_at, attempt]))
    return public(rows[0])


_RUNS_SQL = (
    "SELECT r.*, i.status AS call_status, i.started_at AS call_started_at, "
    "i.finished_at AS call_finished_at, i.duration_ms AS call_duration_ms, "
    "i.error AS call_error "
    "FROM job_runs r LEFT JOIN invocations i ON i.id = r.invocation_id")


def public(row: dict) -> dict:
    status, reason = row["status"], row["reason"]
    if status in ("queued", "running") and row.get("call_status"):
        # The call is ahead of the scheduler's bookkeeping (by less than a second).
        status = row["call_status"]
        reason = error_text(row.get("call_error")) or reason
    fired = row["fired_at"]
    late = None
    if fired is not None and row["trigger"] == "cron" and row["attempt"] == 1:
        late = round(max(0.0, fired - row["scheduled_at"]), 3)
    return {
        "id": row["id"], "trigger": row["trigger"], "scheduled_at": row["scheduled_at"],
        "fired_at": fired, "lateness_s": late, "status": status, "attempt": row["attempt"],
        "invocation_id": row["invocation_id"], "reason": reason,
        "started_at": row.get("call_started_at") or row["started_at"],
        "finished_at": row["finished_at"] or row.get("call_finished_at"),
        "duration_ms": row["duration_ms"] if row["duration_ms"] is not None
        else row.get("call_duration_ms"),
        "retry_at": row["retry_at"], "count": row["count"],
    }


def list_for(db: Database, job_id: str, limit: int = 50,
             status: str | None = None) -> list[dict]:
    sql, args = _RUNS_SQL + " WHERE r.job_id = ?", [job_id]
    if status:
        if status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        sql += " AND r.status = ?"
        args.append(status)
    sql += " ORDER BY r.scheduled_at DESC, r.attempt DESC LIMIT ?"
    args.append(max(1, min(limit, 1000)))
    return [public(r) for r in db.query(sql, args)]


def _quoted(statuses: tuple[str, ...]) -> str:
    """Constant statuses as an SQL list: 'a', 'b'."""
    return ", ".join(f"'{status}'" for status in statuses)


def prune(db: Database, t: float, batch: int = 5000) -> int:
    """History retention: drop finished runs scheduled longer than their job's history_days
    ago, always keeping the last 3 successes and the last failure of each job. One job at a
    time, in batches, so the write lock is never held long."""
    deleted = 0
    old_jobs = db.execute(
        "SELECT j.id, ? - j.history_days * 86400 FROM jobs j WHERE EXISTS (SELECT 1 FROM "
        "job_runs r WHERE r.job_id = j.id AND r.scheduled_at < ? - j.history_days * 86400)",
        [t, t]).fetchall()
    for job_id, cutoff in old_jobs:
        while True:
            with transaction(db) as conn:
                keep = [row[0] for row in conn.execute(
                    "SELECT id FROM (SELECT id FROM job_runs WHERE job_id = ? AND status = "
                    "'succeeded' ORDER BY id DESC LIMIT ?) AS successes UNION ALL SELECT id FROM (SELECT id "
                    f"FROM job_runs WHERE job_id = ? AND status IN ({_quoted(FAILURES)}) "
                    "ORDER BY id DESC LIMIT 1) AS failures",
                    [job_id, KEEP_SUCCESSES, job_id]).fetchall()]
                marks = ", ".join("?" * len(keep)) or "NULL"
                cursor = conn.execute(
                    "DELETE FROM job_runs WHERE id IN (SELECT id FROM job_runs WHERE job_id = ? "
                    f"AND scheduled_at < ? AND status NOT IN ({_quoted(ACTIVE)}) "
                    f"AND id NOT IN ({marks}) LIMIT ?)", [job_id, cutoff, *keep, batch])
                deleted += cursor.rowcount
            if cursor.rowcount < batch:
                break
    return deleted


def error_text(error_json: str | None) -> str | None:
    if not error_json:
        return None
    try:
        error = json.loads(error_json)
    except ValueError:
        return error_json[:500]
    return f"{error.get('type')}: {error.get('message')}"[:500]



def job_of_invocation(db: Database, invocation_id: str) -> str | None:
    """The name of the job whose run made this call (None: no job's)."""
    row = db.execute("SELECT j.name FROM job_runs r JOIN jobs j ON j.id = r.job_id "
                     "WHERE r.invocation_id = ? LIMIT 1", [invocation_id]).fetchone()
    return row[0] if row else None

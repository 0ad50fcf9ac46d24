"""Unit tests of schedules (a fixed "now", no waiting) and of the scheduler's decisions on a
real database with a clock the test moves: policies, catch-up after a gap, retries, a job's
own timeout, the fencing of a scheduler that lost its lease."""

from __future__ import annotations

import json
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from dockyard.app.store.db import connect, migrate
from dockyard.app.jobs.scheduler import LEASE_NAME, Scheduler
from dockyard.app.store import job_runs, jobs, leases
from dockyard.common import jobs as job_rules
from dockyard.common import schedule as schedules

BERLIN = ZoneInfo("Europe/Berlin")


def at(*args, tz=BERLIN) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def local(epoch: float, tz=BERLIN) -> datetime:
    return datetime.fromtimestamp(epoch, tz)


# -- fire times ---------------------------------------------------------------------------

def test_five_and_six_fields_and_macros():
    now = at(2026, 1, 5, 10, 0, 30, tz=ZoneInfo("UTC"))
    five = schedules.parse("*/15 * * * *").next_times(now, 3)
    assert [local(t, ZoneInfo("UTC")).strftime("%H:%M:%S") for t in five] == [
        "10:15:00", "10:30:00", "10:45:00"]
    six = schedules.parse("*/20 * * * * *").next_times(now, 3)
    assert [local(t, ZoneInfo("UTC")).strftime("%H:%M:%S") for t in six] == [
        "10:00:40", "10:01:00", "10:01:20"]
    daily = schedules.parse("@daily", "Europe/Berlin").next_times(now, 2)
    assert [local(t).strftime("%m-%d %H:%M %Z") for t in daily] == [
        "01-06 00:00 CET", "01-07 00:00 CET"]
    assert schedules.parse("@hourly").next_after(now) == now - 30 + 3600


def test_every_is_a_fixed_rate_from_its_anchor():
    every = schedules.parse("@every 1h30m")
    anchor = 1_000_000.0
    assert every.every_s == 5400
    assert every.next_after(anchor, anchor) == anchor + 5400
    assert every.next_after(anchor + 5400, anchor) == anchor + 10800   # strictly after
    assert every.next_after(anchor + 6000, anchor) == anchor + 10800
    assert every.next_times(anchor + 1, 3, anchor) == [anchor + 5400, anchor + 10800,
                                                       anchor + 16200]
    assert schedules.parse("@every 30s").explain() == (
        "Every 30 seconds, counted from the job's creation")


def test_at_is_in_the_jobs_timezone_and_fires_once():
    once = schedules.parse("@at 2026-12-01T09:00", "Europe/Berlin")
    assert once.at == at(2026, 12, 1, 9, 0)
    assert once.next_after(at(2026, 11, 30, 0, 0)) == once.at
    assert once.next_after(once.at) is None
    assert once.explain() == "Once, at 2026-12-01 09:00:00 (Europe/Berlin time)"
    # A wall time that spring-forward skips fires at the next valid minute, as cron's do.
    gap = schedules.parse("@at 2026-03-29T02:30", "Europe/Berlin")
    assert local(gap.at).strftime("%H:%M %Z") == "03:00 CEST"


def test_dst_spring_forward_berlin_fires_once_at_three():
    daily = schedules.parse("30 2 * * *", "Europe/Berlin")
    fires = daily.next_times(at(2026, 3, 27, 12, 0), 4)
    assert [local(t).strftime("%m-%d %H:%M %Z") for t in fires] == [
        "03-28 02:30 CET", "03-29 03:00 CEST", "03-30 02:30 CEST", "03-31 02:30 CEST"]
    on_the_day = [t for t in fires if local(t).date().isoformat() == "2026-03-29"]
    assert len(on_the_day) == 1


def test_dst_fall_back_berlin_fires_once_for_the_repeated_hour():
    daily = schedules.parse("30 2 * * *", "Europe/Berlin")
    fires = daily.next_times(at(2026, 10, 23, 12, 0), 4)
    assert [local(t).strftime("%m-%d %H:%M %Z") for t in fires] == [
        "10-24 02:30 CEST", "10-25 02:30 CEST", "10-26 02:30 CET", "10-27 02:30 CET"]
    # Starting from inside the repeated hour, after the first 02:30 passed: the second 02:30
    # (wall-clock the same) does not fire again.
    second_pass = at(2026, 10, 25, 2, 10) + 3600  # 02:10 CEST + 1 h = 02:10 CET
    assert local(second_pass).strftime("%H:%M %Z") == "02:10 CET"
    assert local(daily.next_after(second_pass)).strftime("%m-%d %H:%M %Z") == "10-26 02:30 CET"


def test_explain_and_timezone_in_words():
    assert schedules.parse("0 3 * * 1-5", "Europe/Berlin").explain() == (
        "At 03:00 on Monday through Friday (Europe/Berlin time)")
    assert schedules.parse("*/5 * * * *").explain().endswith("(UTC)")


@pytest.mark.parametrize("text, tz, message", [
    ("61 * * * *", "UTC", "not a cron expression (Bad minute)"),
    ("0 0 31 2 *", "UTC", "never fires: no month it names has day 31"),
    ("0 0 31 2,4 *", "UTC", "never fires: no month it names has day 31"),
    ("0 0 32 1 *", "UTC", "not a cron expression (Bad day-of-month)"),
    ("1 2 3", "UTC", "it has 3 fields"),
    ("@fortnightly", "UTC", "unknown macro"),
    ("@every 5x", "UTC", "use @every N followed by s, m or h"),
    ("@every 0s", "UTC", "at least 1s"),
    ("@at 2026-02-31T09:00", "UTC", "@at wants a date and time"),
    ("@at 2020-01-01T00:00", "UTC", "is in the past"),
    ("", "UTC", "empty"),
    ("@daily", "Mars/Olympus", "unknown timezone 'Mars/Olympus'"),
])
def test_bad_schedules_say_what_is_wrong(text, tz, message):
    with pytest.raises(schedules.ScheduleError) as info:
        schedules.parse(text, tz, now=at(2026, 1, 1, 0, 0))
    assert message in str(info.value)


# -- what is due after a gap ----------------------------------------------------------------

def test_on_time_one_fire():
    every = schedules.parse("@every 2s")
    due = schedules.due(every, 102.0, 102.05, 100.0, 300)
    assert due == schedules.Due(102.0, (), 0, 104.0)
    assert schedules.due(every, 102.0, 101.9, 100.0, 300).fire is None


def test_after_a_gap_only_the_latest_fires_and_the_rest_is_missed():
    every = schedules.parse("@every 2s")
    due = schedules.due(every, 102.0, 109.5, 100.0, 300)
    assert due.fire == 108.0 and due.missed == (102.0, 104.0, 106.0)
    assert due.next_fire_at == 110.0
    cron = schedules.parse("0 * * * *")
    due = schedules.due(cron, 3600.0, 5 * 3600 + 10, None, 60)
    assert due.fire == 5 * 3600 and due.missed == (3600.0, 7200.0, 10800.0, 14400.0)


def test_past_the_starting_deadline_everything_is_missed():
    cron = schedules.parse("0 * * * *")
    due = schedules.due(cron, 3600.0, 3 * 3600 + 400, None, 300)
    assert due.fire is None and due.missed == (3600.0, 7200.0, 10800.0)
    assert due.next_fire_at == 4 * 3600


def test_a_long_gap_is_counted_not_listed():
    every = schedules.parse("@every 1s")
    due = schedules.due(every, 1.0, 86_400.5, 0.0, 300)
    assert due.fire == 86_400.0
    assert len(due.missed) == schedules.MAX_MISSED_LISTED
    assert due.missed_before + len(due.missed) + 1 == 86_400
    seconds = schedules.parse("* * * * * *")
    due = schedules.due(seconds, 1000.0, 1000 + 86_400.5, None, 300)
    assert due.fire == 1000 + 86_400 and due.next_fire_at == 1000 + 86_401
    assert due.missed_before > schedules.MAX_SCAN - 200


# -- settings -------------------------------------------------------------------------------

def test_backoff_doubles_with_jitter_up_to_ten_minutes():
    assert job_rules.backoff_s(10, 1, 1.0) == 10
    assert job_rules.backoff_s(10, 1, 0.0) == 5
    assert job_rules.backoff_s(10, 3, 1.0) == 40
    assert job_rules.backoff_s(10, 20, 1.0) == 600
    assert job_rules.backoff_s(1200, 2, 1.0) == 1200


@pytest.mark.parametrize("raw, message", [
    ({"concurrency": "sometimes"}, "concurrency must be one of allow, forbid, replace"),
    ({"retries": -1}, "retries must be between 0 and 100"),
    ({"retries": 1.5}, "retries must be an integer"),
    ({"timeout_s": True}, "timeout_s must be a number"),
    ({"enabled": "yes"}, "enabled must be true or false"),
    ({"timezone": "Nowhere/Else"}, "unknown timezone"),
    ({"payload": {"x": "y" * 300_000}}, "at most 262144"),
])
def test_bad_settings_say_what_is_wrong(raw, message):
    with pytest.raises(job_rules.JobError) as info:
        job_rules.check_settings(raw)
    assert message in str(info.value)


# -- the scheduler's decisions, on a real database, with a clock the test moves ----------

class Clock:
    def __init__(self):
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sched(store_target, monkeypatch):
    path = store_target
    migrate(path)
    db = connect(path)
    clock = Clock()
    # Jobs are anchored on the same clock the scheduler reads: on a busy machine, creating
    # them may take longer than the fraction of a second a test moves the clock past a fire.
    monkeypatch.setattr(jobs, "now", clock)
    scheduler = Scheduler(path, None, clock=clock)
    yield db, scheduler, clock
    db.close()


def make_job(db, name: str, schedule: str, **settings) -> dict:
    definition = job_rules.check_settings(settings)
    definition.update(container="c", function="f", schedule=schedule)
    return jobs.create(db, name, definition)


def runs(db, job: dict) -> list[dict]:
    return sorted(job_runs.list_for(db, job["id"], 1000),
                  key=lambda r: (r["scheduled_at"], r["attempt"]))


def set_call(db, invocation_id: str, status: str) -> None:
    t = time.time()
    db.execute("UPDATE invocations SET status = ?, started_at = coalesce(started_at, ?), "
                    "finished_at = CASE WHEN ? IN ('queued', 'running') THEN NULL ELSE ? END, "
                    "error = ? WHERE id = ?",
                    [status, t, status, t, json.dumps({"type": "E", "message": "no"})
                     if status == "failed" else None, invocation_id])


def tick(db, scheduler, clock, seconds: float) -> None:
    clock.t += seconds
    scheduler.step(db)


def test_policies(sched):
    db, scheduler, clock = sched
    forbid = make_job(db, "forbid", "@every 1s")
    replace = make_job(db, "replace", "@every 1s", concurrency="replace")
    allow = make_job(db, "allow", "@every 1s", concurrency="allow")
    tick(db, scheduler, clock, 1.05)
    first = {job["name"]: runs(db, job)[0] for job in (forbid, replace, allow)}
    for run in first.values():
        assert run["status"] == "queued" and run["trigger"] == "cron"
        set_call(db, run["invocation_id"], "running")
    tick(db, scheduler, clock, 1.0)
    f1, f2 = runs(db, forbid)
    assert f2["status"] == "skipped" and "concurrency = forbid" in f2["reason"]
    r1, r2 = runs(db, replace)
    assert r1["status"] == "cancelled" and r1["reason"].startswith("replaced by the fire at")
    assert db["invocations"].get(r1["invocation_id"])["status"] == "cancelled"
    assert r2["status"] == "queued"
    a1, a2 = runs(db, allow)
    assert a1["status"] == "running" and a2["status"] == "queued"
    # The forbidden one runs again once the previous run is over.
    set_call(db, f1["invocation_id"], "succeeded")
    tick(db, scheduler, clock, 1.0)
    assert [r["status"] for r in runs(db, forbid)] == ["succeeded", "skipped", "queued"]
    assert jobs.get(db, "forbid")["skipped"] == 1
    assert jobs.get(db, "forbid")["last_success_at"] is not None


def test_catch_up_after_a_gap_and_unique_times(sched):
    db, scheduler, clock = sched
    job = make_job(db, "gap", "@every 2s")
    tick(db, scheduler, clock, 2.01)
    tick(db, scheduler, clock, 9.0)       # four times went by: 4, 6, 8, 10 s
    rows = runs(db, job)
    assert [r["status"] for r in rows] == ["queued", "missed", "missed", "missed", "skipped"]
    times = [r["scheduled_at"] for r in rows]
    assert len(set(times)) == len(times)
    assert all(b - a == pytest.approx(2.0) for a, b in zip(times, times[1:]))
    assert jobs.get(db, "gap")["missed"] == 3


def test_retries_carry_their_attempt_number(sched):
    db, scheduler, clock = sched
    job = make_job(db, "retry", "@every 1h", retries=2, retry_backoff_s=4)
    run = job_runs.manual(db, job)
    set_call(db, run["invocation_id"], "failed")
    tick(db, scheduler, clock, 0.01)
    waiting = runs(db, job)[-1]
    assert waiting["attempt"] == 2 and waiting["status"] == "waiting"
    assert 2.0 <= waiting["retry_at"] - clock.t <= 4.0
    tick(db, scheduler, clock, 4.01)
    second = runs(db, job)[-1]
    assert second["status"] == "queued" and second["invocation_id"]
    set_call(db, second["invocation_id"], "failed")
    tick(db, scheduler, clock, 0.01)
    third = runs(db, job)[-1]
    assert third["attempt"] == 3 and 4.0 <= third["retry_at"] - clock.t <= 8.0
    tick(db, scheduler, clock, 8.01)
    set_call(db, runs(db, job)[-1]["invocation_id"], "failed")
    tick(db, scheduler, clock, 0.01)
    rows = runs(db, job)
    assert [(r["attempt"], r["status"], r["trigger"]) for r in rows] == [
        (1, "failed", "manual"), (2, "failed", "manual"), (3, "failed", "manual")]
    assert len({r["scheduled_at"] for r in rows}) == 1
    assert jobs.get(db, "retry")["failures"] == 3


def test_a_jobs_own_timeout_stops_the_run(sched):
    db, scheduler, clock = sched
    job = make_job(db, "slowpoke", "@every 1h", timeout_s=5)
    run = job_runs.manual(db, job)
    set_call(db, run["invocation_id"], "running")
    db.execute("UPDATE invocations SET started_at = ? WHERE id = ?",
                    [clock.t, run["invocation_id"]])
    tick(db, scheduler, clock, 1)
    assert runs(db, job)[0]["status"] == "running"
    tick(db, scheduler, clock, 5)
    assert runs(db, job)[0]["status"] == "timed_out"
    call = db["invocations"].get(run["invocation_id"])
    assert call["status"] == "timed_out" and "timeout_s of 5s" in call["error"]


def test_at_fires_once_and_disables_the_job(sched):
    db, scheduler, clock = sched
    when = datetime.fromtimestamp(clock.t + 3, BERLIN).strftime("%Y-%m-%dT%H:%M:%S")
    job = make_job(db, "once", f"@at {when}", timezone="Europe/Berlin")
    tick(db, scheduler, clock, 4)
    tick(db, scheduler, clock, 60)
    assert [r["status"] for r in runs(db, job)] == ["queued"]
    row = jobs.get(db, "once")
    assert not row["enabled"] and row["next_fire_at"] is None


def test_a_scheduler_that_lost_its_lease_writes_nothing(sched):
    db, scheduler, clock = sched
    job = make_job(db, "fenced", "@every 1s")
    scheduler.step(db)
    assert scheduler.fencing == 1
    # Another scheduler took over while this one was stalled.
    db.execute("UPDATE leases SET holder = 'other', fencing = 2, expires_at = ? "
                    "WHERE name = ?", [time.time() + 60, LEASE_NAME])
    clock.t += 1.01
    scheduler.renew_at = float("inf")     # it has not noticed yet
    scheduler.step(db)
    assert runs(db, job) == [] and scheduler.fencing is None
    with pytest.raises(leases.LeaseLost):
        with leases.holding(db, LEASE_NAME, scheduler.holder, 1):
            pass


def test_history_keeps_the_last_successes_and_the_last_failure(sched):
    db, scheduler, clock = sched
    job = make_job(db, "old", "@every 1h", history_days=1)
    old = time.time() - 3 * 86400
    statuses = ["failed", "succeeded", "succeeded", "failed", "succeeded", "succeeded",
                "succeeded", "skipped", "missed"]
    for i, status in enumerate(statuses):
        db.execute("INSERT INTO job_runs (job_id, trigger, scheduled_at, attempt, status, "
                        "fired_at, finished_at, count) VALUES (?, 'cron', ?, 1, ?, ?, ?, 1)",
                        [job["id"], old + i, status, old + i, old + i])
    db.execute("INSERT INTO job_runs (job_id, trigger, scheduled_at, attempt, status, "
                    "fired_at, count) VALUES (?, 'cron', ?, 1, 'succeeded', ?, 1)",
                    [job["id"], time.time(), time.time()])
    assert job_runs.prune(db, time.time()) == 6
    kept = [r["status"] for r in runs(db, job)]
    assert kept == ["failed", "succeeded", "succeeded", "succeeded"]

"""Cron jobs end to end: a real `dockyard serve` (its scheduler process, dispatcher and worker),
a real clock and short intervals. Waits have deadlines; assertions are about outcomes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import psutil
import pytest

from conftest import Server, container_processes, make_package
from conftest import poll_until as wait_for

FINAL = ("succeeded", "failed", "timed_out", "crashed", "cancelled")



def runs_of(server: Server, name: str) -> list[dict]:
    response = server.api("GET", f"/api/jobs/{name}/runs?limit=500")
    assert response.status_code == 200, response.text
    return sorted(response.json()["runs"], key=lambda r: (r["scheduled_at"], r["attempt"]))


def overlaps(a: dict, b: dict) -> bool:
    return a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


@pytest.fixture(scope="module")
def containers(server, tmp_path_factory):
    """cron-jobs: four calls at once in each of two processes; cron-solo: one call per
    process (what cancel kills is then only the call it names)."""
    folder = tmp_path_factory.mktemp("jobpkgs")
    server.deploy(make_package(folder, "jobs", name="cron-jobs",
                               manifest_extra="[limits]\ninstances = 2\n"))
    server.deploy(make_package(folder, "jobs", name="cron-solo",
                               manifest_extra="[limits]\nconcurrency = 1\ninstances = 2\n"))
    yield
    for name in ("cron-jobs", "cron-solo"):
        server.api("DELETE", f"/api/containers/{name}")


@pytest.fixture
def add_job(server, containers):
    made = []

    def add(**body) -> dict:
        response = server.api("POST", "/api/jobs", json=body)
        assert response.status_code == 201, response.text
        made.append(body["name"])
        return response.json()
    yield add
    for name in made:
        server.api("POST", f"/api/jobs/{name}/pause")
        for run in runs_of(server, name):
            if run["invocation_id"] and run["status"] in ("queued", "running"):
                server.api("POST", f"/api/invocations/{run['invocation_id']}/cancel")
        server.api("DELETE", f"/api/jobs/{name}")


def test_every_second_and_a_six_field_schedule_fire_on_distinct_times(server, add_job):
    every = add_job(name="t-every", target="cron-jobs/tick", schedule="@every 1s",
                    payload={"n": 1})
    assert every["explain"] == "Every 1 second, counted from the job's creation"
    assert len(every["next_fires"]) == 5
    add_job(name="t-six", container="cron-jobs", function="main:tick",
            schedule="*/1 * * * * *", timezone="Europe/Berlin")
    for name in ("t-every", "t-six"):
        wait_for(lambda: len([r for r in runs_of(server, name)
                              if r["status"] == "succeeded"]) >= 3, 20, f"3 runs of {name}")
    for name, step in (("t-every", 1.0), ("t-six", 1.0)):
        runs = [r for r in runs_of(server, name) if r["status"] != "skipped"]
        times = [r["scheduled_at"] for r in runs]
        assert len(set(times)) == len(times)
        assert all(b - a == pytest.approx(step, abs=0.002) for a, b in zip(times, times[1:]))
        assert all(r["trigger"] == "cron" and r["attempt"] == 1 for r in runs)
    six = runs_of(server, "t-six")
    assert all(r["scheduled_at"] == int(r["scheduled_at"]) for r in six)
    done = next(r for r in runs_of(server, "t-every") if r["status"] == "succeeded")
    call = server.api("GET", f"/api/invocations/{done['invocation_id']}").json()
    assert call["trigger"] == "cron" and call["output"]["event"] == {"n": 1}
    assert done["duration_ms"] is not None and done["lateness_s"] is not None
    metrics = server.api("GET", "/metrics").text
    assert 'dockyard_job_fires_total{job="t-every"}' in metrics
    assert 'dockyard_job_last_success_timestamp_seconds{job="t-every"}' in metrics
    assert "dockyard_job_fire_lateness_seconds_bucket" in metrics


def test_policies_with_a_slow_function(server, add_job):
    add_job(name="p-forbid", target="cron-jobs/slow", schedule="@every 1s", payload={"s": 2.5})
    add_job(name="p-allow", target="cron-jobs/slow", schedule="@every 1s", payload={"s": 2.5},
            concurrency="allow")
    add_job(name="p-replace", target="cron-solo/slow", schedule="@every 2s",
            payload={"s": 30}, concurrency="replace")

    def finished(name):
        return [r for r in runs_of(server, name) if r["status"] == "succeeded"]
    wait_for(lambda: len(finished("p-forbid")) >= 2, 30, "two runs of p-forbid")
    wait_for(lambda: len(finished("p-allow")) >= 2, 30, "two runs of p-allow")
    wait_for(lambda: len([r for r in runs_of(server, "p-replace")
                          if r["status"] == "cancelled"]) >= 2, 30, "two replaced runs")

    forbid = runs_of(server, "p-forbid")
    skipped = [r for r in forbid if r["status"] == "skipped"]
    assert skipped and all("concurrency = forbid" in r["reason"] for r in skipped)
    ran = finished("p-forbid")
    assert not any(overlaps(a, b) for a, b in zip(ran, ran[1:]))

    ran = finished("p-allow")
    assert overlaps(ran[0], ran[1])       # side by side
    assert not [r for r in runs_of(server, "p-allow") if r["status"] == "skipped"]

    replaced = [r for r in runs_of(server, "p-replace") if r["status"] == "cancelled"]
    for run in replaced:
        assert run["reason"].startswith("replaced by the fire at")
        call = server.api("GET", f"/api/invocations/{run['invocation_id']}").json()
        assert call["status"] == "cancelled"
        # Killed, not left to finish its 30 s.
        assert call["finished_at"] - call["created_at"] < 10


def test_retries_with_backoff_record_each_attempt(server, add_job):
    add_job(name="r-fail", target="cron-jobs/fail", schedule="@every 1h", retries=2,
            retry_backoff_s=0.5)
    started = server.api("POST", "/api/jobs/r-fail/run")
    assert started.status_code == 202 and started.json()["trigger"] == "manual"
    runs = wait_for(lambda: (lambda rs: rs if len(rs) == 3 and all(
        r["status"] == "failed" for r in rs) else None)(runs_of(server, "r-fail")),
        30, "three failed attempts")
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert len({r["scheduled_at"] for r in runs}) == 1
    assert all("RuntimeError: this job always fails" in r["reason"] for r in runs), runs
    # Backoff: 0.5 s doubling, with jitter between half and all of it.
    assert runs[1]["fired_at"] - runs[0]["finished_at"] >= 0.25
    assert runs[2]["fired_at"] - runs[1]["finished_at"] >= 0.5
    for run in runs:
        call = server.api("GET", f"/api/invocations/{run['invocation_id']}").json()
        assert call["status"] == "failed" and call["trigger"] == "manual"
    # The job's counters follow within a scheduler pass.
    job = wait_for(lambda: (lambda j: j if j["counts"]["failures"] == 3 else None)(
        server.api("GET", "/api/jobs/r-fail").json()), 10, "three failures counted")
    assert job["last_status"] == "failed"


def test_pause_stops_fires_and_resume_does_not_replay_them(server, add_job):
    add_job(name="z-pause", target="cron-jobs/tick", schedule="@every 1s")
    wait_for(lambda: runs_of(server, "z-pause"), 10, "a first fire")
    paused = server.api("POST", "/api/jobs/z-pause/pause").json()
    assert not paused["enabled"] and paused["next_fire_at"] is None
    since = time.time()
    time.sleep(3)
    resumed = server.api("POST", "/api/jobs/z-pause/resume").json()
    assert resumed["enabled"] and resumed["next_fire_at"] > time.time() - 0.5
    wait_for(lambda: [r for r in runs_of(server, "z-pause") if r["scheduled_at"] > since],
             10, "a fire after resuming")
    during = [r for r in runs_of(server, "z-pause")
              if since + 0.5 < r["scheduled_at"] < resumed["updated_at"]]
    assert during == []
    assert all(r["status"] not in ("missed", "skipped") for r in runs_of(server, "z-pause"))


def test_at_fires_once_and_disables_the_job(server, add_job):
    berlin = ZoneInfo("Europe/Berlin")
    when = datetime.fromtimestamp(time.time() + 2.5, berlin).strftime("%Y-%m-%dT%H:%M:%S")
    job = add_job(name="a-once", target="cron-jobs/tick", schedule=f"@at {when}",
                  timezone="Europe/Berlin")
    assert job["next_fires"] == [datetime.fromisoformat(when).replace(tzinfo=berlin)
                                 .isoformat()]
    wait_for(lambda: not server.api("GET", "/api/jobs/a-once").json()["enabled"], 20,
             "the @at job to disable itself")
    time.sleep(1.5)
    runs = runs_of(server, "a-once")
    assert len(runs) == 1 and runs[0]["trigger"] == "cron"
    assert server.api("GET", "/api/jobs/a-once").json()["next_fire_at"] is None


def test_manifest_jobs_follow_the_active_version(server, containers, tmp_path):
    job = ('[[jobs]]\nname = "beat"\nfunction = "tick"\nschedule = "@every 1s"\n'
           'payload = {{ v = {v} }}\n')
    first = server.deploy(make_package(tmp_path, "jobs", name="cron-mf",
                                       manifest_extra=job.format(v=1)))
    try:
        row = server.api("GET", "/api/jobs/cron-mf.beat").json()
        assert row["source"] == "manifest" and row["version"] == first["version"]
        assert row["target"] == "cron-mf/tick" and row["payload"] == {"v": 1}
        wait_for(lambda: [r for r in runs_of(server, "cron-mf.beat")
                          if r["status"] == "succeeded"], 20, "a run of the manifest job")
        for method, body in (("PATCH", {"schedule": "@hourly"}), ("DELETE", None)):
            refused = server.api(method, "/api/jobs/cron-mf.beat", json=body)
            assert refused.status_code == 409 and "dockyard.toml" in refused.text
        # A pause survives a redeploy that leaves the job as it was.
        assert server.api("POST", "/api/jobs/cron-mf.beat/pause").status_code == 200
        second = server.deploy(make_package(tmp_path, "jobs", name="cron-mf",
                                            manifest_extra=job.format(v=1),
                                            files={"extra.txt": "2"}))
        row = server.api("GET", "/api/jobs/cron-mf.beat").json()
        assert not row["enabled"] and row["version"] == second["version"]
        before = len(runs_of(server, "cron-mf.beat"))
        # A changed job is rewritten (its history kept) and fires as now defined.
        server.deploy(make_package(tmp_path, "jobs", name="cron-mf",
                                   manifest_extra=job.format(v=2).replace("1s", "2s")))
        row = server.api("GET", "/api/jobs/cron-mf.beat").json()
        assert row["schedule"] == "@every 2s" and row["enabled"] and row["payload"] == {"v": 2}
        assert len(runs_of(server, "cron-mf.beat")) >= before

        def fired_with_v2():
            for run in runs_of(server, "cron-mf.beat"):
                if run["status"] == "succeeded":
                    call = server.api("GET", f"/api/invocations/{run['invocation_id']}").json()
                    if call["input"] == {"v": 2}:
                        return True
            return False
        wait_for(fired_with_v2, 20, "a run with the new payload")
        # A version without the job removes it; so does removing the container.
        server.deploy(make_package(tmp_path, "jobs", name="cron-mf"))
        assert server.api("GET", "/api/jobs/cron-mf.beat").status_code == 404
        server.deploy(make_package(tmp_path, "jobs", name="cron-mf",
                                   manifest_extra=job.format(v=3)))
        assert server.api("GET", "/api/jobs/cron-mf.beat").status_code == 200
    finally:
        server.api("DELETE", "/api/containers/cron-mf")
    assert server.api("GET", "/api/jobs/cron-mf.beat").status_code == 404


def test_cancel_kills_a_running_call(server, containers):
    started = server.invoke("cron-solo/tree?async=1", {"s": 60})
    invocation = started.json()["invocation_id"]
    wait_for(lambda: server.api("GET", f"/api/invocations/{invocation}").json()["status"]
             == "running", 20, "the call to run")

    def tree_with_sleep():
        for pid in container_processes(server.data, "cron-solo"):
            try:
                kids = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                continue
            if any("sleep" in " ".join(k.cmdline()) for k in kids):
                return [psutil.Process(pid), *kids]
        return None
    tree = wait_for(tree_with_sleep, 10, "the function's child process")
    response = server.api("POST", f"/api/invocations/{invocation}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, alive
    call = server.wait_invocation(invocation)
    assert call["status"] == "cancelled" and call["error"]["type"] == "Cancelled"
    # Cancelling again, or something unknown, says so; the container serves on.
    assert server.api("POST", f"/api/invocations/{invocation}/cancel").status_code == 409
    assert server.api("POST", "/api/invocations/inv_nothing/cancel").status_code == 404
    assert server.invoke("cron-solo/tick", {"after": "cancel"}).status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ({"target": "cron-jobs/tick", "schedule": "61 * * * *"}, 400,
     "schedule '61 * * * *': not a cron expression (Bad minute)"),
    ({"target": "cron-jobs/tick", "schedule": "0 0 31 2 *"}, 400,
     "schedule '0 0 31 2 *': never fires: no month it names has day 31"),
    ({"target": "cron-jobs/tick", "schedule": "@at 2026-02-31T09:00"}, 400,
     "day is out of range for month"),
    ({"target": "cron-jobs/tick", "schedule": "@at 2001-01-01T00:00"}, 400, "is in the past"),
    ({"target": "cron-jobs/tick", "schedule": "@daily", "timezone": "Mars/Olympus"}, 400,
     "unknown timezone 'Mars/Olympus'"),
    ({"target": "no-such-container/tick", "schedule": "@daily"}, 400,
     "no container named 'no-such-container'"),
    ({"target": "cron-jobs/nope", "schedule": "@daily"}, 400, "has no function 'nope'"),
    ({"target": "cron-jobs", "schedule": "@daily"}, 400, "is not 'container/function'"),
    ({"schedule": "@daily"}, 400, "a job needs a target"),
    ({"target": "cron-jobs/tick", "schedule": "@daily", "concurrency": "often"}, 400,
     "concurrency must be one of allow, forbid, replace"),
    ({"target": "cron-jobs/tick", "schedule": "@daily", "retries": -1}, 400,
     "retries must be between 0 and 100"),
    ({"target": "cron-jobs/tick", "schedule": "@daily", "when": "now"}, 400,
     "unknown field 'when'"),
    ({"name": "Bad Name", "target": "cron-jobs/tick", "schedule": "@daily"}, 400,
     "job name 'Bad Name' is not valid"),
])
def test_bad_definitions_are_400s(server, containers, body, status, message):
    response = server.api("POST", "/api/jobs", json={"name": "bad-job", **body})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert server.api("GET", "/api/jobs/bad-job").status_code == 404


def test_conflicts_and_unknown_jobs(server, add_job):
    add_job(name="c-dup", target="cron-jobs/tick", schedule="@hourly")
    again = server.api("POST", "/api/jobs", json={"name": "c-dup", "target": "cron-jobs/tick",
                                                  "schedule": "@hourly"})
    assert again.status_code == 409
    patched = server.api("PATCH", "/api/jobs/c-dup", json={"schedule": "*/10 * * * *",
                                                           "timezone": "Asia/Tokyo"})
    assert patched.status_code == 200 and patched.json()["timezone"] == "Asia/Tokyo"
    assert patched.json()["next_fires"][0].endswith("+09:00")
    assert server.api("PATCH", "/api/jobs/c-dup", json={"schedule": "nope"}).status_code == 400
    for method, path in (("GET", "/api/jobs/ghost"), ("POST", "/api/jobs/ghost/run"),
                         ("GET", "/api/jobs/ghost/runs"), ("DELETE", "/api/jobs/ghost")):
        assert server.api(method, path).status_code == 404


def test_the_cli_as_a_new_user(server, containers):
    added = server.cli("jobs", "add", "cli-tick", "cron-jobs/tick", "@every 1s",
                       "--payload", '{"from": "cli"}')
    try:
        assert "job cli-tick added: Every 1 second" in added.stdout
        assert "cli-tick" in server.cli("jobs", "ls").stdout
        shown = server.cli("jobs", "show", "cli-tick").stdout
        assert "next fires:" in shown and shown.count(" UTC\n") >= 5   # times say their zone
        wait_for(lambda: len([r for r in runs_of(server, "cli-tick")
                              if r["status"] == "succeeded"]) >= 2, 20, "two runs")
        table = server.cli("jobs", "runs", "cli-tick").stdout
        assert table.splitlines()[0].split()[:4] == ["SCHEDULED", "FIRED", "LATE", "STATUS"]
        assert "succeeded" in table and " ms " in table and "cron" in table
        ran = server.cli("jobs", "run", "cli-tick", "--wait")
        assert " succeeded in " in ran.stdout and '"from": "cli"' in ran.stdout
        assert "cli-tick paused" in server.cli("jobs", "pause", "cli-tick").stdout
        listed = json.loads(server.cli("jobs", "ls", "--json").stdout)
        assert [j["enabled"] for j in listed["jobs"] if j["name"] == "cli-tick"] == [False]
        assert "resumed; next fire:" in server.cli("jobs", "resume", "cli-tick").stdout
        bad = server.cli("jobs", "add", "cli-bad", "cron-jobs/tick", "61 * * * *", check=False)
        assert bad.returncode == 1 and "not a cron expression" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    finally:
        server.cli("jobs", "pause", "cli-tick", check=False)
        assert "cli-tick removed" in server.cli("jobs", "rm", "cli-tick").stdout


# -- several serve processes on one data dir, and a restart -------------------------------

def _db_rows(data, sql: str, args=()) -> list[tuple]:
    with sqlite3.connect(data / "dockyard.db", timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def _scheduler_holder(data) -> tuple[int, int] | None:
    rows = _db_rows(data, "SELECT holder, fencing, expires_at FROM leases WHERE name = "
                          "'scheduler'")
    if not rows or rows[0][2] < time.time():
        return None
    return int(rows[0][0].split(":")[1]), rows[0][1]


def test_two_serves_on_one_data_dir_never_double_fire(private_tmp, wheelhouse, tmp_path):
    data = private_tmp / "jobs-two" / "data"
    data.parent.mkdir()
    args = ["--find-links", str(wheelhouse), "--offline"]
    first = Server(data, args)
    second = None
    try:
        second = Server(data, [*args, "--no-local-worker"])
        first.deploy(make_package(tmp_path, "jobs", name="two-jobs"))
        for name, schedule in (("two-six", "* * * * * *"), ("two-every", "@every 1s")):
            assert second.api("POST", "/api/jobs", json={
                "name": name, "target": "two-jobs/tick", "schedule": schedule}
            ).status_code == 201
        wait_for(lambda: len(runs_of(first, "two-every")) >= 2, 20, "fires")
        # Stall the active scheduler past its lease: the other one takes over; when the
        # stalled one wakes up, its fencing number is stale and it writes nothing.
        for _ in range(3):
            pid, fencing = wait_for(lambda: _scheduler_holder(data), 20, "a scheduler")
            os.kill(pid, signal.SIGSTOP)
            try:
                taken = None
                end = time.monotonic() + 20
                while time.monotonic() < end and not taken:
                    holder = _scheduler_holder(data)
                    taken = holder if holder and holder[1] > fencing else None
                    time.sleep(0.2)
                if taken:
                    time.sleep(2)
            finally:
                os.kill(pid, signal.SIGCONT)
            if taken:
                break
        assert taken, "no other scheduler took over"
        time.sleep(3)
        for name in ("two-six", "two-every"):
            rows = _db_rows(data, "SELECT r.scheduled_at, r.invocation_id, r.fencing, "
                                  "r.fired_at FROM job_runs r JOIN jobs j ON j.id = r.job_id "
                                  "WHERE j.name = ? AND r.trigger = 'cron'", [name])
            times = [r[0] for r in rows]
            assert len(times) == len(set(times)), "a scheduled time fired twice"
            assert {r[2] for r in rows} >= {fencing, taken[1]}
            takeover = min(r[3] for r in rows if r[2] == taken[1])
            assert all(r[3] <= takeover for r in rows if r[2] == fencing), \
                "the stalled scheduler wrote after the takeover"
        fired = _db_rows(data, "SELECT count(*) FROM job_runs WHERE invocation_id IS NOT NULL")
        calls = _db_rows(data, "SELECT count(*), count(DISTINCT input) FROM invocations "
                               "WHERE trigger = 'cron'")
        assert calls[0][0] == fired[0][0]
        linked = _db_rows(data, "SELECT count(*) FROM invocations i JOIN job_runs r "
                                "ON r.invocation_id = i.id WHERE i.trigger = 'cron'")
        assert linked[0][0] == fired[0][0]
    finally:
        # Both at once: each one's leftover check would take the other's processes for its
        # own (they share the data dir).
        servers = [srv for srv in (second, first) if srv is not None]
        for srv in servers:
            srv.proc.send_signal(signal.SIGTERM)
        for srv in servers:
            srv.proc.wait(timeout=120)
        for srv in servers:
            assert srv.stop() == 0
            assert not srv.leftovers


def test_restart_after_downtime_runs_one_catch_up_and_the_rest_is_missed(
        private_tmp, wheelhouse, tmp_path):
    data = private_tmp / "jobs-restart" / "data"
    data.parent.mkdir()
    args = ["--find-links", str(wheelhouse), "--offline"]
    first = Server(data, args)
    try:
        first.deploy(make_package(tmp_path, "jobs", name="gap-jobs",
                                  manifest_extra="[limits]\nconcurrency = 1\n"))
        assert first.api("POST", "/api/jobs", json={
            "name": "gap", "target": "gap-jobs/tick", "schedule": "@every 2s"}
        ).status_code == 201
        wait_for(lambda: [r for r in runs_of(first, "gap") if r["status"] == "succeeded"],
                 20, "a first run")
    finally:
        assert first.stop() == 0
    down = time.time()
    time.sleep(7)
    second = Server(data, args)
    try:
        def two_runs_since_down():
            ran = [r for r in runs_of(second, "gap")
                   if r["scheduled_at"] > down and r["status"] == "succeeded"]
            return ran if len(ran) >= 2 else None
        # The catch-up, then the first regular run after the restart.
        regular = wait_for(two_runs_since_down, 30, "runs after the restart")[1]
        runs = [r for r in runs_of(second, "gap") if r["scheduled_at"] < regular["scheduled_at"]]
        times = [r["scheduled_at"] for r in runs]
        # Every scheduled time is there exactly once: fired, or recorded as missed.
        assert all(b - a == pytest.approx(2.0, abs=0.002) for a, b in zip(times, times[1:]))
        gap = runs[next(i for i, r in enumerate(runs) if r["status"] == "missed"):]
        missed = [r for r in gap if r["status"] == "missed"]
        # A regular fire that came while the catch-up still ran (a slow machine) is skipped,
        # as the job's `forbid` policy says: not a second catch-up.
        caught_up = [r for r in gap if r["status"] not in ("missed", "skipped")]
        assert len(missed) >= 2 and all("not running" in r["reason"] for r in missed)
        assert len(caught_up) == 1, caught_up
        assert caught_up[0]["status"] == "succeeded" and caught_up[0]["lateness_s"] > 0
        assert caught_up[0]["scheduled_at"] > max(r["scheduled_at"] for r in missed)
        job = second.api("GET", "/api/jobs/gap").json()
        assert job["counts"]["missed"] == len(missed)
        # Shutdown order: the scheduler and the dispatcher stop before the worker drains, so
        # the calls the dispatcher holds finish and the rest stay queued; none fails.
        queued = [second.invoke("gap-jobs/slow?async=1", {"s": 0.15}).json()["invocation_id"]
                  for _ in range(24)]
        wait_for(lambda: _db_rows(data, "SELECT count(*) FROM invocations WHERE status = "
                                        "'running' AND function = 'slow'")[0][0], 10,
                 "the calls to be claimed")
    finally:
        assert second.stop() == 0
        assert not second.leftovers
    statuses = [_db_rows(data, "SELECT status FROM invocations WHERE id = ?", [i])[0][0]
                for i in queued]
    assert set(statuses) <= {"succeeded", "queued"}, statuses
    assert "succeeded" in statuses

"""`python -m bench.jobs [--jobs 1000] [--every 10] [--duration 120]`: register many `@every`
jobs on a real `dockyard serve` and let them fire for a while; print how late fires were
(scheduled time → queued, and → running on the worker), how many scheduled times fired more
than once (the goal is none), how many were lost, and the CPU the scheduler process used."""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import time

import psutil

from .__main__ import machine
from .load import percentile
from .servers import Dockyard, package

TICK = "def tick(event):\n    return event\n"


def scheduler_process(dockyard: Dockyard) -> psutil.Process:
    for proc in psutil.Process(dockyard.proc.pid).children(recursive=True):
        if "dockyard.app.jobs.scheduler" in " ".join(proc.cmdline()):
            return proc
    raise RuntimeError("serve has no scheduler process")


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def register(dockyard: Dockyard, count: int, every: int) -> float:
    started = time.monotonic()
    for i in range(count):
        response = dockyard.http.post(dockyard.url + "/api/jobs", timeout=60, json={
            "name": f"bench-{i:04d}", "target": "benchjobs/tick", "schedule": f"@every {every}s",
            "payload": {"job": i}})
        response.raise_for_status()
    return time.monotonic() - started


def measure(db_target, since: float, until: float) -> dict:
    with sqlite3.connect(db_target, timeout=60) as conn:
        fires = conn.execute(
            "SELECT r.scheduled_at, r.fired_at, i.started_at, i.status FROM job_runs r "
            "JOIN invocations i ON i.id = r.invocation_id WHERE r.trigger = 'cron' "
            "AND r.attempt = 1 AND r.scheduled_at BETWEEN ? AND ?", [since, until]).fetchall()
        duplicates = conn.execute(
            "SELECT count(*) FROM (SELECT r.job_id, r.scheduled_at FROM job_runs r "
            "JOIN invocations i ON i.id = r.invocation_id WHERE r.trigger = 'cron' "
            "GROUP BY r.job_id, r.scheduled_at, r.attempt HAVING count(*) > 1)").fetchone()[0]
        orphans = conn.execute(
            "SELECT count(*) FROM invocations i WHERE i.trigger = 'cron' AND NOT EXISTS "
            "(SELECT 1 FROM job_runs r WHERE r.invocation_id = i.id)").fetchone()[0]
        other = dict(conn.execute(
            "SELECT status, sum(count) FROM job_runs WHERE status IN ('missed', 'skipped') "
            "AND scheduled_at BETWEEN ? AND ? GROUP BY status", [since, until]).fetchall())
        anchors = [a for (a,) in conn.execute("SELECT anchor FROM jobs WHERE name LIKE "
                                              "'bench-%'")]
    return {"fires": fires, "duplicates": duplicates + orphans, "missed": other.get("missed", 0),
            "skipped": other.get("skipped", 0), "anchors": anchors}


def expected_fires(anchors: list[float], every: int, since: float, until: float) -> int:
    total = 0
    for anchor in anchors:
        first = max(1, -(-(since - anchor) // every))
        last = (until - anchor) // every
        total += max(0, int(last - first + 1))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10, help="seconds between fires")
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds of firing measured after a warm-up of one interval")
    parser.add_argument("--json", dest="json_file", help="write the figures here")
    args = parser.parse_args()
    dockyard = Dockyard()
    try:
        dockyard.deploy(package("benchjobs", TICK, '[functions]\ntick = "main:tick"\n'
                                '[limits]\nconcurrency = 8\ninstances = 2\n'))
        took = register(dockyard, args.jobs, args.every)
        print(f"registered {args.jobs} jobs @every {args.every}s in {took:.1f}s", flush=True)
        scheduler = scheduler_process(dockyard)
        time.sleep(args.every)                      # every job has fired once: warm
        since = time.time()
        cpu_before, wall_before = cpu_seconds(scheduler), time.monotonic()
        serve_before = cpu_seconds(psutil.Process(dockyard.proc.pid))
        time.sleep(args.duration)
        cpu = cpu_seconds(scheduler) - cpu_before
        serve_cpu = cpu_seconds(psutil.Process(dockyard.proc.pid)) - serve_before
        wall = time.monotonic() - wall_before
        until = time.time() - 2.0                   # leave the last fires time to start
        time.sleep(3.0)
        found = measure(dockyard.data / "dockyard.db", since, until)
    finally:
        dockyard.stop()
    fires = found["fires"]
    fire_late = sorted(max(0.0, f - s) for s, f, _, _ in fires)
    start_late = sorted(max(0.0, st - s) for s, _, st, _ in fires if st is not None)
    expected = expected_fires(found["anchors"], args.every, since, until)
    failed = sum(1 for *_, status in fires if status != "succeeded")
    figures = {
        "jobs": args.jobs, "every_s": args.every, "measured_s": round(wall, 1),
        "fires": len(fires), "expected_fires": expected, "missed": found["missed"],
        "skipped": found["skipped"], "not_succeeded": failed,
        "duplicates": found["duplicates"],
        "fire_lateness_p50_s": round(percentile(fire_late, 0.5), 4),
        "fire_lateness_p99_s": round(percentile(fire_late, 0.99), 4),
        "fire_lateness_max_s": round(fire_late[-1], 4) if fire_late else None,
        "start_lateness_p50_s": round(percentile(start_late, 0.5), 4),
        "start_lateness_p99_s": round(percentile(start_late, 0.99), 4),
        "scheduler_cpu_percent": round(100.0 * cpu / wall, 2),
        "serve_cpu_percent": round(100.0 * serve_cpu / wall, 2),
    }
    print(f"\nmachine: {machine()}\n")
    rows = [
        ("jobs / interval", f"{args.jobs} @every {args.every}s", ""),
        ("measured for (s)", figures["measured_s"], ""),
        ("fires / expected", f"{figures['fires']} / {expected}",
         f"missed {figures['missed']}, skipped {figures['skipped']}, "
         f"not succeeded {failed}"),
        ("duplicates", figures["duplicates"], "goal: 0"),
        ("fire lateness p50 / p99 (s)",
         f"{figures['fire_lateness_p50_s']} / {figures['fire_lateness_p99_s']}",
         "scheduled -> queued; goal: p99 < 1 s"),
        ("start lateness p50 / p99 (s)",
         f"{figures['start_lateness_p50_s']} / {figures['start_lateness_p99_s']}",
         "scheduled -> running on the worker"),
        ("scheduler CPU (% of one core)", figures["scheduler_cpu_percent"],
         f"{cpu:.1f} s of CPU; serve (dispatcher) {figures['serve_cpu_percent']} %"),
    ]
    for label, value, note in rows:
        print(f"{label:<32} {str(value):>22}  {note}")
    if fires:
        print(f"\nmean fire lateness {statistics.fmean(fire_late):.4f} s over {len(fires)} fires")
    if args.json_file:
        with open(args.json_file, "w") as out:
            json.dump(figures, out, indent=2)
    return 0 if figures["duplicates"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench.failover [--quick] [--json FILE]`: one control plane (`--no-local-worker`)
and `dockyard worker` processes on this host, each with its own data dir, a `probe` container
with two instances on each; six clients call it in a loop. Rows: the steady state with one
worker, then one of two workers frozen (SIGSTOP, longer than a call's own deadline, then
SIGCONT) and one of two killed (SIGKILL), each measured the same way in the same run: calls,
calls failed, the longest call (stall), how long the worker took to leave routing, and calls
that ran after their caller had a failure answer (each run leaves a marker with its time in
the function's private /tmp, read through /proc: run as root)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from .servers import Dockyard, package

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 6
TIMEOUT_S = 5
QUEUE_S = 5
# A relayed call must start within its queue time (the probe's queue_timeout_s, said here:
# the default is longer than the freeze): its own deadline is that plus its timeout.
OWN_DEADLINE_S = QUEUE_S + TIMEOUT_S
PROBE = '''import os, time


def f(event, context):
    os.makedirs("/tmp/runs", exist_ok=True)
    with open("/tmp/runs/" + context.invocation_id, "w") as marker:
        marker.write(repr(time.time()))
    time.sleep(0.005)
    return {"ok": True}
'''
MANIFEST = (f'[functions]\nf = "main:f"\n[limits]\ninstances = 2\ntimeout_s = {TIMEOUT_S}\n'
            f'queue_timeout_s = {QUEUE_S}\n')


class Cluster(Dockyard):
    """A `serve --no-local-worker` and the `dockyard worker`s added to it."""

    def __init__(self):
        super().__init__(["--no-local-worker"], prefix="dockyard-bench-failover-")
        self.token_file = self.root / "worker-token"
        self.token_file.write_text((self.data / "tokens" / "worker").read_text())
        os.chmod(self.token_file, 0o600)
        self.workers: list[subprocess.Popen] = []

    def add_worker(self) -> subprocess.Popen:
        n = len(self.workers) + 1
        log = open(self.root / f"worker{n}.log", "w")
        env = {k: v for k, v in os.environ.items() if k != "DOCKYARD_TOKEN"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "dockyard", "--data", str(self.root / f"worker{n}"),
             "worker", "--server", self.url, "--token-file", str(self.token_file)],
            stdout=log, stderr=log, env=env, cwd=ROOT, start_new_session=True)
        self.workers.append(worker)
        return worker

    def states(self) -> dict[int, str]:
        return {w["pid"]: w["state"] for w in
                self.http.get(self.url + "/api/workers", timeout=30).json()["workers"]}

    def wait_serving(self, worker: subprocess.Popen) -> None:
        """Until `worker` is up and has run a call of the probe."""
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.states().get(worker.pid) == "up":
                before = len(runs(worker))
                for _ in range(8):
                    requests.post(self.url + "/invoke/probe/f", json={}, timeout=30)
                if len(runs(worker)) > before:
                    return
            time.sleep(0.1)
        raise RuntimeError("a worker never served the probe")

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
        super().stop()


def runs(worker: subprocess.Popen) -> dict[str, list[float]]:
    """Invocation id -> the times it ran on `worker` (one marker per run per process view)."""
    found: dict[str, list[float]] = collections.defaultdict(list)
    seen = set()
    try:
        procs = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(True)]
    except psutil.NoSuchProcess:
        return found
    for p in procs:
        folder = f"/proc/{p.pid}/root/tmp/runs"
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            for name in os.listdir(folder):
                try:
                    found[name].append(float(Path(folder, name).read_text()))
                except (OSError, ValueError):
                    pass
        except OSError:
            pass
    return found


class Load:
    def __init__(self, url: str, clients: int = CLIENTS):
        self.url = url
        self.answers: list[tuple[float, float, float, int, str | None]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True)
                        for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                response = session.post(self.url + "/invoke/probe/f", json={}, timeout=120)
                status = response.status_code
                try:
                    invocation_id = response.headers.get("X-Dockyard-Invocation-Id") or \
                        response.json().get("invocation_id")
                except ValueError:
                    invocation_id = None
            except requests.RequestException:
                status, invocation_id = 0, None
            # (start, end, wall-clock end, status, id)
            self.answers.append((started, time.monotonic(), time.time(), status,
                                 invocation_id))

    def stop(self) -> list:
        self.stopping.set()
        for thread in self.threads:
            thread.join(150)
        return self.answers


def summarize(answers: list, ran: dict[str, list[float]], reroute_s: float | None) -> dict:
    failed = [a for a in answers if a[3] != 200]
    run_after_failure = sum(1 for a in failed if a[4] and any(t > a[2] for t in ran.get(a[4], ())))
    return {"calls": len(answers), "failed": len(failed),
            "longest_s": round(max(a[1] - a[0] for a in answers), 2) if answers else None,
            "reroute_s": None if reroute_s is None else round(reroute_s, 2),
            "run_after_failure": run_after_failure}


def out_of_routing(cluster: Cluster, pid: int, since: float, limit: float = 30) -> float | None:
    while time.monotonic() - since < limit:
        if cluster.states().get(pid) in ("suspect", "lost", None):
            return time.monotonic() - since
        time.sleep(0.02)
    return None


def measure(quick: bool) -> dict:
    cluster = Cluster()
    rows = {}
    try:
        first = cluster.add_worker()
        end = time.monotonic() + 60
        while time.monotonic() < end and cluster.states().get(first.pid) != "up":
            time.sleep(0.1)
        record = cluster.http.post(cluster.url + "/api/containers",
                                   data=package("probe", PROBE, MANIFEST), timeout=60).json()
        cluster.wait_serving(first)
        steady_s = 3.0 if quick else 6.0
        load = Load(cluster.url)
        time.sleep(steady_s)
        rows["steady"] = summarize(load.stop(), runs(first), None)
        second = cluster.add_worker()
        cluster.wait_serving(second)
        del record

        # Freeze one of two for longer than a call's own deadline.
        load = Load(cluster.url)
        time.sleep(2.0)
        os.kill(first.pid, signal.SIGSTOP)
        froze = time.monotonic()
        reroute = out_of_routing(cluster, first.pid, froze)
        time.sleep(max(0.0, OWN_DEADLINE_S + 2.0 - (time.monotonic() - froze)))
        os.kill(first.pid, signal.SIGCONT)
        end = time.monotonic() + 30
        while time.monotonic() < end and cluster.states().get(first.pid) != "up":
            time.sleep(0.1)
        time.sleep(2.0)
        answers = load.stop()
        ran = runs(first)
        for key, times in runs(second).items():
            ran.setdefault(key, []).extend(times)
        rows["freeze"] = summarize(answers, ran, reroute)

        # Kill one of two.
        load = Load(cluster.url)
        time.sleep(2.0)
        ran = runs(second)
        os.kill(second.pid, signal.SIGKILL)
        killed = time.monotonic()
        reroute = out_of_routing(cluster, second.pid, killed)
        time.sleep(3.0)
        answers = load.stop()
        second.wait(30)
        for key, times in runs(first).items():
            ran.setdefault(key, []).extend(times)
        rows["kill"] = summarize(answers, ran, reroute)
        for name in ("steady", "freeze", "kill"):
            rows[name]["seconds"] = round(steady_s, 1) if name == "steady" else None
    finally:
        cluster.stop()
    return rows


def print_rows(rows: dict) -> None:
    print(f"\n{'failover (6 clients, probe: 2 instances/worker)':<46} {'calls':>6} "
          f"{'failed':>6} {'stall s':>7} {'reroute s':>9} {'ran after fail':>14}  target")
    labels = {"steady": ("one worker, steady state", "baseline"),
              "freeze": (f"freeze one of two ({OWN_DEADLINE_S + 2}s SIGSTOP)",
                         f"stall <= {OWN_DEADLINE_S + 1}s, reroute < 1s, 0 ran"),
              "kill": ("kill -9 one of two", "reroute < 1s, 0 ran")}
    for name, (label, target) in labels.items():
        row = rows.get(name)
        if not row:
            continue
        reroute = "" if row["reroute_s"] is None else row["reroute_s"]
        print(f"{label:<46} {row['calls']:>6} {row['failed']:>6} {row['longest_s']:>7} "
              f"{reroute:>9} {row['run_after_failure']:>14}  {target}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("(failover benchmark not run: it reads the function's markers through /proc "
              "and needs root)")
        return 0
    rows = measure(args.quick)
    print_rows(rows)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(rows, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

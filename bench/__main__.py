"""`python -m bench [--quick] [--json FILE]`: start a real `dockyard serve`, measure the warm
path, deploys, cold starts, redeploys under load, scaling and memory, each beside its baseline
measured in the same run on the same machine, and print the table; then the build of a
one-dependency package before and after builds were split in two steps (bench/build.py), and
one of two workers frozen and killed (bench/failover.py). The warm path is measured twice: on
the default store (SQLite in the data dir) and on a second `serve --db` whose store is a
throwaway PostgreSQL server started for the run (skipped, with one line saying why, where
PostgreSQL is not installed), and on that database a rollback through one control plane is
timed until a call through a second one takes the version it names (bench/routes.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from . import load
from .load import concurrent, latencies, percentile
from .routes import route_change
from .servers import NOOP, BareFlask, Dockyard, package, postgres_database, tiny_wheelhouse

BURN = ("def f(event):\n    total = 0\n    for i in range(400_000):\n        total += i * i\n"
        "    return total\n")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
ECHO_CHILD = r'''
import json, struct, sys
r, w = sys.stdin.buffer, sys.stdout.buffer
while True:
    h = r.read(4)
    if len(h) < 4:
        break
    body = r.read(struct.unpack(">I", h)[0])
    out = json.dumps(json.loads(body)).encode()
    w.write(struct.pack(">I", len(out)) + out)
    w.flush()
'''


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def pipe_round_trip_us(count: int = 2000) -> float:
    child = subprocess.Popen([PY, "-c", ECHO_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    body = json.dumps({"id": "1", "event": {"a": 1}}).encode()
    frame = struct.pack(">I", len(body)) + body
    times = []
    for i in range(count + 200):
        started = time.perf_counter()
        child.stdin.write(frame)
        child.stdin.flush()
        size = struct.unpack(">I", child.stdout.read(4))[0]
        child.stdout.read(size)
        if i >= 200:
            times.append(time.perf_counter() - started)
    child.stdin.close()
    child.wait()
    return round(statistics.median(times) * 1e6, 1)


def fresh_python_ms(count: int = 20) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run([PY, "-c", "import json; json.dumps({'a': 1})"], check=True)
        times.append(time.perf_counter() - started)
    return ms(statistics.median(times))


def rps(url: str, clients: int, seconds: float) -> float:
    samples, failed = concurrent(url, clients, seconds)
    if failed:
        raise RuntimeError(f"{failed} failed calls while measuring {url}")
    return round(len(samples) / seconds, 1)


def warm_path(results: dict, dockyard: Dockyard, quick: bool,
              on_postgres: Dockyard | None = None) -> None:
    """The warm path of `dockyard` (SQLite) and, when given, of `on_postgres` (the same serve
    with --db postgresql://...) beside bare Flask: "warm_*", "warm_pg_*", "bare_flask_*"."""
    targets = []
    for name, server in (("warm", dockyard), ("warm_pg", on_postgres)):
        if server is not None:
            server.deploy(package("noop", NOOP, '[functions]\nf = "main:f"\n'))
            targets.append((name, server.url + "/invoke/noop/f"))
    bare = BareFlask()
    try:
        # Interleaved rounds, so a burst of noise on this shared machine hits every side:
        # latencies pooled over the rounds, throughput the median round.
        rounds = 3
        count = (1000 if quick else 3000) // rounds
        seconds = 2.0 if quick else 3.0
        targets.append(("bare_flask", bare.url + "/echo"))
        lat = {name: [] for name, _ in targets}
        rates = {(name, c): [] for name, _ in targets for c in (1, 8)}
        for _ in range(rounds):
            for name, target in targets:
                lat[name] += latencies(target, count)
                for clients in (1, 8):
                    rates[(name, clients)].append(rps(target, clients, seconds))
        for name, _ in targets:
            results[f"{name}_p50_ms"] = ms(percentile(lat[name], 0.5))
            results[f"{name}_p99_ms"] = ms(percentile(lat[name], 0.99))
            for clients in (1, 8):
                results[f"{name}_rps_c{clients}"] = statistics.median(rates[(name, clients)])
    finally:
        bare.stop()


def deploy_to_first_call(dockyard: Dockyard, name: str, source: str, manifest: str) -> dict:
    started = time.perf_counter()
    record = dockyard.upload(package(name, source, manifest))
    uploaded = time.perf_counter()
    dockyard.wait_ready(record["deployment"])
    ready = time.perf_counter()
    response = dockyard.http.post(f"{dockyard.url}/invoke/{name}/f", data="{}", timeout=60)
    response.raise_for_status()
    done = time.perf_counter()
    dep = dockyard.http.get(f"{dockyard.url}/api/deployments/{record['deployment']}").json()
    built = [line for line in dep["workers"][0]["log"].splitlines() if "built in" in line]
    return {"total_s": round(done - started, 3), "upload_s": round(uploaded - started, 3),
            "ready_s": round(ready - uploaded, 3), "first_call_s": round(done - ready, 3),
            "venv_s": float(built[-1].split("built in ")[1].rstrip("s")) if built else None}


def cold_call_ms(dockyard: Dockyard, samples: int = 5) -> float:
    """The median of `samples` first calls to containers scaled to zero (each a fresh process
    started by the call)."""
    times = []
    for n in range(samples):
        name = f"zero{n}"
        dockyard.deploy(package(name, NOOP, '[functions]\nf = "main:f"\n[limits]\ninstances = 0\n'))
        started = time.perf_counter()
        response = dockyard.http.post(f"{dockyard.url}/invoke/{name}/f", data="{}", timeout=60)
        response.raise_for_status()
        times.append(time.perf_counter() - started)
    return ms(statistics.median(times))


def sandbox_cost(results: dict, wheelhouse: Path, dockyard: Dockyard) -> None:
    """What the private view costs: deploy -> first call and the cold call, against a second
    dockyard whose children run without namespaces (`--no-view`), in the same run."""
    results["cold_call_ms"] = cold_call_ms(dockyard)
    plain = Dockyard(["--find-links", str(wheelhouse), "--offline", "--no-view"])
    try:
        first = deploy_to_first_call(plain, "fresh", NOOP, '[functions]\nf = "main:f"\n')
        results["deploy_first_call_noview_s"] = first["total_s"]
        results["cold_call_noview_ms"] = cold_call_ms(plain)
    finally:
        plain.stop()


def redeploy_under_load(results: dict, dockyard: Dockyard, quick: bool) -> None:
    seconds = 10.0 if quick else 30.0
    dockyard.deploy(package("swap", NOOP, '[functions]\nf = "main:f"\n', version="v0"))
    windows: list[tuple[float, float]] = []

    def redeploys():
        for n, at in enumerate((seconds / 3, 2 * seconds / 3), start=1):
            time.sleep(max(0.0, start + at - time.time()))
            began = time.time()
            dockyard.deploy(package("swap", NOOP + f"# v{n}\n", '[functions]\nf = "main:f"\n',
                                    version=f"v{n}"))
            windows.append((began, time.time() + 2.0))

    start = time.time() + 0.3
    thread = threading.Thread(target=redeploys)
    thread.start()
    samples, failed = concurrent(dockyard.url + "/invoke/swap/f", 20, seconds)
    thread.join()
    in_swap = [lat for at, lat, ok in samples if any(a <= at <= b for a, b in windows)]
    steady = [lat for at, lat, ok in samples if not any(a <= at <= b for a, b in windows)]
    results["redeploy_calls"] = len(samples)
    results["redeploy_failed"] = failed
    results["redeploy_swap_p99_ms"] = ms(percentile(in_swap, 0.99))
    results["redeploy_steady_p99_ms"] = ms(percentile(steady, 0.99))
    results["redeploy_p99_ratio"] = round(percentile(in_swap, 0.99) / percentile(steady, 0.99), 2)


def scaling(results: dict, dockyard: Dockyard, quick: bool) -> None:
    seconds = 4.0 if quick else 8.0
    for instances in (1, 2):
        name = f"burn{instances}"
        dockyard.deploy(package(name, BURN, f'[functions]\nf = "main:f"\n[limits]\n'
                                            f'instances = {instances}\n'))
        results[f"burn_rps_i{instances}"] = rps(f"{dockyard.url}/invoke/{name}/f", 4, seconds)
    results["scaling_ratio"] = round(results["burn_rps_i2"] / results["burn_rps_i1"], 2)


def idle_memory(results: dict, dockyard: Dockyard) -> None:
    """Per instance: the function process's RSS, and the unique memory of the two sandbox
    processes around it (the monitor on the host side and the namespace's init)."""
    time.sleep(1.0)
    per_child, overhead = [], []
    per_version: dict[str, float] = {}
    prefix = str(dockyard.data / "worker") + "/"
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if "launch.py" not in " ".join(proc.info["cmdline"] or []) or \
                    not (proc.info["cwd"] or "").startswith(prefix):
                continue
            tree = [proc, *proc.children(recursive=True)]
            servers = [p for p in tree if "bootstrap" in " ".join(p.cmdline())]
            if not servers:
                continue
            rss = servers[0].memory_info().rss / (1 << 20)
            per_child.append(rss)
            overhead.append(sum(p.memory_full_info().uss for p in tree[:2]) / (1 << 20))
            version = "/".join(Path(proc.info["cwd"]).parts[-2:])
            per_version[version] = per_version.get(version, 0.0) + rss
        except psutil.Error:
            pass
    results["idle_rss_mb"] = round(statistics.mean(per_child), 1)
    results["sandbox_uss_mb"] = round(statistics.mean(overhead), 1)
    results["idle_rss_per_version_mb"] = round(statistics.mean(per_version.values()), 1)
    results["idle_instances"] = len(per_child)


ROWS = [
    # label, value key, baseline key, target text
    # The warm path on each store: SQLite in the data dir (the default), then serve --db
    # postgresql://... (the throwaway server's).
    ("warm invoke p50, SQLite (ms)", "warm_p50_ms", "bare_flask_p50_ms", "<= 1.6x bare"),
    ("warm invoke p50, PostgreSQL (ms)", "warm_pg_p50_ms", "bare_flask_p50_ms", "<= 1.6x bare"),
    ("warm invoke p99, SQLite (ms)", "warm_p99_ms", "bare_flask_p99_ms", ""),
    ("warm invoke p99, PostgreSQL (ms)", "warm_pg_p99_ms", "bare_flask_p99_ms", ""),
    ("throughput c1, SQLite (req/s)", "warm_rps_c1", "bare_flask_rps_c1", ""),
    ("throughput c1, PostgreSQL (req/s)", "warm_pg_rps_c1", "bare_flask_rps_c1", ""),
    ("throughput c8, SQLite (req/s)", "warm_rps_c8", "bare_flask_rps_c8", ">= 0.6x bare"),
    ("throughput c8, PostgreSQL (req/s)", "warm_pg_rps_c8", "bare_flask_rps_c8",
     ">= 0.6x bare"),
    ("rollback served, PostgreSQL p50 (ms)", "route_first_p50_ms", None, "< 1000"),
    ("  then via a 2nd plane, p50 (ms)", "route_lag_p50_ms", "route_max_age_ms",
     "baseline: no notify"),
    ("  then via a 2nd plane, max (ms)", "route_lag_max_ms", "route_max_age_ms",
     "< 1000"),
    ("pipe round trip, floor (us)", "pipe_rtt_us", None, ""),
    ("fresh python per call (ms)", "fresh_python_ms", "warm_p50_ms", "what dockyard avoids"),
    ("deploy -> first call, no deps (s)", "deploy_first_call_s", "deploy_first_call_noview_s",
     "< 1 s; baseline: no view"),
    ("deploy -> first call, 1 dep (s)", "deploy_first_call_dep_s", None, "< 1.5 s"),
    ("cold call, instances=0 (ms)", "cold_call_ms", "cold_call_noview_ms",
     "< 60 ms; baseline: no view"),
    ("redeploy: calls / failed", "redeploy_calls", "redeploy_failed", "0 failed"),
    ("redeploy p99 swap vs steady (ms)", "redeploy_swap_p99_ms", "redeploy_steady_p99_ms",
     "<= 2x"),
    ("CPU-bound, 2 vs 1 instances (req/s)", "burn_rps_i2", "burn_rps_i1", ">= 1.7x"),
    ("429s retried, lone containers", "throttled_429", None, "0"),
    ("idle RSS per instance (MB)", "idle_rss_mb", None, "< 30 MB"),
    ("sandbox processes per instance, USS (MB)", "sandbox_uss_mb", None, "monitor + init"),
]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores, {model}, {psutil.virtual_memory().total >> 30} GiB, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def print_table(results: dict) -> None:
    print(f"\nmachine: {machine()}\n")
    print(f"{'measure':<38} {'dockyard':>10} {'baseline':>10} {'ratio':>7}  target")
    for label, key, base_key, target in ROWS:
        value = results.get(key)
        base = results.get(base_key) if base_key else None
        ratio = f"{value / base:.2f}" if value is not None and base else ""
        print(f"{label:<38} {value if value is not None else '-':>10} "
              f"{base if base is not None else '':>10} {ratio:>7}  {target}")
    for key in ("deploy_breakdown", "deploy_dep_breakdown"):
        if key in results:
            print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in results[key].items()))


def build_split(quick: bool) -> dict:
    """The build of a one-dependency package before the split (one step, in a view with the
    network) and now (resolve and download, then install offline): bench/build.py, in its
    own process, printing its own table."""
    print()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, "-m", "bench.build", "--runs",
                               "3" if quick else "5", "--json", out.name],
                              cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            print("(build benchmark not run: see above)")
            return {}
        return json.loads(Path(out.name).read_text() or "{}")


def failover(quick: bool) -> dict:
    """One of two workers frozen, and one killed, beside one worker's steady state:
    bench/failover.py, in its own process, printing its own rows."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, "-m", "bench.failover", "--json", out.name,
                               *(["--quick"] if quick else [])],
                              cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            print("(failover benchmark not run: see above)")
            return {}
        return json.loads(Path(out.name).read_text() or "{}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--json", dest="json_file", help="write the figures here")
    args = parser.parse_args()
    results: dict = {}
    wheelhouse = tiny_wheelhouse(Path(tempfile.mkdtemp(prefix="dockyard-bench-wheels-")))
    dockyard = None
    try:
        results["pipe_rtt_us"] = pipe_round_trip_us()
        results["fresh_python_ms"] = fresh_python_ms()
        serve_args = ["--find-links", str(wheelhouse), "--offline"]
        dockyard = Dockyard(serve_args)
        # The same serve with its store in PostgreSQL, for the warm path only; it and its
        # server are gone before the rest is measured.
        with postgres_database() as (db_url, why):
            on_postgres = None
            if db_url is None:
                print(f"PostgreSQL rows skipped: {why}", flush=True)
            try:
                if db_url is not None:
                    on_postgres = Dockyard([*serve_args, "--db", db_url],
                                           prefix="dockyard-bench-pg-")
                warm_path(results, dockyard, args.quick, on_postgres)
                if on_postgres is not None:
                    route_change(results, on_postgres, db_url, serve_args, args.quick)
            finally:
                if on_postgres is not None:
                    on_postgres.stop()
        plain = deploy_to_first_call(dockyard, "fresh", NOOP, '[functions]\nf = "main:f"\n')
        results["deploy_first_call_s"] = plain["total_s"]
        results["deploy_breakdown"] = plain
        dep = deploy_to_first_call(
            dockyard, "withdep", "import benchdep\n\ndef f(event):\n    return benchdep.value()\n",
            'dependencies = ["benchdep==1.0"]\n[functions]\nf = "main:f"\n')
        results["deploy_first_call_dep_s"] = dep["total_s"]
        results["deploy_dep_breakdown"] = dep
        sandbox_cost(results, wheelhouse, dockyard)
        redeploy_under_load(results, dockyard, args.quick)
        scaling(results, dockyard, args.quick)
        idle_memory(results, dockyard)
        results["throttled_429"] = sum(load.throttled.values())
    finally:
        if dockyard is not None:
            dockyard.stop()
        shutil.rmtree(wheelhouse, ignore_errors=True)
    print_table(results)
    results["build_ms"] = build_split(args.quick)
    results["failover"] = failover(args.quick)
    if args.json_file:
        flat = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        for group in ("deploy_breakdown", "deploy_dep_breakdown"):
            for k, v in results.get(group, {}).items():
                if isinstance(v, (int, float)):
                    flat[f"{group}_{k}"] = v
        for source, row in (results.get("build_ms") or {}).items():
            for k, v in row.items():
                flat[f"build_ms_{source}_{k}"] = v
        for case, row in (results.get("failover") or {}).items():
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    flat[f"failover_{case}_{k}"] = v
        Path(args.json_file).write_text(json.dumps(flat, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

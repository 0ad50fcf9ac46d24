"""`python -m bench.profile [--seconds N] [--clients N] [--py-spy PATH]`: put a real
`dockyard serve` under warm load and report the CPU each of its processes spends per call
(web processes, worker agent, function process), measured from /proc; with --py-spy, also
sample one web process and print the functions where it spends its time (self and total),
so that a change to the warm path is chosen by a profile and judged by CPU per call."""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .load import concurrent
from .servers import Dockyard, package

NOOP = "def f(event):\n    return event\n"


def processes(dockyard: Dockyard) -> dict[str, list[psutil.Process]]:
    roles: dict[str, list[psutil.Process]] = collections.defaultdict(list)
    for proc in psutil.Process(dockyard.proc.pid).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "gunicorn" in cmd and proc.ppid() != dockyard.proc.pid:
            roles["web"].append(proc)
        elif " worker " in f" {cmd} ":
            roles["worker agent"].append(proc)
        elif "bootstrap" in cmd:
            roles["function process"].append(proc)
        elif "launch.py" in cmd:
            roles["sandbox (monitor, init)"].append(proc)
    return roles


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def top_frames(raw: Path, limit: int = 25) -> str:
    """py-spy's raw output (collapsed stacks, one `a;b;c count` line each) as self and total
    sample shares per function."""
    own, total, samples = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        # One entry per function, whatever line of it was running.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    out = [f"{samples} samples holding the GIL; self % / total %  function (file)"]
    for frame, n in own.most_common(limit):
        out.append(f"{100 * n / samples:6.1f} {100 * total[frame] / samples:6.1f}  {frame}")
    out.append("by total:")
    for frame, n in total.most_common(limit):
        out.append(f"{100 * own[frame] / samples:6.1f} {100 * n / samples:6.1f}  {frame}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--py-spy", dest="py_spy", help="py-spy binary: sample a process")
    parser.add_argument("--sample", default="web", choices=["web", "worker agent", "function process"],
                        help="which process py-spy samples")
    args = parser.parse_args()
    dockyard = Dockyard([])
    try:
        dockyard.deploy(package("prof", NOOP, '[functions]\nf = "main:f"\n'))
        url = f"{dockyard.url}/invoke/prof/f"
        concurrent(url, 2, 2.0)  # warm every connection and cache
        roles = processes(dockyard)
        before = {role: cpu_seconds(procs) for role, procs in roles.items()}
        spy = None
        if args.py_spy:
            raw = Path(tempfile.mkdtemp()) / "profile.raw"
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(roles[args.sample][0].pid),
                                    "--format", "raw", "--output", str(raw), "--rate", "500",
                                    "--duration", str(int(args.seconds)), "--nonblocking", "--gil"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples, failed = concurrent(url, args.clients, args.seconds)
        calls = len(samples)
        print(f"{calls} calls in {args.seconds:g}s with {args.clients} clients "
              f"({calls / args.seconds:.0f}/s), {failed} failed")
        for role, procs in roles.items():
            spent = cpu_seconds(procs) - before[role]
            print(f"  {role:<26} {1e6 * spent / max(calls, 1):8.0f} us CPU per call "
                  f"({len(procs)} process(es))")
        if spy is not None:
            spy.wait()
            print(top_frames(raw))
    finally:
        dockyard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

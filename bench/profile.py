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
from pathlib import Path

import psutil

from .load import concurrent
from .servers import NOOP, BareFlask, Dockyard, package



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
        else:
            roles["other (serve's helpers)"].append(proc)
    roles["other (serve's helpers)"].append(psutil.Process(dockyard.proc.pid))
    return roles


def cpu_seconds(procs: list[psutil.Process]) -> tuple[float, float]:
    """(user, system) CPU seconds of `procs` so far."""
    user = system = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            user += times.user
            system += times.system
        except psutil.Error:
            pass
    return user, system


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every process, the kernel's own work
    included): what the load generator, loopback TCP and every dockyard process cost."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def report(role: str, count: int, before: tuple[float, float], after: tuple[float, float],
           calls: int) -> None:
    user, system = (1e6 * (a - b) / max(calls, 1) for a, b in zip(after, before))
    print(f"  {role:<26} {user + system:8.0f} us CPU per call (user {user:4.0f}, system "
          f"{system:4.0f}; {count} process(es))")


def baseline(seconds: float, clients: int) -> None:
    """The same load on the bare Flask echo app under the same gunicorn settings."""
    bare = BareFlask()
    try:
        url = f"{bare.url}/echo"
        concurrent(url, 2, 2.0)
        procs = psutil.Process(bare.proc.pid).children()
        before, busy = cpu_seconds(procs), machine_busy()
        samples, failed = concurrent(url, clients, seconds)
        busy = machine_busy() - busy
        print(f"bare Flask: {len(samples)} calls ({len(samples) / seconds:.0f}/s), "
              f"{failed} failed; the machine busy {1e6 * busy / max(len(samples), 1):.0f} us "
              "per call")
        report("web", len(procs), before, cpu_seconds(procs), len(samples))
    finally:
        bare.stop()


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
    out = [f"{samples} samples; self % / total %  function (file)"]
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
    parser.add_argument("--top", type=int, default=25, help="functions listed per table")
    parser.add_argument("--not-gil", action="store_true",
                        help="sample every running thread, not only the one holding the GIL "
                             "(shows time in SQLite and system calls, which release it)")
    parser.add_argument("--baseline", action="store_true",
                        help="then the same load on the bare Flask baseline")
    parser.add_argument("--raw", help="keep py-spy's collapsed stacks in this file")
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
            raw = Path(args.raw or Path(tempfile.mkdtemp()) / "profile.raw")
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(roles[args.sample][0].pid),
                                    "--format", "raw", "--output", str(raw), "--rate", "500",
                                    "--duration", str(int(args.seconds)), "--nonblocking",
                                    *([] if args.not_gil else ["--gil"])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        busy = machine_busy()
        samples, failed = concurrent(url, args.clients, args.seconds)
        busy = machine_busy() - busy
        calls = len(samples)
        print(f"{calls} calls in {args.seconds:g}s with {args.clients} clients "
              f"({calls / args.seconds:.0f}/s), {failed} failed; the machine busy "
              f"{1e6 * busy / max(calls, 1):.0f} us per call")
        for role, procs in roles.items():
            report(role, len(procs), before[role], cpu_seconds(procs), calls)
        if spy is not None:
            spy.wait()
            print(top_frames(raw, args.top))
    finally:
        dockyard.stop()
    if args.baseline:
        baseline(args.seconds, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())

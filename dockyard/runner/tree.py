"""Killing a child's whole process tree: its session, every descendant psutil can find, and
whatever else the isolation layer knows about (its cgroup)."""

from __future__ import annotations

import os
import signal
from typing import Callable

import psutil


def kill_tree(pid: int, extra: Callable[[], None] | None = None) -> None:
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        procs = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    if extra is not None:
        extra()


def kill_strays(worker_dir) -> int:
    """Kill processes a previous worker on this dir left behind (it was killed before it could
    stop its children): anything running with its working directory below `worker_dir`."""
    prefix = str(worker_dir).rstrip("/") + "/"
    killed = 0
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd") or ""
        if cwd.startswith(prefix) and proc.pid != os.getpid():
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed

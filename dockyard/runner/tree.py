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

"""Debian packages some tests need (PostgreSQL, Chromium and its driver, passt): installed by
the test run itself when they are missing and it runs as root on a machine with apt-get, so the
README's one test command sets a fresh machine up; otherwise the caller says what to install."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

LOCK = Path(tempfile.gettempdir()) / "dockyard-apt-install.lock"


def install(*packages: str) -> str:
    """Install `packages` with apt-get when possible; "" on success, else why not (one line).
    Several test processes may ask at once: one installs, the others wait for it."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root on a machine with apt-get"
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        done = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                               *packages], capture_output=True, text=True, env=env,
                              timeout=900)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["apt-get failed"])[-1]
            return f"apt-get install {' '.join(packages)} failed: {last}"
        return ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install {' '.join(packages)} failed: {exc}"
    finally:
        os.close(fd)

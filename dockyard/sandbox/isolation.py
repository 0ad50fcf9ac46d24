"""What surrounds each child: its identity (an unprivileged uid per container when the worker
runs as root), its environment, its resource limits, and the interpreter its venvs are built
from. `summary()` says what is on, what is off and why; nothing is skipped silently."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dockyard.isolation")

DEFAULT_UID_BASE = 200_000
UID_RANGE = 50_000
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
OPEN_FILES = 1024
FILE_SIZE_BYTES = 1 << 30


@dataclass
class Isolation:
    uid_base: int = DEFAULT_UID_BASE
    drop_privileges: bool = field(default_factory=lambda: os.geteuid() == 0)
    notes: dict = field(default_factory=dict)

    def identity(self, container_id: int) -> tuple[int | None, int | None]:
        """A uid/gid of its own per container, so containers cannot touch each other."""
        if not self.drop_privileges:
            return None, None
        uid = self.uid_base + (int(container_id) % UID_RANGE)
        return uid, uid

    @staticmethod
    def env(manifest_env: dict[str, str], venv: Path) -> dict[str, str]:
        """Only the manifest's env plus a safe minimum; never the worker's own variables."""
        env = {"PATH": f"{venv}/bin:{SAFE_PATH}", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONUNBUFFERED": "0", "VIRTUAL_ENV": str(venv)}
        env.update(manifest_env)
        return env

    def rlimits(self, limits) -> dict[str, int]:
        """The rlimits the bootstrap sets on itself before it imports any user code (lowering
        one's own limits needs no privilege; setting another process's needs
        CAP_SYS_RESOURCE, which containers often lack)."""
        wanted = {
            "RLIMIT_AS": int(limits.memory_mb) * 1024 * 1024,
            "RLIMIT_NOFILE": OPEN_FILES,
            "RLIMIT_FSIZE": FILE_SIZE_BYTES,
            "RLIMIT_CORE": 0,
        }
        if self.drop_privileges:
            # RLIMIT_NPROC counts per uid and does not bind root; with a dropped uid it does.
            wanted["RLIMIT_NPROC"] = int(limits.processes)
        return wanted

    def summary(self) -> dict:
        out = {
            "session": {"on": True, "how": "own session and process group (setsid)"},
            "environment": {"on": True, "how": "manifest env plus PATH, LANG, HOME, TMPDIR"},
            "rlimits": {"on": True, "how": "address space, open files, file size, core"},
            "uid": ({"on": True, "how": f"uid/gid {self.uid_base}+container id, "
                     "no supplementary groups"} if self.drop_privileges else
                    {"on": False, "why": "the worker does not run as root, so children run "
                     "as the worker's own user"}),
            "process_limit": ({"on": True, "how": "RLIMIT_NPROC under the dropped uid"}
                              if self.drop_privileges else
                              {"on": False, "why": "RLIMIT_NPROC does not separate children "
                               "that share the worker's uid"}),
        }
        out.update(self.notes)
        return out


def unreachable_ancestor(path: Path) -> Path | None:
    """The first folder above `path` that other users cannot traverse (children run as
    another uid and must reach their code below it), or None."""
    for folder in [*reversed(path.absolute().parents), path.absolute()]:
        try:
            if not os.stat(folder).st_mode & 0o001:
                return folder
        except FileNotFoundError:
            return None
    return None


def _runnable_by(python: str, uid: int | None) -> str | None:
    """None if `python` runs as `uid`, else the reason it does not."""
    try:
        done = subprocess.run([python, "-I", "-c", "import encodings, json, asyncio"],
                              capture_output=True, text=True, timeout=30,
                              user=uid, group=uid, extra_groups=[] if uid is not None else None,
                              cwd="/", env={"PATH": SAFE_PATH})
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return None


def choose_python(requested: str | None, uid: int | None) -> tuple[str, str]:
    """The interpreter venvs are built from: it must be runnable by the children's uid (a
    Python under root's 0700 home is not). Returns (path, why)."""
    candidates = []
    if requested:
        candidates.append(requested)
    base = getattr(sys, "_base_executable", None) or sys.executable
    candidates += [os.path.realpath(base), "/usr/bin/python3", "/usr/local/bin/python3"]
    found = shutil.which("python3", path=SAFE_PATH)
    if found:
        candidates.append(found)
    seen, rejected = set(), []
    for candidate in candidates:
        if not candidate or candidate in seen or not os.path.exists(candidate):
            continue
        seen.add(candidate)
        reason = _runnable_by(candidate, uid)
        if reason is None:
            if rejected:
                why = "; ".join(rejected) + f"; using {candidate}"
            else:
                why = f"{candidate} runs as the children's uid" if uid is not None else \
                    f"{candidate} (children run as the worker's user)"
            return candidate, why
        rejected.append(f"{candidate} is not runnable by uid {uid} ({reason})")
        if requested and candidate == requested:
            raise RuntimeError(f"--python {requested} cannot be run by the children's uid "
                               f"{uid}: {reason}")
    raise RuntimeError("no Python interpreter is runnable by the children's uid: "
                       + "; ".join(rejected) + ". Install python3 system-wide or pass --python")

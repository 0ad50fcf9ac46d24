"""The uid each container's processes run as: allocated once per container from one host-wide
registry, kept for the life of the container and never given to another one — not after a
delete, and not to another dockyard on the same host (every worker on the host allocates
under the same lock, from the same counter)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import threading
from pathlib import Path

DEFAULT_UID_BASE = 200_000
UID_LIMIT = 2**31 - 2
REGISTRY = Path("/var/lib/dockyard/uids.json")


class UidRegistry:
    def __init__(self, path: Path = REGISTRY, base: int = DEFAULT_UID_BASE):
        self.path = Path(path)
        self.base = base
        self._cache: dict[str, int] = {}
        self._lock = threading.Lock()

    def uid_for(self, key: str) -> int:
        """The uid of the container `key` (an id unique across every control plane and every
        container it ever made); allocated on first use."""
        with self._lock:
            uid = self._cache.get(key)
            if uid is None:
                uid = self._cache[key] = self._allocate(key)
            return uid

    def _allocate(self, key: str) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            uid = data["uids"].get(key)
            if uid is not None:
                return uid
            uid = max(self.base, data["next"])
            delegated = _delegated()   # read once, not once per uid tried
            while _taken(uid, delegated):
                uid += 1
            if uid > UID_LIMIT:
                raise RuntimeError(f"no uid left to give a container (registry {self.path})")
            data["uids"][key] = uid
            data["next"] = uid + 1
            self._write(data)
            return uid

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data.get("uids"), dict) and isinstance(data.get("next"), int):
                return data
        except FileNotFoundError:
            pass
        except ValueError:
            # Never start again from the base over a damaged registry: skip past every uid
            # it may have handed out.
            broken = self.path.with_suffix(".damaged")
            os.replace(self.path, broken)
            return {"next": _highest_uid_in(broken) + 1, "uids": {}}
        return {"next": self.base, "uids": {}}

    def _write(self, data: dict) -> None:
        partial = self.path.with_suffix(".part")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)

    def keys_with_prefix(self, prefix: str) -> dict[str, int]:
        data = self._read() if self.path.exists() else {"uids": {}}
        return {k: v for k, v in data["uids"].items() if k.startswith(prefix)}


def _taken(uid: int, delegated: list[tuple[int, int]]) -> bool:
    """A uid that belongs to a real account on this host, or to a range delegated to a user
    for their own user namespaces (`delegated`: /etc/subuid, /etc/subgid), is never handed
    out."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    return any(start <= uid < start + count for start, count in delegated)


def _delegated() -> list[tuple[int, int]]:
    ranges = []
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        ranges.append((int(parts[1]), int(parts[2])))
        except OSError:
            pass
    return ranges


def _highest_uid_in(path: Path) -> int:
    import re
    numbers = [int(n) for n in re.findall(rb"\d{4,10}", path.read_bytes())]
    return max(numbers, default=DEFAULT_UID_BASE)


def fetch_key(container_key: str, worker_dir) -> str:
    """The registry key of the uid that resolves and downloads a container's dependencies:
    dockyard's own, one per container and worker (never the container's uid, never shared
    with another container's downloads, nor with another worker's on the same host: a step
    ends by killing every process of its uid), and it runs no package's code."""
    folder = hashlib.sha256(os.fsencode(os.path.realpath(worker_dir))).hexdigest()[:12]
    return f"{container_key}.fetch.{folder}"

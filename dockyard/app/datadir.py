"""The data dir layout: the database, content-addressed artifacts and the access tokens;
and who owns what in it (a lock on the worker folder, one on `server.json`)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .store.engine import DbUrl, is_postgres, redacted

TOKEN_KINDS = ("admin", "worker", "invoke")
# The control plane's database URL (`serve --db`), for every process serve starts.
DB_ENV = "DOCKYARD_DB"
# A worker's name (`dockyard worker --name`; a label on /metrics, a column in tables).
WORKER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
WORKER_NAME_RULE = ("a worker name is 1 to 63 letters, digits, '.', '_' or '-', starting with "
                    "a letter or digit")


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike | None) -> "DataDir":
        path = path or os.environ.get("DOCKYARD_HOME") or ".dockyard"
        return cls(Path(path).absolute())

    @cached_property
    def db_target(self) -> Path | DbUrl:
        """The control plane's database: PostgreSQL when DOCKYARD_DB (`serve --db`) names
        one, else SQLite in the data dir. Looked up on every request: computed once."""
        url = os.environ.get(DB_ENV, "").strip()
        if url:
            if not is_postgres(url):
                raise ValueError(f"{DB_ENV} must be a postgresql:// URL (got "
                                 f"{redacted(url)!r}); leave it unset for SQLite in the data dir")
            return DbUrl(url, self.root / "routing.hint")
        return self.root / "dockyard.db"

    @property
    def shared_db(self) -> bool:
        """Whether the database is shared with other control planes (PostgreSQL)."""
        return isinstance(self.db_target, DbUrl)

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def worker(self) -> Path:
        return self.root / "worker"

    @property
    def server_json(self) -> Path:
        return self.root / "server.json"

    @property
    def server_lock(self) -> Path:
        return self.root / "server.lock"

    @property
    def worker_lock(self) -> Path:
        return self.worker / ".lock"

    def default_worker_name(self) -> str:
        """The host's name and a short suffix of this data dir's path: two workers on one
        host differ, and a worker started again on the same data dir keeps its name."""
        suffix = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:6]
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "worker"
        return f"{host[:56]}-{suffix}"

    def token_path(self, kind: str) -> Path:
        return self.tokens / kind

    def ensure(self, create_tokens: bool = True) -> None:
        """Create the layout and the tokens (first start; `create_tokens=False` leaves them
        to be copied in: a shared database has its own). The root is traversable but not
        listable, so sandboxed children can reach their own code below worker/ and nothing
        else; everything secret is 0700/0600."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        for private in (self.tokens, self.artifacts, self.uploads):
            private.mkdir(exist_ok=True)
            os.chmod(private, 0o700)
        for kind in TOKEN_KINDS:
            path = self.token_path(kind)
            if not path.exists() and not create_tokens:
                continue
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"dy{kind[0]}_" + secrets.token_urlsafe(32) + "\n")
            os.chmod(path, 0o600)
        if not self.shared_db and self.db_target.exists():
            os.chmod(self.db_target, 0o600)

    def read_token(self, kind: str) -> str | None:
        try:
            return self.token_path(kind).read_text().strip() or None
        except OSError:
            return None


# -- owners ----------------------------------------------------------------------------------
# One process owns a worker folder (a worker, or a serve with its local worker), and one serve
# owns `server.json`: each holds an flock on a file for its whole life, so the kernel frees it
# when the owner dies however it dies. The file names the holder's pid for the one-line refusal.
# serve hands its worker-folder lock to the local worker it starts (the same open file, through
# LOCK_FD_ENV), so the lock is held across the worker's restarts and while it drains.

LOCK_FD_ENV = "DOCKYARD_WORKER_LOCK_FD"


class InUse(Exception):
    """Another process holds the lock: `pids` are the live ones the lock file names."""

    def __init__(self, path: Path, pids: list[int]):
        self.path = path
        self.pids = pids
        holder = (f"pid {', '.join(map(str, pids))}" if pids else "another process")
        super().__init__(f"{path.parent} is in use by {holder}")

    @property
    def holder(self) -> str:
        return f"pid {self.pids[0]}" if self.pids else "another process"


def hold_lock(path: Path) -> int:
    """Take the exclusive lock on `path` (created if need be) for this process's life and
    write our pid in it; returns the descriptor (closing it releases the lock). Raises InUse
    naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InUse(path, _holders(path)) from None
    _write_pids(fd, [os.getpid()])
    return fd


def inherited_lock(path: Path) -> int | None:
    """The lock serve took on `path` and handed to this process (see LOCK_FD_ENV), or None
    when there is none (or the descriptor is not that file's). Our pid joins serve's in it."""
    text = os.environ.pop(LOCK_FD_ENV, "")
    if not text.isdigit():
        return None
    fd = int(text)
    try:
        held, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
            return None
        # The same open file as serve's: this cannot block, and proves the lock is ours.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None
    os.set_inheritable(fd, False)   # never to a function process
    _write_pids(fd, (_read_pids(path) or [])[:1] + [os.getpid()])
    return fd


def _write_pids(fd: int, pids: list[int]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, "".join(f"{pid}\n" for pid in pids).encode(), 0)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(word) for word in path.read_text().split() if word.isdigit()]
    except OSError:
        return []


def _holders(path: Path) -> list[int]:
    """The live pids a held lock file names (the holder writes them just after it locks:
    wait a moment for them)."""
    end = time.monotonic() + 1.0
    while True:
        pids = [pid for pid in _read_pids(path) if os.path.exists(f"/proc/{pid}")]
        if pids or time.monotonic() > end:
            return pids
        time.sleep(0.05)


# -- where each running `serve` is --------------------------------------------------------
# `<data>/server.json` tells a CLI that reads that data dir where its server listens. A CLI run
# without --data in the folder where `serve --data DIR` was started reads ./.dockyard instead:
# each running serve also leaves a note in a folder private to its user (no token in it, only
# where it listens, its data dir, its pid and the folder it was started in), so that CLI finds it.

def servers_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "dockyard" / "servers"


def record_server(url: str, data_root: Path, pid: int) -> Path | None:
    folder = servers_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private_folder(folder):
            return None
        path = folder / f"{pid}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "data": str(data_root), "pid": pid,
                       "pid_start": process_start(pid), "cwd": os.getcwd()}, f)
        return path
    except OSError:
        return None   # a read-only home: the CLI then needs --data or DOCKYARD_HOME


def _private_folder(folder: Path) -> bool:
    """A folder of this user's that nobody else can write to (and not a link to one)."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc): with the pid, it names
    one process, where a pid alone may since have been given to another."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
        # The command name (field 2) may hold spaces and parentheses: count after its end.
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError, TypeError):
        return None


def server_alive(record: dict, this_users: bool = False) -> bool:
    """Whether the `serve` a note (or server.json) describes still runs: its pid is alive and
    is the same process (its start time matches, when recorded); with `this_users`, it also
    runs as this user (a note only ever names this user's servers)."""
    pid = record.get("pid")
    try:
        st = os.stat(f"/proc/{int(pid)}")
    except (OSError, ValueError, TypeError):
        return False
    if this_users and st.st_uid != os.getuid():
        return False
    started = record.get("pid_start")
    return started is None or process_start(pid) == started


def running_servers(cwd: Path | None = None) -> list[dict]:
    """The notes of running servers (started in `cwd`, when given), newest first; notes of
    servers that are gone are removed."""
    found = []
    if not _private_folder(servers_dir()):
        return []
    try:
        paths = list(servers_dir().glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            note = json.loads(path.read_text())
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(note, dict) or not server_alive(note, this_users=True):
            path.unlink(missing_ok=True)
            continue
        if cwd is None or note.get("cwd") == str(cwd):
            found.append((mtime, note))
    return [note for _, note in sorted(found, key=lambda x: x[0], reverse=True)]

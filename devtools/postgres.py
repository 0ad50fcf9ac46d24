"""A throwaway PostgreSQL server, for the tests (tests/postgres.py wraps it in fixtures) and
for the benchmarks (bench/__main__.py measures the warm path on it).

`PostgresServer().start()` runs `initdb` into a fresh `dockyard-pg-*` folder of the system temp
dir and starts the server listening on 127.0.0.1 on a free port and on a Unix socket in that
folder, durability off for speed (fsync, synchronous_commit and full_page_writes off: nothing
in it is meant to outlive it). PostgreSQL refuses to run as root, so when run as root the
server runs as the `postgres` system user (the folder is chowned to it). `stop()` stops it,
kills whatever of it is left and removes the folder; it is idempotent, runs if `start()`
fails or is interrupted, and is registered with atexit as a last resort. `sweep_stale()`
(run by every start) removes the folders of earlier owners that died without stopping theirs.

This is development tooling, not part of the product: the `dockyard` package never imports it.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
FOLDER_PREFIX = "dockyard-pg-"
SERVER_USER = "postgres"          # the account the server runs as when we run as root
SUPERUSER = "postgres"            # the cluster's superuser (initdb -U), trust auth
MAX_CONNECTIONS = 300             # several control planes, each with its gunicorn processes
INSTALL_HINT = "apt-get install postgresql (Debian/Ubuntu)"


# -- finding PostgreSQL ----------------------------------------------------------------------

def _has_server_programs(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) and (folder / name).is_file()
               for name in SERVER_PROGRAMS)


def _version_key(path: str) -> tuple:
    name = Path(path).parent.name                     # /usr/lib/postgresql/<name>/bin
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/*/bin, else PATH. None when there is none."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                  timeout=10)
            if done.returncode == 0 and done.stdout.strip():
                candidates.append(Path(done.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        candidates.append(Path(folder))
    for name in SERVER_PROGRAMS:
        found = shutil.which(name)
        if found:
            candidates += [Path(found).parent, Path(found).resolve().parent]
    for folder in candidates:
        if _has_server_programs(folder):
            return folder
    return None


def server_account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: None means "as ourselves" (not root). Raises
    LookupError when running as root and there is no `postgres` user."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(SERVER_USER)                 # KeyError is a LookupError
    return entry.pw_uid, entry.pw_gid


def unavailable_reason(find=None, account=None) -> str:
    """Why a server cannot be started here, in one line ending with what to install; "" when
    it can. `find` and `account` stand for find_bindir and server_account (the tests' own
    names for them, which they replace to play a machine without PostgreSQL)."""
    find, account = find or find_bindir, account or server_account
    if find() is None:
        return (f"PostgreSQL server programs ({', '.join(SERVER_PROGRAMS)}) not found "
                f"(pg_config --bindir, /usr/lib/postgresql/*/bin, PATH): {INSTALL_HINT}")
    try:
        account()
    except LookupError:
        return (f"running as root and there is no `{SERVER_USER}` user to run PostgreSQL as: "
                f"{INSTALL_HINT} creates it")
    return ""


# -- the server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env() -> dict:
    # Nothing of the caller's libpq settings (PGDATA, PGPORT, PGHOST, ...) may steer our cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _process_alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.Error, ValueError):
        return False


class PostgresServer:
    """A throwaway PostgreSQL cluster in its own temp folder. `start()` then `stop()`;
    `stop()` is idempotent and also registered with atexit."""

    def __init__(self, bindir: Path | None = None):
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise RuntimeError(f"PostgreSQL not found: {INSTALL_HINT}")
        self.account = server_account()
        self.folder: Path | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.postmaster_pid: int | None = None
        self.version = ""
        self.major = 0
        self.startup_seconds = 0.0
        self._stopped = False

    # paths
    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder

    @property
    def log_path(self) -> Path:
        return self.folder / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, TypeError):
            return ""

    def _run(self, *args: str, timeout: float = 120, check: bool = True):
        kwargs = {}
        if self.account:
            uid, gid = self.account
            kwargs = dict(user=uid, group=gid, extra_groups=[])
        done = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True,
                              text=True, cwd=self.folder, env=_clean_env(), timeout=timeout,
                              stdin=subprocess.DEVNULL, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               f"\n{self.log_tail()}")
        return done

    # life cycle
    def start(self, timeout: float = 60) -> "PostgresServer":
        began = time.monotonic()
        sweep_stale()
        self.folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        me = psutil.Process()
        (self.folder / "owner").write_text(f"{me.pid} {me.create_time()}\n")
        atexit.register(self.stop)
        try:
            if self.account:
                os.chown(self.folder, *self.account)
            self.version = self._run("postgres", "--version").stdout.strip()
            self.major = int(re.search(r"\)\s*(\d+)", self.version).group(1))
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                      "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("\ninclude 'throwaway.conf'\n")
            for attempt in range(5):
                self.port = free_port()
                self._write_settings()
                log_before = len(self.log_tail(10**9))
                done = self._run("pg_ctl", "start", "-w", "-t", str(int(timeout)),
                                 "-D", str(self.data), "-l", str(self.log_path), check=False,
                                 timeout=timeout + 30)
                if done.returncode == 0:
                    break
                # Someone took the port between our probe and the server's bind: pick another.
                if "Address already in use" not in self.log_tail(10**9)[log_before:] or attempt == 4:
                    raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}{done.stderr}\n"
                                       f"{self.log_tail()}")
            self.postmaster_pid = int((self.data / "postmaster.pid").read_text().split()[0])
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(MAX_CONNECTIONS),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        path = self.data / "throwaway.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        if self.account:
            os.chown(path, *self.account)

    def _wait_ready(self, deadline: float) -> None:
        pg_isready = self.bindir / "pg_isready"
        while True:
            if pg_isready.exists():
                ready = subprocess.run(
                    [str(pg_isready), "-q", "-h", self.host, "-p", str(self.port), "-U", SUPERUSER,
                     "-d", "postgres", "-t", "2"], env=_clean_env(), stdin=subprocess.DEVNULL,
                    capture_output=True).returncode == 0
            else:
                ready = self._connects()
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} never became ready:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def _connects(self) -> bool:
        import psycopg
        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    def processes(self) -> list[psutil.Process]:
        """The server's processes still alive: the postmaster, its children, and anything whose
        command line names our folder (what `pgrep -f <folder>` finds)."""
        found: dict[int, psutil.Process] = {}
        if self.postmaster_pid:
            try:
                master = psutil.Process(self.postmaster_pid)
                if str(self.folder) in " ".join(master.cmdline()):
                    found[master.pid] = master
                    for child in master.children(recursive=True):
                        found[child.pid] = child
            except psutil.Error:
                pass
        if self.folder:
            for proc in _processes_naming(self.folder):
                found[proc.pid] = proc
        return [p for p in found.values() if _running(p)]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        if self.folder is None:
            return
        procs = self.processes()
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w",
                          "-t", "30", check=False, timeout=60)
            except (OSError, subprocess.SubprocessError):
                pass
        _kill_all([p for p in procs + self.processes() if _running(p)])
        shutil.rmtree(self.folder, ignore_errors=True)

    # databases
    def admin(self):
        import psycopg
        return psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t_{secrets.token_hex(6)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"not a plain database name: {name!r}")
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def databases(self) -> set[str]:
        with self.admin() as conn:
            return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _processes_naming(folder: Path) -> list[psutil.Process]:
    marker = str(folder)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _kill_all(procs: list[psutil.Process], timeout: float = 10) -> None:
    """SIGKILL and wait until none runs. A killed postmaster is not our child (pg_ctl started
    it), so it may linger as a zombie until init reaps it: that counts as gone."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def sweep_stale(tempdir: str | None = None) -> list[Path]:
    """Remove the clusters of earlier owners that died without cleaning up (a SIGKILLed
    pytest or bench): a folder whose owner process is gone. Live owners' folders are left
    alone."""
    removed = []
    for path in glob.glob(os.path.join(tempdir or tempfile.gettempdir(), FOLDER_PREFIX + "*")):
        folder = Path(path)
        try:
            pid, started = (folder / "owner").read_text().split()
            if _process_alive(int(pid), float(started)):
                continue
        except (OSError, ValueError):
            continue                  # not ours, or being created right now
        bindir = find_bindir()
        if bindir and (folder / "data" / "postmaster.pid").exists():
            kwargs = {}
            account = server_account() if os.geteuid() == 0 else None
            if account:
                kwargs = dict(user=account[0], group=account[1], extra_groups=[])
            try:
                subprocess.run([str(bindir / "pg_ctl"), "stop", "-D", str(folder / "data"),
                                "-m", "immediate", "-w", "-t", "30"], capture_output=True,
                               cwd=folder, env=_clean_env(), timeout=60,
                               stdin=subprocess.DEVNULL, **kwargs)
            except (OSError, subprocess.SubprocessError):
                pass
        _kill_all([p for p in _processes_naming(folder) if _running(p)])
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed

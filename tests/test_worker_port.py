"""The worker's invoke port before authentication: a small hello, a handshake deadline and a
share per peer of the places for connections that have not presented the token (none of them
holds a thread), all against a real InvokeServer in its own process; the Unix-socket endpoint;
worker tokens kept off command lines. Fairness between peers: test_admission.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from dockyard.app.invoke.worker_client import WorkerConnections, WorkerGone
from dockyard.runner.server import (HANDSHAKE_TIMEOUT_S, HELLO_MAX_BYTES,
                                    MAX_UNAUTHENTICATED_PER_PEER)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "dyw_test-token-for-the-invoke-port"
# Hang detection only: every wait below ends long before this when the code is right.
HANG_S = 30

# A real InvokeServer in its own process, echoing every frame; the token comes from the
# environment, the address and limits from argv. SIGTERM shuts it down the way the agent does.
SERVER_SCRIPT = r"""
import json, logging, os, signal, sys, threading
from dockyard.runner.server import InvokeServer
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s")
address = sys.argv[1]
if not address.startswith("unix:"):
    host, _, port = address.rpartition(":")
    address = (host, int(port))
server = InvokeServer(address, os.environ["DOCKYARD_TOKEN"],
                      lambda frame: {"type": "echo", "frame": frame}, **json.loads(sys.argv[2]))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
print(server.address, flush=True)
stop.wait()
server.shutdown()
server.close_connections()
server.server_close()
"""


class ServerProcess:
    def __init__(self, tmp_path: Path, address: str, **limits):
        self.log_path = tmp_path / f"invoke-server-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, DOCKYARD_TOKEN=TOKEN)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, address,
                                      json.dumps(limits)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=ROOT, env=env)
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            self.stop()
            raise RuntimeError("the invoke server did not start:\n" + self.log_path.read_text())
        self.ps = psutil.Process(self.proc.pid)
        # The main thread and the accept loop: no connection holds a thread.
        self.idle_threads = self.threads()

    @property
    def tcp(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)

    def threads(self) -> int:
        return self.ps.num_threads()

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def warnings(self, text: str) -> list[str]:
        return [line for line in self.lines() if line.startswith("WARNING") and text in line]

    def wait_lines(self, text: str, count: int) -> list[str]:
        end = time.monotonic() + HANG_S
        while len(self.warnings(text)) < count and time.monotonic() < end:
            time.sleep(0.05)
        return self.warnings(text)

    def wait_threads(self, at_most: int) -> int:
        end = time.monotonic() + HANG_S
        while self.threads() > at_most and time.monotonic() < end:
            time.sleep(0.05)
        return self.threads()

    def settle(self) -> int:
        """Wait until no connection holds a thread (each one's slot is free by then)."""
        return self.wait_threads(at_most=self.idle_threads)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=HANG_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    started: list[ServerProcess] = []

    def start(address: str = "127.0.0.1:0", **limits) -> ServerProcess:
        server = ServerProcess(tmp_path, address, **limits)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


def _frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def _raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _read_frame(sock: socket.socket):
    """The next frame, or None at end of stream (or a reset)."""
    data = b""
    try:
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    return json.loads(data[4:])


def _closed(sock: socket.socket) -> bool:
    """True once the server closed the connection, after at most one error frame."""
    frame = _read_frame(sock)
    if frame is not None:
        assert frame["type"] == "error", frame
        frame = _read_frame(sock)
    return frame is None


def _echo(server: ServerProcess, token: str = TOKEN) -> dict:
    connections = WorkerConnections(token)
    try:
        return connections.request(server.address, {"type": "ping", "n": 1}, timeout=HANG_S)
    finally:
        connections.close()


def _warm(server: ServerProcess) -> None:
    """One authenticated call and one refused hello, so later figures measure connections,
    not the first use of each code path."""
    assert _echo(server)["frame"] == {"type": "ping", "n": 1}
    with socket.create_connection(server.tcp, timeout=HANG_S) as sock:
        sock.sendall(_frame({"type": "hello", "token": "warm-up"}))
        assert _closed(sock)
    server.wait_lines("wrong worker token", 1)
    server.settle()


# -- limits before the token --------------------------------------------------------------

def test_oversized_hellos_are_dropped_and_memory_and_threads_stay_flat(start_server):
    server = start_server()
    _warm(server)
    threads_before = server.settle()
    rss_before = server.rss()

    def oversized(_):
        with socket.create_connection(server.tcp, timeout=HANG_S) as sock:
            try:
                # A header announcing 64 MB and the first 256 KB of it.
                sock.sendall(struct.pack(">I", 64 * 1024 * 1024) + b"x" * (256 * 1024))
            except (BrokenPipeError, ConnectionResetError):
                return True
            return _closed(sock)

    # Ten at a time (under the cap, so each one meets the size check, not the cap).
    with ThreadPoolExecutor(10) as pool:
        assert all(pool.map(oversized, range(50)))
    lines = server.wait_lines(f"over the {HELLO_MAX_BYTES} byte limit", 50)
    threads_after = server.wait_threads(at_most=threads_before)
    rss_after = server.rss()
    print(f"\noversized hellos: RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MB, "
          f"threads {threads_before} -> {threads_after}")
    assert len(lines) == 50
    assert all("refused a connection from 127.0.0.1:" in line for line in lines)
    assert "Traceback" not in server.log_path.read_text()
    assert threads_after <= threads_before
    # 50 x 64 MB announced; what the process may have grown by is allocator noise.
    assert rss_after - rss_before < 8 * 2**20
    assert _echo(server)["type"] == "echo"


def test_silent_connections_are_closed_after_the_handshake_timeout(start_server):
    server = start_server()
    _warm(server)
    threads_before = server.settle()
    rss_before = server.rss()
    peak = [0]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            peak[0] = max(peak[0], server.threads())
            time.sleep(0.01)
    sampler = threading.Thread(target=sample)
    sampler.start()
    socks = [socket.create_connection(server.tcp, timeout=HANDSHAKE_TIMEOUT_S + HANG_S)
             for _ in range(50)]
    try:
        told = []
        for n, sock in enumerate(socks):
            frame = _read_frame(sock)
            if frame is not None:
                # Waited at the gate: told why when the deadline passed, then closed.
                assert frame["error"]["message"] == "no hello in time"
                assert _read_frame(sock) is None
                told.append(n)
    finally:
        for sock in socks:
            sock.close()
        sampling.set()
        sampler.join()
    threads_held = peak[0]
    # One peer: its newest share waited for the deadline, each older one was closed (without
    # a word) to make way for a newer one. None of them ever held a thread.
    assert told == list(range(50 - MAX_UNAUTHENTICATED_PER_PEER, 50))
    assert threads_held <= threads_before
    timeouts = server.wait_lines(f"no whole hello within {HANDSHAKE_TIMEOUT_S:g}s",
                                 MAX_UNAUTHENTICATED_PER_PEER)
    assert len(timeouts) == MAX_UNAUTHENTICATED_PER_PEER
    threads_after = server.wait_threads(at_most=threads_before)
    rss_after = server.rss()
    print(f"\nsilent connections: RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MB, "
          f"threads {threads_before} -> {threads_held} (held) -> {threads_after}")
    assert threads_after <= threads_before
    assert rss_after - rss_before < 8 * 2**20
    # The 34 closed to make way are one rate-limited line, not 34.
    assert len(server.warnings("to make way for a new one")) == 1
    assert "Traceback" not in server.log_path.read_text()


def test_a_hello_trickled_byte_by_byte_meets_the_deadline_for_the_whole_frame(start_server):
    server = start_server()
    hello = _frame({"type": "hello", "token": TOKEN, "padding": "p" * 200})
    with socket.create_connection(server.tcp, timeout=HANG_S) as sock:
        # One byte every half second: each read is quick, the whole frame would take
        # minutes. Only a deadline for the whole frame ends it.
        sent = 0
        try:
            for byte in hello:
                sock.sendall(bytes([byte]))
                sent += 1
                if server.warnings("no whole hello within"):
                    break
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < len(hello)
        assert _closed(sock)
    assert len(server.wait_lines("no whole hello within", 1)) == 1


def test_past_its_share_a_peer_loses_its_oldest_waiting_connection_and_calls_go_on(
        start_server):
    server = start_server()
    _warm(server)
    threads_before = server.settle()
    authenticated = WorkerConnections(TOKEN)
    idle: list[socket.socket] = []
    try:
        assert authenticated.request(server.address, {"n": 1}, timeout=HANG_S)["type"] == "echo"
        idle = [socket.create_connection(server.tcp, timeout=HANG_S)
                for _ in range(MAX_UNAUTHENTICATED_PER_PEER)]
        # Its share is full: each new bare connection closes this peer's oldest waiting one.
        extra = [socket.create_connection(server.tcp, timeout=HANG_S) for _ in range(5)]
        for sock in idle[:5]:
            assert _read_frame(sock) is None
        idle = idle[5:] + extra
        # A connection that authenticated before keeps serving calls, and a new one from the
        # same peer (its hello comes at once) still gets in.
        for n in range(20):
            reply = authenticated.request(server.address, {"n": n}, timeout=HANG_S)
            assert reply == {"type": "echo", "frame": {"n": n}}
            assert _echo(server)["type"] == "echo"
        assert len(server.wait_lines("to make way for a new one", 1)) == 1
    finally:
        for sock in idle:
            sock.close()
        authenticated.close()
    server.wait_threads(at_most=threads_before)
    assert _echo(server)["type"] == "echo"
    assert "Traceback" not in server.log_path.read_text()


def test_a_wrong_token_gets_an_error_frame_and_one_log_line(start_server):
    server = start_server()
    with socket.create_connection(server.tcp, timeout=HANG_S) as sock:
        port = sock.getsockname()[1]
        sock.sendall(_frame({"type": "hello", "token": "not-the-token"}))
        reply = _read_frame(sock)
        assert reply == {"type": "error", "error": {"type": "Unauthorized",
                                                    "message": "wrong worker token"}}
        assert _read_frame(sock) is None
    lines = server.wait_lines("wrong worker token", 1)
    assert lines == [f"WARNING dockyard.server: refused a connection from 127.0.0.1:{port}: "
                     "wrong worker token"]
    with pytest.raises(WorkerGone, match="wrong worker token"):
        _echo(server, token="not-the-token")


@pytest.mark.parametrize("hello", [
    b"\x00\x00\x00\x05hello",                                # not JSON
    b"\x00\x00\x00\x02\xff\xfe",                             # not UTF-8
    _frame(["hello", TOKEN]),                                # not an object
    _frame({"type": "hello", "token": 12345}),               # not a string
    _frame({"type": "hello"}),                               # no token
    _raw(b'{"type":"hello","token":"\\ud800"}'),              # a lone surrogate
    _raw(b"[" * 2000 + b"]" * 2000),                         # nesting deeper than json takes
    b"\x00\x00",                                             # a header cut short
], ids=["not-json", "not-utf8", "list", "int-token", "no-token", "surrogate", "deep",
        "short-header"])
def test_a_bad_hello_is_one_warning_line_and_never_a_traceback(start_server, hello):
    server = start_server()
    with socket.create_connection(server.tcp, timeout=HANG_S) as sock:
        sock.sendall(hello)
        sock.shutdown(socket.SHUT_WR)
        assert _closed(sock)
    lines = server.wait_lines("refused a connection from 127.0.0.1:", 1)
    assert len(lines) == 1
    assert len(server.lines()) == 1, server.lines()
    assert _echo(server)["type"] == "echo"


# -- the Unix socket ----------------------------------------------------------------------

def test_a_unix_socket_server_works_end_to_end_and_its_file_is_private(start_server, tmp_path):
    path = tmp_path / "invoke.sock"
    # A socket file left by a worker that was killed: nobody listens on it.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    server = start_server(f"unix:{path}")
    assert server.address == f"unix:{path}"
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    connections = WorkerConnections(TOKEN)
    try:
        for n in range(50):
            assert connections.request(server.address, {"n": n}, timeout=HANG_S) == {
                "type": "echo", "frame": {"n": n}}
        with pytest.raises(WorkerGone, match="wrong worker token"):
            _echo(server, token="not-the-token")
    finally:
        connections.close()
    lines = server.wait_lines("wrong worker token", 1)
    assert len(lines) == 1 and f"pid {os.getpid()} " in lines[0]
    # A second server cannot take over a socket someone listens on.
    second = subprocess.run([sys.executable, "-c", SERVER_SCRIPT, f"unix:{path}", "{}"],
                            env=dict(os.environ, DOCKYARD_TOKEN=TOKEN), cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG_S)
    assert second.returncode != 0 and "another process listens on" in second.stderr
    assert _echo(server)["type"] == "echo"
    assert server.stop() == 0
    assert not path.exists()


def test_a_unix_socket_file_appears_only_once_it_listens(tmp_path):
    """Whoever finds the socket file can connect (a worker's readiness is the file, for serve
    and for anyone waiting on it): bound under a name of its own, renamed once it listens; a
    server that never listened leaves nothing behind."""
    from dockyard.runner.server import InvokeServer
    path = tmp_path / "invoke.sock"
    seen: list[bool] = []

    class Watched(InvokeServer):
        def server_activate(self):
            seen.append(path.exists())
            super().server_activate()
            seen.append(path.exists())

    server = Watched(f"unix:{path}", TOKEN, lambda frame: None)
    try:
        assert seen == [False, True]
        assert [p.name for p in tmp_path.iterdir()] == ["invoke.sock"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))        # queued: it listens before anyone serves
    finally:
        server.server_close()
    assert list(tmp_path.iterdir()) == []

    class NeverListens(InvokeServer):
        def server_activate(self):
            raise OSError(98, "no listening today")

    with pytest.raises(OSError, match="no listening today"):
        NeverListens(f"unix:{path}", TOKEN, lambda frame: None)
    assert list(tmp_path.iterdir()) == []

    class Overtaken(InvokeServer):
        def server_activate(self):
            # Another worker's socket lands on the path between the check and the move.
            with socket.socket(socket.AF_UNIX) as other:
                other.bind(str(path))
                inode = path.stat().st_ino
                with pytest.raises(OSError, match="another process listens on"):
                    super().server_activate()
                assert path.stat().st_ino == inode      # left as it was
            raise OSError(98, "overtaken")

    with pytest.raises(OSError, match="overtaken"):
        Overtaken(f"unix:{path}", TOKEN, lambda frame: None)
    assert [p.name for p in tmp_path.iterdir()] == ["invoke.sock"]   # the other's, only


def test_a_unix_socket_server_does_not_remove_a_file_that_is_not_a_socket(tmp_path):
    path = tmp_path / "invoke.sock"
    path.write_text("not a socket")
    done = subprocess.run([sys.executable, "-c", SERVER_SCRIPT, f"unix:{path}", "{}"],
                          env=dict(os.environ, DOCKYARD_TOKEN=TOKEN), cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode != 0 and "is not a socket" in done.stderr
    assert path.read_text() == "not a socket"


# -- tokens off the command line ----------------------------------------------------------

def _cmdlines(procs: list[psutil.Process]) -> dict[int, bytes]:
    found = {}
    for proc in procs:
        try:
            found[proc.pid] = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        except OSError:
            pass
    return found


def _env_without_tokens() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("DOCKYARD_TOKEN", "DOCKYARD_URL")}


class WorkerProcess:
    """A real `dockyard worker` whose control plane is not there: it keeps trying to register,
    and its invoke endpoint serves meanwhile."""

    def __init__(self, data: Path, args: list[str], env: dict):
        self.socket = data / "worker" / "invoke.sock"
        self.stderr_path = data.parent / f"{data.name}-worker.log"
        self.stderr = open(self.stderr_path, "w")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            nobody = probe.getsockname()[1]
        cmd = [sys.executable, "-m", "dockyard", "--data", str(data), "worker",
               "--server", f"http://127.0.0.1:{nobody}", "--listen", f"unix:{self.socket}",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     cwd=ROOT, env=env)
        end = time.monotonic() + 90
        while not self.socket.exists() and self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        if not self.socket.exists():
            self.stop()
            raise RuntimeError("the worker did not start:\n" + self.stderr_path.read_text())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=HANG_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture
def worker_data(tmp_path):
    return tmp_path / "data"


def test_worker_reads_its_token_from_a_file(worker_data):
    worker_data.mkdir()
    token_file = worker_data / "worker-token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    worker = WorkerProcess(worker_data, ["--token-file", str(token_file)],
                           _env_without_tokens())
    try:
        address = f"unix:{worker.socket}"
        assert stat.S_IMODE(worker.socket.stat().st_mode) == 0o600
        connections = WorkerConnections(TOKEN)
        try:
            assert connections.request(address, {"type": "poke"}, timeout=HANG_S) == {
                "type": "ok"}
        finally:
            connections.close()
        with pytest.raises(WorkerGone, match="wrong worker token"):
            WorkerConnections("not-the-token").request(address, {"type": "poke"}, HANG_S)
        procs = [psutil.Process(worker.proc.pid)] + psutil.Process(
            worker.proc.pid).children(recursive=True)
        for pid, cmdline in _cmdlines(procs).items():
            assert TOKEN.encode() not in cmdline, pid
    finally:
        assert worker.stop() == 0
    assert "Warning" not in worker.stderr_path.read_text()
    assert not worker.socket.exists()


def test_worker_token_on_the_command_line_works_with_one_warning(worker_data):
    worker_data.mkdir()
    worker = WorkerProcess(worker_data, ["--token", TOKEN], _env_without_tokens())
    try:
        assert _echo_poke(f"unix:{worker.socket}") == {"type": "ok"}
    finally:
        assert worker.stop() == 0
    warnings = [line for line in worker.stderr_path.read_text().splitlines()
                if line.startswith("Warning")]
    assert len(warnings) == 1
    assert "process list" in warnings[0] and "--token-file" in warnings[0]


def _echo_poke(address: str) -> dict:
    connections = WorkerConnections(TOKEN)
    try:
        return connections.request(address, {"type": "poke"}, timeout=HANG_S)
    finally:
        connections.close()


def test_worker_token_from_the_environment_gives_no_warning_and_none_is_an_error(worker_data):
    worker_data.mkdir()
    env = dict(_env_without_tokens(), DOCKYARD_TOKEN=TOKEN)
    worker = WorkerProcess(worker_data, [], env)
    try:
        assert _echo_poke(f"unix:{worker.socket}") == {"type": "ok"}
    finally:
        assert worker.stop() == 0
    assert "Warning" not in worker.stderr_path.read_text()
    missing = subprocess.run([sys.executable, "-m", "dockyard", "worker", "--server",
                              "http://127.0.0.1:9"], env=_env_without_tokens(), cwd=ROOT,
                             capture_output=True, text=True, timeout=HANG_S)
    assert missing.returncode == 2 and "--token-file" in missing.stderr
    both = subprocess.run([sys.executable, "-m", "dockyard", "worker", "--server",
                           "http://127.0.0.1:9", "--token", "a", "--token-file", "/dev/null"],
                          env=_env_without_tokens(), cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_S)
    assert both.returncode == 2 and "once" in both.stderr
    no_path = subprocess.run([sys.executable, "-m", "dockyard", "worker", "--server",
                              "http://127.0.0.1:9", "--listen", "unix:"],
                             env=dict(_env_without_tokens(), DOCKYARD_TOKEN=TOKEN), cwd=ROOT,
                             capture_output=True, text=True, timeout=HANG_S)
    assert no_path.returncode == 2 and "wants a path" in no_path.stderr


def test_the_global_token_option_warns_only_when_given_as_an_argument(tmp_path):
    def run(args, env):
        return subprocess.run([sys.executable, "-m", "dockyard", "--url", "http://127.0.0.1:9",
                               "--data", str(tmp_path), *args, "ls"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=HANG_S)

    on_line = run(["--token", "dya_x"], _env_without_tokens())
    warnings = [line for line in on_line.stderr.splitlines() if line.startswith("Warning")]
    assert len(warnings) == 1 and "process list" in warnings[0]
    from_env = run([], dict(_env_without_tokens(), DOCKYARD_TOKEN="dya_x"))
    assert "Warning" not in from_env.stderr


def test_serve_keeps_the_tokens_off_every_command_line_and_its_worker_off_tcp(server):
    root = psutil.Process(server.proc.pid)
    procs = [root] + root.children(recursive=True)
    cmdlines = _cmdlines(procs)
    assert len(cmdlines) >= 3  # serve, gunicorn, the worker at least
    for token in (server.worker_token, server.admin):
        for pid, cmdline in cmdlines.items():
            assert token.encode() not in cmdline, (pid, cmdline)
    workers = server.api("GET", "/api/workers").json()["workers"]
    local = [w for w in workers if w["state"] == "up" and w["pid"] in cmdlines]
    assert local, workers
    address = local[0]["address"]
    assert address == f"unix:{server.data / 'worker' / 'invoke.sock'}"
    mode = (server.data / "worker" / "invoke.sock").stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    worker = psutil.Process(local[0]["pid"])
    assert not [c for c in worker.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


def test_serve_falls_back_to_loopback_when_the_socket_path_is_too_long(tmp_path, caplog):
    from dockyard.app.datadir import DataDir
    from dockyard.app.processes.worker import LocalWorkerProcess

    def listen_for(data: Path) -> str:
        return LocalWorkerProcess(DataDir.at(data), "http://127.0.0.1:1", [], {}).listen

    short = tmp_path / "d"
    assert listen_for(short) == f"unix:{short / 'worker' / 'invoke.sock'}"
    with caplog.at_level(logging.WARNING, logger="dockyard.serve"):
        assert listen_for(tmp_path / ("x" * 100)) == "127.0.0.1:0"
    assert [r for r in caplog.records if "longer than the 107 bytes" in r.getMessage()]


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_pooled_connections_survive_a_worker_restart_without_a_lost_call(start_server,
                                                                         tmp_path, kind):
    """A worker that restarts closes every pooled connection. The next call on each must go
    to the new worker on a fresh connection, not fail and not mark the worker lost: over a
    Unix socket the send fails at once (EPIPE) and is dialled again; over TCP a closed
    connection is seen before sending."""
    if kind == "unix":
        address = f"unix:{tmp_path / 'invoke.sock'}"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
    first = start_server(address)
    connections = WorkerConnections(TOKEN)
    try:
        # Several pooled connections, as concurrent web threads leave behind.
        with ThreadPoolExecutor(4) as pool:
            assert all(r["type"] == "echo" for r in pool.map(
                lambda n: connections.request(first.address, {"n": n}, timeout=HANG_S),
                range(16)))
        assert len(connections._idle[first.address]) > 1
        assert first.stop() == 0
        second = start_server(address)
        assert second.address == first.address
        for n in range(8):
            assert connections.request(second.address, {"n": n}, timeout=HANG_S) == {
                "type": "echo", "frame": {"n": n}}
    finally:
        connections.close()

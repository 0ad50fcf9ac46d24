"""Workers admit callers fairly: before the token, each peer (a uid on this host, else an
address) has its own share of the places at the worker's invoke port, so a peer holding bare
connections crowds out only itself; and a connection the worker closes at accept never marks
the worker lost. Against a real InvokeServer (peers of other uids and addresses), and end to
end against a `dockyard serve` whose worker listens on TCP, with a real function and the
test itself holding bare connections to the worker's port while another container is
called."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import Server
from dockyard.app.invoke.worker_client import NotAdmitted, WorkerConnections, WorkerGone
from dockyard.runner.server import MAX_UNAUTHENTICATED_PER_PEER
from test_worker_port import HANG_S, TOKEN, ServerProcess, _read_frame

NOBODY = 65534


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


class Holder:
    """A process that keeps `count` bare connections (never a byte sent) open to `address`,
    opening a new one whenever the other end closes one, until stopped: what a function with
    the network can do to a worker's port. Forked from the test, as another uid if given
    (a uid of its own is a peer of its own to the worker)."""

    def __init__(self, address: str, count: int, uid: int | None = None):
        self.count = count
        report_read, report_write = os.pipe()
        stop_read, self.stop_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:   # pragma: no cover - the child
            code = 1
            try:
                os.close(report_read)
                os.close(self.stop_write)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                self._hold(_target(address), count, stop_read, report_write)
                code = 0
            finally:
                os._exit(code)
        os.close(report_write)
        os.close(stop_read)
        self.reports = os.fdopen(report_read)
        line = self._line()
        if line != "held":
            self.stop()
            raise RuntimeError(f"the holder did not get its connections: {line!r}")

    @staticmethod
    def _hold(target, count: int, stop_fd: int, report_fd: int) -> None:
        held: list[socket.socket] = []
        opened = closed = 0
        told = False
        stopper = select.poll()
        stopper.register(stop_fd, select.POLLIN)
        while not stopper.poll(10):
            while len(held) < count:
                sock = socket.socket(target[0])
                sock.settimeout(5)
                sock.connect(target[1])
                sock.setblocking(False)
                held.append(sock)
                opened += 1
            if not told:
                os.write(report_fd, b"held\n")
                told = True
            still = []
            for sock in held:
                try:
                    sock.recv(4096)     # the end, or a last word before it
                    gone = True
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    sock.close()
                    closed += 1
                else:
                    still.append(sock)
            held = still
        os.write(report_fd, (json.dumps({"opened": opened, "closed": closed}) + "\n").encode())

    def _line(self) -> str:
        ready = select.select([self.reports], [], [], HANG_S)[0]
        return self.reports.readline().strip() if ready else ""

    def stop(self) -> dict:
        """Stop it; what it opened and what the other end closed."""
        try:
            os.close(self.stop_write)
        except OSError:
            pass
        line = self._line()
        os.waitpid(self.pid, 0)
        self.reports.close()
        return json.loads(line) if line.startswith("{") else {}


def _target(address: str):
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:"):]
    host, _, port = address.rpartition(":")
    return socket.AF_INET, (host, int(port))


def _calls(address: str, n: int) -> list[float]:
    """n calls, each on a fresh connection (a new dial, as a web thread without a pooled
    connection makes); how long each took."""
    took = []
    for i in range(n):
        connections = WorkerConnections(TOKEN)
        start = time.monotonic()
        try:
            reply = connections.request(address, {"type": "ping", "n": i}, timeout=HANG_S)
        finally:
            connections.close()
        took.append(time.monotonic() - start)
        assert reply == {"type": "echo", "frame": {"type": "ping", "n": i}}
    return took


def _open(socks: list[socket.socket]) -> int:
    """How many of these the other end has not closed."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            count += sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


# -- against a real InvokeServer ------------------------------------------------------------

def test_a_peer_of_another_uid_holding_bare_connections_keeps_nobody_else_out(start_server):
    server = start_server()
    holder = Holder(server.address, count=40, uid=NOBODY)
    try:
        # Each got in: a connection the gate closed would fail its call (NotAdmitted; the
        # client does not dial again), and a gate that made it wait would end at HANG_S.
        _calls(server.address, 100)
        lines = server.wait_lines("to make way for a new one", 1)
    finally:
        held = holder.stop()
    # The holder was held to its share: each connection past it closed one of its own.
    assert held["closed"] >= 40 - MAX_UNAUTHENTICATED_PER_PEER
    assert f"(uid {NOBODY})" in lines[0] and "(its share)" in lines[0]
    assert "Traceback" not in server.log_path.read_text()


def test_many_peers_filling_the_gate_cannot_crowd_out_a_new_one(start_server):
    """Six peers (loopback addresses) of eight bare connections each against 32 places: the
    peer with the most loses its oldest, so the places stay at 32, and a peer that holds none
    still gets in at once."""
    server = start_server(max_unauthenticated=32, max_unauthenticated_per_peer=8)
    host, port = server.tcp
    socks: list[socket.socket] = []
    try:
        for peer in range(2, 8):
            for _ in range(8):
                sock = socket.socket()
                sock.bind((f"127.0.0.{peer}", 0))
                sock.connect((host, port))
                socks.append(sock)
        end = time.monotonic() + HANG_S
        while _open(socks) > 32 and time.monotonic() < end:
            time.sleep(0.02)
        assert _open(socks) == 32
        _calls(server.address, 20)     # each got in (see above)
        assert server.wait_lines("(the limit), the most of them from its peer", 1)
    finally:
        for sock in socks:
            sock.close()
    assert "Traceback" not in server.log_path.read_text()


@pytest.fixture
def open_dir():
    """A folder another uid can reach (the test's own tmp folders are private)."""
    folder = Path(tempfile.mkdtemp(prefix="dy-admission-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_on_a_unix_socket_a_peer_is_its_uid(start_server, open_dir):
    """SO_PEERCRED: connections of another uid count against that uid's share only."""
    server = start_server(f"unix:{open_dir / 'invoke.sock'}")
    # Only for this test: let another uid dial the socket (the worker makes it 0600).
    os.chmod(open_dir / "invoke.sock", 0o666)
    holder = Holder(server.address, count=40, uid=NOBODY)
    try:
        _calls(server.address, 50)     # each got in (see above)
        lines = server.wait_lines("to make way for a new one", 1)
    finally:
        held = holder.stop()
    assert held["closed"] >= 40 - MAX_UNAUTHENTICATED_PER_PEER
    assert f"(uid {NOBODY}) on unix:" in lines[0]


def test_a_connection_closed_at_accept_is_not_admitted_and_a_dead_port_is_gone(start_server):
    """The client tells a worker that closed the connection before answering the hello (it
    is there) from one nobody answers at (it is gone)."""
    server = start_server(max_unauthenticated=1, max_unauthenticated_per_peer=1)
    with socket.socket() as quiet:
        quiet.bind(("127.0.0.1", 0))
        quiet.listen()
        port = quiet.getsockname()[1]
        # Accepted by the kernel and closed before any answer, as a worker's gate would.
        connections = WorkerConnections(TOKEN)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(connections.request, f"127.0.0.1:{port}", {"n": 1}, HANG_S)
            accepted, _ = quiet.accept()
            accepted.close()
            with pytest.raises(NotAdmitted):
                pending.result(timeout=HANG_S)
    with pytest.raises(WorkerGone) as gone:
        connections.request(f"127.0.0.1:{port}", {"n": 1}, timeout=HANG_S)
    assert not isinstance(gone.value, NotAdmitted)
    with pytest.raises(NotAdmitted, match="wrong worker token"):
        WorkerConnections("not-the-token").request(server.address, {"n": 1}, HANG_S)


# -- end to end: a TCP worker under `dockyard serve` -----------------------------------------

@pytest.fixture
def tcp_server(private_tmp, wheelhouse):
    """A `dockyard serve` whose data dir path is too long for a Unix socket: its worker
    listens on 127.0.0.1 (as a remote worker listens on TCP)."""
    data = private_tmp / ("tcp-" + "w" * 100) / "data"
    data.parent.mkdir()
    server = Server(data, ["--find-links", str(wheelhouse), "--offline"])
    yield server
    code = server.stop()
    assert code == 0, server.log_path.read_text()[-3000:]
    assert not server.leftovers, server.leftovers


def test_bare_connections_to_a_tcp_worker_cost_another_container_no_call(tcp_server, pkg):
    server = tcp_server
    server.deploy(pkg("echo", name="adm-victim"))
    server.deploy(pkg("forger", name="adm-holder"))
    (worker,) = [w for w in server.api("GET", "/api/workers").json()["workers"]
                 if w["state"] == "up"]
    address = worker["address"]
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1", address

    # A function with the network holds bare connections to the worker's port (where its
    # sandbox lets it reach the port at all) ...
    held_by_function = requests.post(
        f"{server.url}/invoke/adm-holder/hold", params={"async": "1"}, timeout=30,
        json={"host": host, "port": int(port), "count": 24, "seconds": 8})
    assert held_by_function.status_code == 202, held_by_function.text
    # ... and so does a process on the host as the control plane's own uid, from its address:
    # the same peer as the control plane, the hardest case.
    holder = Holder(address, count=24)
    try:
        def call(n: int) -> int:
            return server.invoke("adm-victim/echo", {"n": n}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, range(60)))
        states = {w["id"]: w["state"] for w in server.api("GET", "/api/workers").json()[
            "workers"]}
    finally:
        held = holder.stop()
    assert codes == [200] * 60, {c: codes.count(c) for c in set(codes)}
    assert states[worker["id"]] == "up"
    assert held["closed"] > 0     # it held more than its share: its own were closed
    function = server.wait_invocation(held_by_function.json()["invocation_id"])
    print(f"\nthe function's bare connections: {function.get('output')}; "
          f"the host process's: {held}")


# -- who reads /metrics ----------------------------------------------------------------------

def test_metrics_need_the_admin_token(server, pkg):
    server.deploy(pkg("echo", name="adm-metrics"))
    assert server.invoke("adm-metrics/echo", 1).status_code == 200
    anonymous = requests.get(server.url + "/metrics", timeout=30)
    assert anonymous.status_code == 401
    error = anonymous.json()["error"]
    assert error["type"] == "Unauthorized"
    assert "/metrics needs the admin token" in error["message"]
    assert "--public-metrics" in error["message"]
    assert "adm-metrics" not in anonymous.text
    wrong = requests.get(server.url + "/metrics", timeout=30,
                         headers={"Authorization": "Bearer dya_not-a-token"})
    assert wrong.status_code == 401 and "--public-metrics" in wrong.text
    worker = requests.get(server.url + "/metrics", timeout=30,
                          headers={"Authorization": f"Bearer {server.worker_token}"})
    assert worker.status_code == 403
    admin = server.api("GET", "/metrics")
    assert admin.status_code == 200
    assert admin.headers["Content-Type"].startswith("text/plain")
    assert "dockyard_workers_ready" in admin.text


def test_serve_public_metrics_lets_anyone_read_them(private_tmp):
    data = private_tmp / "public-metrics" / "data"
    data.parent.mkdir()
    server = Server(data, ["--public-metrics", "--no-local-worker"], workers=0)
    try:
        anonymous = requests.get(server.url + "/metrics", timeout=30)
        assert anonymous.status_code == 200
        assert "dockyard_workers_ready 0.0" in anonymous.text
        # The rest of the API still wants its token.
        assert requests.get(server.url + "/api/containers", timeout=30).status_code == 401
    finally:
        code = server.stop()
    assert code == 0, server.log_path.read_text()[-3000:]
    assert not server.leftovers, server.leftovers

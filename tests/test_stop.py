"""Stopping `dockyard serve` with Ctrl-C, as a terminal sends it: SIGINT to serve's whole
process group. The first one lets the calls under way end, saying what it waits for, while
/healthz answers `stopping` and new calls get a 503; a second one stops the calls at once
(recorded cancelled, "server stopped") and serve exits with nothing left running. With no
call under way it exits at once, and a clean stop logs no worker as lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import requests

from conftest import Server, make_package, sandbox_processes
from dockyard.app.store import invocations
from dockyard.app.store.db import connect
from failover_cluster import wait_for

LONG = "[limits]\ntimeout_s = 60\n"


class Output:
    """serve's stdout after its `listening` line, read as it comes."""

    def __init__(self, srv: Server):
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(srv,), daemon=True).start()

    def _read(self, srv: Server) -> None:
        for line in srv.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, start: str, timeout: float = 30) -> str:
        return wait_for(f"a line starting {start!r} (got {self.lines})", lambda: next(
            (line for line in list(self.lines) if line.startswith(start)), None), timeout, 0.05)


def ctrl_c(srv: Server) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(srv.proc.pid, signal.SIGINT)


def started(data: Path, container: str) -> bool:
    """Whether a call to `container` (print_then_sleep) has started on the worker of data dir
    `data`: it printed, and its process's output file (in the version's run folder) holds
    the line."""
    for path in (data / "worker" / container).glob("*/run/p*.stdout"):
        try:
            if "before the sleep" in path.read_text():
                return True
        except OSError:
            pass
    return False


def records(data: Path, *ids: str) -> list[dict]:
    db = connect(data / "dockyard.db")
    try:
        return [invocations.get(db, i) for i in ids]
    finally:
        db.close()


def lost_lines(srv: Server) -> list[str]:
    return [line for line in srv.log_path.read_text().splitlines() if " is lost: " in line]


def serve(private_tmp: Path, wheelhouse: Path, name: str) -> Server:
    data = private_tmp / f"stop-{name}" / "data"
    data.parent.mkdir()
    return Server(data, ["--find-links", str(wheelhouse), "--offline"])


def test_a_second_ctrl_c_stops_the_calls_at_once(private_tmp, wheelhouse, tmp_path):
    srv = serve(private_tmp, wheelhouse, "twice")
    answers: list = []
    caller = None
    try:
        srv.deploy(make_package(tmp_path, "echo", name="stop-sync", manifest_extra=LONG))
        srv.deploy(make_package(tmp_path, "echo", name="stop-async", manifest_extra=LONG))
        out = Output(srv)
        caller = threading.Thread(target=lambda: answers.append(
            srv.invoke("stop-sync/print_then_sleep", {"s": 120})))
        caller.start()
        queued = srv.invoke("stop-async/print_then_sleep?async=1", {"s": 120})
        assert queued.status_code == 202, queued.text
        async_id = queued.json()["invocation_id"]
        wait_for("both calls under way", lambda: started(srv.data, "stop-sync")
                 and started(srv.data, "stop-async"), 60, 0.05)

        ctrl_c(srv)
        line = out.wait("stopping: waiting for ")
        assert line.startswith("stopping: waiting for 2 calls, longest "), line
        assert line.endswith(" s left; Ctrl-C again to stop them now"), line
        # Still answering: health checks say it is stopping, new calls are refused.
        health = requests.get(srv.url + "/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        refused = srv.invoke("stop-sync/echo", 1)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "Stopping"
        assert "stopping" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) > 0
        later = srv.invoke("stop-async/echo?async=1", 1)
        assert later.status_code == 503 and later.json()["error"]["type"] == "Stopping"
        assert srv.proc.poll() is None
        running = srv.descendants()

        ctrl_c(srv)
        # The calls have most of their 60 s left: serve does not wait for them.
        assert srv.proc.wait(timeout=30) == 0
        caller.join(30)
        assert out.wait("stopping: cancelling 2 calls now")
        assert out.wait("stopped") == "stopped"
        gone, alive = psutil.wait_procs(running, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        assert not sandbox_processes(srv.data)
    finally:
        srv.stop()
        if caller is not None:
            caller.join(60)
    assert not srv.leftovers, srv.leftovers
    answer = answers[0]
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == {"type": "Cancelled", "message": "server stopped"}
    sync_id = answer.headers["X-Dockyard-Invocation-Id"]
    for record in records(srv.data, sync_id, async_id):
        assert record["status"] == "cancelled", record
        assert record["error"]["message"] == "server stopped", record
    assert not lost_lines(srv)


def test_ctrl_c_lets_the_call_under_way_end(private_tmp, wheelhouse, tmp_path):
    srv = serve(private_tmp, wheelhouse, "drain")
    answers: list = []
    try:
        srv.deploy(make_package(tmp_path, "echo", name="stop-drain", manifest_extra=LONG))
        out = Output(srv)
        caller = threading.Thread(target=lambda: answers.append(
            srv.invoke("stop-drain/print_then_sleep", {"s": 4})))
        caller.start()
        wait_for("the call under way", lambda: started(srv.data, "stop-drain"), 60, 0.05)
        ctrl_c(srv)
        line = out.wait("stopping: waiting for ")
        assert line.startswith("stopping: waiting for 1 call, ") and line.endswith(
            " s left; Ctrl-C again to stop it now"), line
        assert srv.proc.wait(timeout=120) == 0
        caller.join(30)
        assert out.wait("stopped") == "stopped"
    finally:
        srv.stop()
    assert not srv.leftovers, srv.leftovers
    answer = answers[0]
    assert answer.status_code == 200, answer.text
    record, = records(srv.data, answer.headers["X-Dockyard-Invocation-Id"])
    assert record["status"] == "succeeded", record
    assert not lost_lines(srv)


def test_ctrl_c_with_no_call_under_way_stops_at_once(private_tmp, wheelhouse, tmp_path):
    srv = serve(private_tmp, wheelhouse, "idle")
    try:
        srv.deploy(make_package(tmp_path, "echo", name="stop-idle"))
        # Calls made, and over: every web process watches the worker (and would see it go).
        for n in range(4):
            assert srv.invoke("stop-idle/echo", n).json() == n
        queued = srv.invoke("stop-idle/echo?async=1", 5).json()["invocation_id"]
        assert srv.wait_invocation(queued)["status"] == "succeeded"
        out = Output(srv)
        running = srv.descendants()
        ctrl_c(srv)
        assert srv.proc.wait(timeout=60) == 0
        assert out.wait("stopping: no calls under way")
        assert out.wait("stopped") == "stopped"
        gone, alive = psutil.wait_procs(running, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        srv.stop()
    assert not srv.leftovers, srv.leftovers
    assert not (srv.data / "server.json").exists()
    assert not lost_lines(srv), lost_lines(srv)


def remote_worker(srv: Server, data: Path, wheelhouse: Path, folder: Path
                  ) -> tuple[subprocess.Popen, Path]:
    """`dockyard worker` for `srv` (its own session, as in a terminal of its own), and its
    log."""
    token_file = folder / "worker-token"
    token_file.write_text(srv.worker_token + "\n")
    os.chmod(token_file, 0o600)
    log_path = folder / "worker.log"
    env = {k: v for k, v in os.environ.items() if k != "DOCKYARD_TOKEN"}
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dockyard", "--data", str(data), "worker", "--server",
             srv.url, "--token-file", str(token_file), "--find-links", str(wheelhouse),
             "--offline"], env=env, stdout=log, stderr=log, start_new_session=True)
    return worker, log_path


def test_a_second_ctrl_c_has_other_workers_stop_its_async_calls(private_tmp, wheelhouse,
                                                                 tmp_path):
    """serve without a local worker: a second Ctrl-C records its async call cancelled and
    has the worker running it kill it; the worker goes on."""
    (private_tmp / "stop-remote").mkdir()
    srv = Server(private_tmp / "stop-remote" / "data", ["--no-local-worker"], workers=0)
    data = private_tmp / "stop-remote" / "worker-data"
    worker, log_path = remote_worker(srv, data, wheelhouse, tmp_path)
    try:
        srv.wait_workers(1)
        srv.deploy(make_package(tmp_path, "echo", name="stop-remote", manifest_extra=LONG))
        out = Output(srv)
        queued = srv.invoke("stop-remote/print_then_sleep?async=1", {"s": 120})
        async_id = queued.json()["invocation_id"]
        wait_for("the call under way", lambda: started(data, "stop-remote"), 60, 0.05)
        ctrl_c(srv)
        assert out.wait("stopping: waiting for 1 call, ")
        ctrl_c(srv)
        assert srv.proc.wait(timeout=30) == 0
        wait_for("the call's process killed", lambda: f"{async_id} stop-remote@" in
                 log_path.read_text(), 30, 0.05)
        assert "cancelled; killing the process tree" in log_path.read_text()
        assert worker.poll() is None
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        srv.stop()
    assert not srv.leftovers, srv.leftovers
    assert not [p for p in sandbox_processes(data) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    record, = records(srv.data, async_id)
    assert record["status"] == "cancelled" and record["error"]["message"] == "server stopped"


def test_a_second_ctrl_c_stops_a_workers_calls(private_tmp, wheelhouse, tmp_path):
    """`dockyard worker` on its own (here beside a serve without a local worker): Ctrl-C in
    its terminal says what it waits for; a second one stops the call it relays at once."""
    (private_tmp / "stop-worker").mkdir()
    srv = Server(private_tmp / "stop-worker" / "data", ["--no-local-worker"], workers=0)
    data = private_tmp / "stop-worker" / "worker-data"
    worker, log_path = remote_worker(srv, data, wheelhouse, tmp_path)
    answers: list = []
    caller = None
    try:
        srv.wait_workers(1)
        srv.deploy(make_package(tmp_path, "echo", name="stop-relayed", manifest_extra=LONG))
        caller = threading.Thread(target=lambda: answers.append(
            srv.invoke("stop-relayed/print_then_sleep", {"s": 120})))
        caller.start()
        wait_for("the call under way", lambda: started(data, "stop-relayed"), 60, 0.05)
        os.killpg(worker.pid, signal.SIGINT)
        wait_for("the worker's line", lambda: "stopping: waiting for 1 call; Ctrl-C again to "
                 "stop it now" in log_path.read_text(), 30, 0.05)
        assert worker.poll() is None
        os.killpg(worker.pid, signal.SIGINT)
        assert worker.wait(timeout=30) == 0
        caller.join(30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        srv.stop()
        if caller is not None:
            caller.join(60)
    assert not srv.leftovers, srv.leftovers
    assert not [p for p in sandbox_processes(data) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    answer = answers[0]
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == {"type": "Cancelled", "message": "worker stopped"}
    record, = records(srv.data, answer.headers["X-Dockyard-Invocation-Id"])
    assert record["status"] == "cancelled" and record["error"]["message"] == "worker stopped"

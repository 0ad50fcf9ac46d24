"""A worker that knows several control planes (`dockyard worker --server A --server B`): it
uses one at a time and moves to the next at once when the current one stops answering (no
connection, a timeout, a 5xx; never on a 4xx), logging each change once. Unit tests of the
order against small HTTP servers on loopback, then real processes: two `serve
--no-local-worker` on one data dir and one `dockyard worker` given both; a kill -9 of the one
it uses leaves its versions and processes as they were, and its heartbeat reaches the other."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from unittest import mock

import psutil
import pytest
import requests
from click.testing import CliRunner

from conftest import Server, container_processes, make_package, sandbox_processes
from dockyard.runner.agent import Agent, RegisterPending, WorkerRefused
from dockyard.runner.servers import ControlPlanes, Unreachable
from failover_cluster import start_worker, wait_for, workers

# -- the order, against small HTTP servers ------------------------------------------------


class Plane:
    """A stand-in control plane on a free loopback port that answers as `mode` says: ok
    (200 and its name), 401, 404, 409, 503, drop (reads the request, closes without an
    answer), cut (a body cut short)."""

    def __init__(self, name: str, mode: str = "ok"):
        self.name, self.mode, self.hits = name, mode, 0
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.answer()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer()

            def answer(self):
                plane.hits += 1
                if plane.mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = json.dumps({"server": plane.name, "id": "wrk_same",
                                   "error": {"message": f"{plane.name} says no"}}).encode()
                status = 200 if plane.mode in ("ok", "cut") else int(plane.mode)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) * (10 if plane.mode == "cut"
                                                                    else 1)))
                self.end_headers()
                self.wfile.write(body)
                if plane.mode == "cut":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url() -> str:
    """A loopback port nobody listens on (its connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def planes():
    made = []

    def make(*modes):
        for mode in modes:
            made.append(Plane(f"p{len(made)}", mode))
        return made[-len(modes):]
    yield make
    for plane in made:
        plane.close()


def changes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dockyard.worker"]


def test_the_next_control_plane_takes_over_at_once_and_stays_current(planes, caplog):
    dead = dead_url()
    busy, good = planes("503", "ok")
    servers = ControlPlanes([dead, busy.url + "/", good.url], requests.Session())
    with caplog.at_level(logging.INFO, logger="dockyard.worker"):
        response = servers.request("POST", "/api/workers/w/heartbeat", json={}, timeout=5)
        assert response.json()["server"] == good.name and response.server == good.url
        assert [(f.url, f.may_have_arrived) for f in response.failures] == [
            (dead, False), (busy.url, True)]
        assert servers.current == good.url
        # The current one is asked first from now on; the dead one is not tried again.
        busy.mode = "ok"
        for _ in range(3):
            assert servers.request("GET", "/x", timeout=5).json()["server"] == good.name
    assert busy.hits == 1
    assert changes(caplog) == [f"control plane {dead} is unreachable (Connection refused); "
                               f"using {good.url}"]


def test_an_answer_in_the_4xx_is_not_a_failover(planes):
    first, second = planes("401", "ok")
    servers = ControlPlanes([first.url, second.url], requests.Session())
    for status in ("401", "404", "409"):
        first.mode = status
        response = servers.request("POST", "/api/workers/register", json={}, timeout=5)
        assert response.status_code == int(status) and response.server == first.url
    assert servers.current == first.url and second.hits == 0


def test_with_all_down_one_line_then_one_when_one_answers_again(planes, caplog):
    first, second = planes("503", "drop")
    servers = ControlPlanes([first.url, second.url], requests.Session())
    with caplog.at_level(logging.INFO, logger="dockyard.worker"):
        for _ in range(4):
            with pytest.raises(Unreachable) as raised:
                servers.request("GET", "/x", timeout=5)
            assert [f.url for f in raised.value.failures] == [first.url, second.url]
            assert isinstance(raised.value, requests.RequestException)   # as callers catch
        second.mode = "ok"
        assert servers.request("GET", "/x", timeout=5).json()["server"] == second.name
        assert servers.request("GET", "/x", timeout=5).json()["server"] == second.name
    lines = changes(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"no control plane answers ({first.url}: HTTP 503; "
                               f"{second.url}: ")
    assert lines[1] == f"control plane {second.url} answers again; using it"


def test_a_download_cut_short_starts_again_from_the_next_one(planes, tmp_path):
    cut, good = planes("cut", "ok")
    servers = ControlPlanes([cut.url, good.url], requests.Session())
    dest = tmp_path / "package.part"
    servers.download("/api/artifacts/abc", dest, timeout=5)
    assert json.loads(dest.read_text())["server"] == good.name
    assert servers.current == good.url
    good.mode = "404"     # an answer: no other control plane is asked
    with pytest.raises(requests.HTTPError):
        servers.download("/api/artifacts/abc", dest, timeout=5)
    assert cut.hits == 1


def _registering(tmp_path, urls):
    """What Agent.register needs of an agent, without a worker's processes."""
    return SimpleNamespace(
        config=SimpleNamespace(worker_dir=tmp_path, name="w1", advertise="127.0.0.1:1",
                               isolation=SimpleNamespace(summary=dict)),
        server=SimpleNamespace(address="127.0.0.1:1"), worker_id=None, interval=2.0,
        register_landed_until=0.0, servers=ControlPlanes(urls, requests.Session()))


def test_a_registration_cut_off_by_a_failover_is_tried_again_not_refused(planes, tmp_path):
    # The first control plane may have made the row before it went away: the next one's 409
    # (the name held by a live worker) is that row until it lapses, so it is tried again.
    gone, other = planes("drop", "409")
    agent = _registering(tmp_path, [gone.url, other.url])
    with pytest.raises(RegisterPending):
        Agent.register(agent)
    other.mode = "ok"
    Agent.register(agent)
    assert agent.worker_id == "wrk_same"
    assert (tmp_path / ".worker-id").read_text() == "wrk_same\n"
    # A 409 with no failover before it is a refusal, as with one control plane.
    refused = _registering(tmp_path, [other.url, gone.url])
    other.mode = "409"
    with pytest.raises(WorkerRefused, match="says no"):
        Agent.register(refused)


def test_the_worker_command_takes_several_servers(monkeypatch):
    from dockyard.cli import cli
    seen = []
    monkeypatch.delenv("DOCKYARD_URL", raising=False)
    monkeypatch.delenv("DOCKYARD_SERVER", raising=False)
    monkeypatch.setenv("DOCKYARD_TOKEN", "dyw_x")
    with mock.patch("dockyard.cli.worker.run_worker",
                    lambda servers, *a, **k: seen.append(servers) or 0):
        runner = CliRunner()
        for args, env in ((["--server", "http://a:1", "--server", "http://b:2/"], {}),
                          ([], {"DOCKYARD_SERVER": "http://a:1, http://b:2"}),
                          (["--server", "http://a:1", "--url", "http://b:2"], {}),
                          (["--server", "http://a:1,http://b:2", "--server", "http://a:1"], {})):
            result = runner.invoke(cli, ["worker", *args], env=env)
            assert result.exit_code == 0, result.output
        assert seen == [["http://a:1", "http://b:2"]] * 4
        assert "DOCKYARD_SERVER" in runner.invoke(cli, ["worker", "--help"]).output
        missing = runner.invoke(cli, ["worker"], env={"DOCKYARD_SERVER": None})
        assert missing.exit_code == 2 and "--server URL" in missing.output
        bad = runner.invoke(cli, ["worker", "--server", "a:1"])
        assert bad.exit_code == 2 and "not a control plane URL" in bad.output


# -- real processes: two control planes on one data dir, one worker given both -----------

@pytest.fixture
def cluster(private_tmp, wheelhouse):
    root = private_tmp / "worker-servers"
    root.mkdir()
    extra = ["--find-links", str(wheelhouse), "--offline"]
    store = root / "store"
    planes, worker = [], None
    try:
        for _ in range(2):
            planes.append(Server(store, ["--no-local-worker", "--web-workers", "1", *extra],
                                 workers=0))
        first, second = planes
        worker = start_worker(first.url, first.worker_token, root / "worker",
                              [*extra, "--server", second.url])
        yield first, second, worker
    finally:
        # The worker first (its function processes run under the store's uids), then each
        # control plane still running.
        if worker is not None:
            worker.stop()
            left = [p for p in sandbox_processes(worker.data) if p.pid != worker.pid]
            assert not psutil.wait_procs(left, timeout=10)[1], left
        for plane in reversed(planes):
            plane.stop()
        assert worker is None or worker.proc.returncode == 0, worker.proc.returncode
        assert not any(plane.leftovers for plane in planes), [p.leftovers for p in planes]


def _row(plane: Server, pid: int) -> dict | None:
    return next((w for w in workers(plane.url, plane.admin) if w["pid"] == pid), None)


def test_a_killed_control_plane_costs_the_worker_nothing(cluster, tmp_path):
    first, second, worker = cluster
    up = wait_for("the worker up", lambda: (_row(second, worker.pid) or {}).get("state")
                  == "up" and _row(second, worker.pid), 60, interval=0.1)
    first.deploy(make_package(tmp_path, "echo", name="ws-echo"))
    for n, plane in enumerate((first, second)):
        response = plane.invoke("ws-echo/echo", {"via": n})
        assert response.status_code == 200 and response.json() == {"via": n}, response.text
    pids = container_processes(worker.data, "ws-echo")
    assert pids

    os.killpg(first.proc.pid, signal.SIGKILL)    # serve and all it started, as kill -9 -PGID
    first.proc.wait(timeout=30)
    killed = time.time()
    calls = 0

    def heard_after_the_kill():
        nonlocal calls
        response = second.invoke("ws-echo/echo", {"call": calls})
        assert response.status_code == 200 and response.json() == {"call": calls}, \
            response.text
        calls += 1
        row = _row(second, worker.pid)
        return row if row["last_seen"] > killed + 0.5 and calls >= 5 else None

    row = wait_for("a heartbeat through the survivor", heard_after_the_kill, 15, interval=0.1)
    assert row["id"] == up["id"] and row["state"] == "up", row
    assert [(v["container"], v["state"]) for v in row["versions"]] == [("ws-echo", "ready")]
    # The same processes, built once: only where its requests go changed.
    assert container_processes(worker.data, "ws-echo") == pids
    assert worker.proc.poll() is None
    log = (worker.data.parent / f"{worker.data.name}-worker.log").read_text()
    assert log.count(f"control plane {first.url} is unreachable (") == 1, log[-3000:]
    assert f"using {second.url}" in log
    assert log.count("registered as") == 1 and log.count("-> building") == 1, log[-3000:]

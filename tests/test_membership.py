"""Who owns a worker folder and who a worker is: a second worker or serve on a data dir in use
exits with one line and touches nothing (the first keeps its function processes and its
server.json; a download in progress survives); two workers started from one folder with the
defaults do not share a data dir; names default per data dir, survive a restart (the row is
taken over) and a live one is refused; gone workers are forgotten, or removed with `workers
rm`; /metrics has per-worker series. Real processes: one `serve` and a few `dockyard worker`s,
each with a data dir of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Server, container_processes, make_package, sandbox_processes
from dockyard.app.datadir import DataDir

FORGET_S = 8
HANG_S = 90


@pytest.fixture(scope="module")
def srv(private_tmp, wheelhouse):
    data = private_tmp / "membership" / "data"
    data.parent.mkdir()
    server = Server(data, ["--find-links", str(wheelhouse), "--offline",
                           "--forget-workers-after", f"{FORGET_S}s", "--prune-every", "0.5s"])
    yield server
    code = server.stop()
    assert code == 0, server.log_path.read_text()[-3000:]
    assert not server.leftovers, server.leftovers


def _env(srv: Server) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKYARD_URL", "DOCKYARD_HOME")}
    env["DOCKYARD_TOKEN"] = srv.worker_token
    return env


class Worker:
    """A `dockyard worker` of srv's, in its own session; stop() ends it and all it ran."""

    def __init__(self, srv: Server, data: Path | None, *args: str, cwd: Path = ROOT):
        self.data = data or cwd / ".dockyard"
        self.log_path = self.data.parent / f"{self.data.name}-{time.monotonic_ns()}-worker.log"
        self.data.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "dockyard",
               *(["--data", str(data)] if data else []), "worker", "--server", srv.url, *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=cwd,
                                     env=_env(srv), start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=HANG_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        for p in sandbox_processes(self.data):
            try:
                p.kill()
            except psutil.Error:
                pass
        return self.proc.returncode


def workers(srv: Server) -> list[dict]:
    return srv.api("GET", "/api/workers").json()["workers"]


def wait_for(what, predicate, timeout: float = HANG_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


def wait_up(srv: Server, name: str, pid: int) -> dict:
    return wait_for(f"worker {name} (pid {pid}) up", lambda: next(
        (w for w in workers(srv) if w["name"] == name and w["pid"] == pid
         and w["state"] == "up"), None))


def one_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_a_second_worker_or_serve_on_a_data_dir_in_use_exits_and_touches_nothing(srv, tmp_path):
    srv.deploy(make_package(tmp_path, "echo", name="own-echo"))
    assert srv.invoke("own-echo/echo", 1).status_code == 200
    pids = container_processes(srv.data, "own-echo")
    assert pids
    # A download in progress in the first one's folder.
    part = srv.data / "worker" / ".artifacts" / ("0" * 64 + ".part")
    part.write_bytes(b"half a package")
    server_json = (srv.data / "server.json").read_text()
    env = _env(srv)

    second = subprocess.run([sys.executable, "-m", "dockyard", "--data", str(srv.data),
                             "worker", "--server", srv.url], capture_output=True, text=True,
                            env=env, timeout=HANG_S, cwd=ROOT)
    assert second.returncode != 0
    line = one_line(second.stdout + second.stderr)
    assert f"in use by pid {srv.proc.pid}" in line and "--data" in line, line

    serve = subprocess.run([sys.executable, "-m", "dockyard", "--data", str(srv.data), "serve",
                            "--port", "0", "--deploy-dir", ""], capture_output=True, text=True,
                           env=env, timeout=HANG_S, cwd=ROOT)
    assert serve.returncode != 0 and "listening" not in serve.stdout
    line = one_line(serve.stderr)
    assert f"held by pid {srv.proc.pid}" in line and "--no-local-worker" in line, line

    assert container_processes(srv.data, "own-echo") == pids
    assert all(psutil.pid_exists(pid) for pid in pids)
    assert srv.invoke("own-echo/echo", 2).json() == 2
    assert part.exists()
    assert (srv.data / "server.json").read_text() == server_json


def test_serve_without_a_local_worker_shares_the_data_dir_and_leaves_server_json(srv):
    log = open(srv.data.parent / "second-serve.log", "w")
    second = subprocess.Popen([sys.executable, "-m", "dockyard", "--data", str(srv.data),
                               "serve", "--port", "0", "--deploy-dir", "", "--no-local-worker"],
                              stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                              start_new_session=True)
    try:
        url = None
        end = time.monotonic() + HANG_S
        while url is None and time.monotonic() < end:
            line = second.stdout.readline()
            if not line:
                break
            match = re.search(r"dockyard listening on (http://\S+)", line)
            url = match.group(1) if match else None
        assert url, (srv.data.parent / "second-serve.log").read_text()
        assert requests.post(f"{url}/invoke/own-echo/echo", data="3", timeout=60).json() == 3
        assert json.loads((srv.data / "server.json").read_text())["pid"] == srv.proc.pid
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            assert second.wait(timeout=HANG_S) == 0
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
            second.stdout.close()
            log.close()
    assert json.loads((srv.data / "server.json").read_text())["pid"] == srv.proc.pid
    assert srv.invoke("own-echo/echo", 4).json() == 4


def test_names_restarts_refusals_removal_and_forgetting(srv, tmp_path):
    folder = tmp_path / "one-folder"
    folder.mkdir()
    name = DataDir.at(folder / ".dockyard").default_worker_name()
    other_name = DataDir.at(tmp_path / "other").default_worker_name()
    assert name != other_name and name.startswith(DataDir.at(None).default_worker_name()[:-7])
    started = []
    try:
        # Two workers from one folder with the defaults: the second one fails clearly.
        first = Worker(srv, None, cwd=folder)
        started.append(first)
        row = wait_up(srv, name, first.proc.pid)
        twin = Worker(srv, None, cwd=folder)
        started.append(twin)
        assert twin.proc.wait(timeout=HANG_S) != 0
        line = one_line(twin.output())
        assert f"in use by pid {first.proc.pid}" in line and "--data" in line, line

        # A live worker's name is refused.
        impostor = Worker(srv, tmp_path / "other", "--name", name)
        started.append(impostor)
        assert impostor.proc.wait(timeout=HANG_S) != 0
        error = impostor.output().strip().splitlines()[-1]
        assert error.startswith("Error: ") and f"'{name}' is held by a live worker" in error
        assert "Traceback" not in impostor.output()

        # Killed and started again at once (its row still live): the row is taken over.
        first.stop(signal.SIGKILL)
        again = Worker(srv, None, cwd=folder)
        started.append(again)
        taken = wait_up(srv, name, again.proc.pid)
        assert taken["id"] == row["id"]
        assert [w["id"] for w in workers(srv) if w["name"] == name] == [row["id"]]
        shown = srv.cli("workers").stdout.splitlines()
        assert shown[0].split()[:4] == ["NAME", "STATE", "LAST", "SEEN"]
        assert any(line.startswith(name) and " up " in line for line in shown), shown

        # Stopped: removed by hand (a live one is refused first).
        live = srv.cli("workers", "rm", name, check=False)
        assert live.returncode == 1 and "is live" in one_line(live.stderr)
        assert again.stop() == 0
        wait_for("stopped", lambda: any(w["name"] == name and w["state"] == "stopped"
                                        for w in workers(srv)))
        assert f"worker {name} ({row['id']}) forgotten" in srv.cli("workers", "rm", name).stdout
        assert name not in [w["name"] for w in workers(srv)]

        # Started again, then stopped: forgotten by serve after --forget-workers-after.
        last = Worker(srv, None, cwd=folder)
        started.append(last)
        wait_up(srv, name, last.proc.pid)
        assert last.stop() == 0
        stopped_at = time.monotonic()
        wait_for("forgotten", lambda: name not in [w["name"] for w in workers(srv)],
                 timeout=FORGET_S + 30)
        assert time.monotonic() - stopped_at > FORGET_S - 2
    finally:
        for worker in started:
            worker.stop()


def test_metrics_carry_per_worker_series(srv, tmp_path):
    srv.deploy(make_package(tmp_path, "echo", name="met-echo"))
    assert srv.invoke("met-echo/echo", 1).status_code == 200
    assert srv.invoke("met-echo/boom", {}).status_code == 500
    local = next(w for w in workers(srv) if w["state"] == "up" and w["pid"] in
                 {p.pid for p in srv.descendants()})
    assert local["name"] == DataDir.at(srv.data).default_worker_name()

    def samples() -> dict:
        found = {}
        for family in text_string_to_metric_families(srv.api("GET", "/metrics").text):
            for sample in family.samples:
                if sample.labels.get("id") == local["id"]:
                    assert sample.labels["worker"] == local["name"]
                    found[(sample.name, sample.labels.get("state"))] = sample.value
        return found

    def counted() -> dict | None:
        found = samples()
        return found if found.get(("dockyard_worker_failures_total", None)) else None

    # Records are written a moment after the answer: polled.
    seen = wait_for("the calls counted", counted, timeout=30)
    assert seen[("dockyard_worker_up", None)] == 1
    assert seen[("dockyard_worker_state", "up")] == 1
    assert seen[("dockyard_worker_calls_in_flight", None)] == 0
    assert seen[("dockyard_worker_calls_total", None)] >= 2
    assert seen[("dockyard_worker_failures_total", None)] >= 1
    assert requests.get(srv.url + "/metrics", timeout=10).status_code == 401

    # A call under way shows in flight (from the worker's heartbeat) in both places.
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(srv.invoke, "met-echo/sleep", {"s": 8})
        wait_for("a call in flight", lambda: samples().get(
            ("dockyard_worker_calls_in_flight", None)) == 1, timeout=7)
        row = next(w for w in workers(srv) if w["id"] == local["id"])
        assert row["calls_in_flight"] == 1
        assert slow.result(timeout=60).status_code == 200


def test_the_start_up_sweep_leaves_a_download_a_build_holds(tmp_path):
    from dockyard.runner.venvs import Builder, UvOptions

    builder = Builder(tmp_path, UvOptions(uv_bin="uv", python=sys.executable), lambda *a: None)
    builder.artifacts.mkdir()
    held, cut_off = builder.artifacts / ("a" * 64 + ".part"), builder.artifacts / ("b" * 64 + ".part")
    held.write_bytes(b"x")
    cut_off.write_bytes(b"x")
    with builder._folder_lock_at(builder.artifacts / ("a" * 64)):
        builder.sweep([])
    assert held.exists() and not cut_off.exists()

"""Deployments across several workers: a deployment ends `ready` when every live worker serves
the version, `partial` (naming the failed workers and why) when some failed while others
serve, and no lost worker holds one up; a version that failed on a worker is tried again there
with backoff, except when its code cannot be imported. Real processes: one `serve` with its
local worker, plus `dockyard worker`s with data dirs of their own on the same host."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, Server, make_package, sandbox_processes, terminate, zip_folder
from dockyard.app.store.deployments import deployment_status
from dockyard.common.manifest import parse_manifest
from dockyard.common.protocol import DeploymentStatus, Role
from dockyard.runner.process import LoadError
from dockyard.runner.states import VersionState
from dockyard.runner.versions import RETRY_FIRST_S, RETRY_MAX_S, VersionRuntime, retry_delay

# Hang detection only: every wait below ends long before these when the code is right.
BUILD_S = 120
LOST_S = 60


# -- unit: the deployment's status and a version's backoff ------------------------------------

def _row(worker: str, state: str, error: str | None = None) -> dict:
    return {"worker_id": worker, "name": f"name-{worker}", "state": state, "error": error}


def _judge(current: str, rows: list[dict], live: set[str], error: str | None = None):
    by_worker = {r["worker_id"]: r for r in rows if r["worker_id"] in live}
    ready = [w for w, r in by_worker.items() if r["state"] in ("ready", "idle")]
    failed = [r for r in by_worker.values() if r["state"] == "failed"]
    return deployment_status(current, error, live, by_worker, ready, failed)


def test_deployment_status_counts_live_workers_only():
    a_ready, b_failed = _row("a", "ready"), _row("b", "failed", "uv failed: no dytiny\nmore")
    status, error = _judge("in_progress", [a_ready, b_failed], {"a", "b"})
    assert status == DeploymentStatus.PARTIAL
    assert error == "serves on 1 of 2 live workers; failed on name-b (b): uv failed: no dytiny"
    # A worker still building holds it in progress; once it is not live it counts for nothing.
    c_building = _row("c", "building")
    assert _judge("in_progress", [a_ready, c_building], {"a", "c"})[0] == "in_progress"
    assert _judge("in_progress", [a_ready, c_building], {"a"}) == ("ready", None)
    # A live worker that has not reported yet holds it too.
    assert _judge("in_progress", [a_ready, b_failed], {"a", "b", "d"})[0] == "in_progress"
    assert _judge("in_progress", [b_failed], {"b"})[0] == "failed"
    assert _judge("pending", [], {"a"}) == (None, None)
    # Partial stays partial (with its reason) while the failed worker tries again.
    assert _judge("partial", [a_ready, _row("b", "building")], {"a", "b"}, "why") == (
        "partial", "why")
    assert _judge("partial", [a_ready, _row("b", "ready")], {"a", "b"}, "why") == ("ready", None)


class _Builder:
    def __init__(self, error: Exception):
        self.error = error
        self.builds = 0

    def build(self, spec, say):
        self.builds += 1
        raise self.error


def _runtime(error: Exception) -> tuple[VersionRuntime, _Builder]:
    manifest = parse_manifest('name = "unit"\n[functions]\nf = "main:f"\n')
    spec = {"version_id": 1, "container": "unit", "version": "1", "role": Role.SERVE,
            "manifest": manifest.to_dict(), "deployment": "dep_1"}
    builder = _Builder(error)
    return VersionRuntime(spec, builder, lambda runtime: None, lambda: None), builder


def test_a_failed_build_is_tried_again_with_a_growing_delay():
    assert [retry_delay(n) for n in (1, 2, 3)] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S,
                                                   4 * RETRY_FIRST_S]
    assert retry_delay(50) == RETRY_MAX_S
    runtime, builder = _runtime(OSError("the download was deleted"))
    start = time.monotonic()
    runtime.serve()
    assert runtime.state is VersionState.FAILED and builder.builds == 1
    assert not runtime.retry_due(start + RETRY_FIRST_S - 1)
    assert runtime.retry_due(time.monotonic() + RETRY_FIRST_S)
    assert not runtime.retry_due(time.monotonic() + RETRY_FIRST_S)   # claimed once
    runtime.serve()
    assert builder.builds == 2 and runtime.failures == 2
    assert runtime.retry_at - time.monotonic() > RETRY_FIRST_S   # doubled
    # A new deployment starts the count over; a version put on standby is not retried.
    runtime.start_over()
    assert runtime.failures == 0 and runtime.retry_at is None
    runtime.serve()
    assert runtime.retry_at - time.monotonic() <= RETRY_FIRST_S
    runtime.role = Role.STANDBY
    assert not runtime.retry_due(time.monotonic() + RETRY_MAX_S)


def test_a_load_error_is_final():
    runtime, builder = _runtime(LoadError("ModuleNotFoundError: No module named 'nope'"))
    runtime.serve()
    assert runtime.state is VersionState.FAILED and runtime.error.startswith("import failed")
    assert runtime.retry_at is None
    assert not runtime.retry_due(time.monotonic() + RETRY_MAX_S)
    assert "not tried again" in "\n".join(runtime.log_lines)



def test_what_the_pool_reports_decides_whether_it_is_tried_again():
    # Processes that keep dying on start (memory, a crash at import time): backoff, as for a
    # build; the code that cannot be imported, or a host that cannot isolate it: final.
    runtime, _ = _runtime(OSError("unused"))
    runtime._pool_failed("its processes keep dying on start (5 times in a row)")
    assert runtime.state is VersionState.FAILED and runtime.retry_at is not None
    runtime._pool_failed("its processes keep dying on start (5 times in a row)")
    assert runtime.failures == 1   # told twice (the pool, and the start that raised): once
    for reason in ("the code cannot be loaded: SyntaxError: invalid syntax",
                   "this host cannot isolate it as its manifest asks: no cgroups"):
        runtime, _ = _runtime(OSError("unused"))
        runtime._pool_failed(reason)
        assert runtime.state is VersionState.FAILED and runtime.retry_at is None, reason


# -- real processes ---------------------------------------------------------------------------

class Worker:
    """`dockyard worker` against a server, with a data dir of its own."""

    def __init__(self, server: Server, data: Path, *args: str):
        self.data = data
        data.mkdir(parents=True)
        self.log_path = data.parent / f"{data.name}-worker.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "dockyard", "--data", str(data), "worker",
               "--server", server.url, "--token-file", str(server.data / "tokens" / "worker"),
               *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self.server = server
        self.id = None
        end = time.monotonic() + 60
        while time.monotonic() < end and self.id is None:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            for w in server.api("GET", "/api/workers").json()["workers"]:
                if w["pid"] == self.proc.pid and w["ready"]:
                    self.id = w["id"]
            time.sleep(0.1)
        if self.id is None:
            self.stop()
            raise AssertionError("the worker never registered:\n" + self.log_path.read_text())

    def kill(self) -> None:
        """kill -9 of the worker and everything it started, as a host that dies would."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(
            recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
            terminate(self.proc)
            psutil.wait_procs(procs, timeout=10)
        for p in sandbox_processes(self.data):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def cluster(private_tmp):
    """serve with its local worker, and a second worker with a data dir of its own."""
    root = private_tmp / "rollout"
    root.mkdir()
    (root / "data").mkdir()
    server = Server(root / "data" / "serve", ["--offline"])
    started: list[Worker] = []
    try:
        b = Worker(server, root / "data" / "b", "--offline")
        started.append(b)
        server.wait_workers(2)
        yield {"server": server, "b": b, "root": root, "workers": started}
    finally:
        for worker in started:
            worker.stop()
        assert server.stop() == 0, server.log_path.read_text()[-3000:]
        assert not server.leftovers, server.leftovers


def _deployment(server: Server, deployment_id: str) -> dict:
    return server.api("GET", f"/api/deployments/{deployment_id}").json()


def _wait_status(server: Server, deployment_id: str, statuses: tuple, timeout: float) -> dict:
    end = time.monotonic() + timeout
    dep = None
    while time.monotonic() < end:
        dep = _deployment(server, deployment_id)
        if dep["status"] in statuses:
            return dep
        time.sleep(0.2)
    raise AssertionError(f"deployment {deployment_id} never became {statuses}: {dep}")


def _worker_row(dep: dict, worker_id: str) -> dict:
    return next(w for w in dep["workers"] if w["worker"] == worker_id)


def test_a_version_failed_on_one_worker_is_partial_then_ready_once_it_recovers(
        cluster, tmp_path):
    server, b = cluster["server"], cluster["b"]
    # A disk fault on the second worker only: where its version folder goes is a file.
    blocker = b.data / "worker" / "ro-partial"
    blocker.write_text("not a folder")
    folder = make_package(tmp_path, "echo", name="ro-partial", version="1")
    started = time.monotonic()
    done = server.cli("deploy", str(folder), "--wait", check=False)
    took = time.monotonic() - started
    # Returns as soon as every live worker has settled: not at its 600 s timeout.
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert took < BUILD_S
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ro-partial@1 is only partly deployed: it serves on 1 of 2 "
                            "live workers; failed on "), error
    assert b.id in error and "Not a directory" in error and "Traceback" not in done.stderr
    assert "deployment dep_" in done.stdout and ": partial" in done.stdout

    dep_id = done.stdout.split("deployment ")[1].split(":")[0]
    dep = _deployment(server, dep_id)
    assert dep["status"] == "partial" and b.id in dep["error"]
    assert _worker_row(dep, b.id)["state"] == "failed"
    assert "trying again in 5s" in _worker_row(dep, b.id)["log"]
    assert [w["state"] for w in dep["workers"] if w["worker"] != b.id] == ["ready"]
    # It serves on the other worker meanwhile.
    for n in range(6):
        response = server.invoke("ro-partial/echo", {"n": n})
        assert response.status_code == 200, response.text
        assert response.json() == {"n": n}

    # The fault goes: the worker tries again by itself, and the same deployment turns ready
    # without a new deploy.
    blocker.unlink()
    dep = _wait_status(server, dep_id, ("ready",), BUILD_S)
    assert _worker_row(dep, b.id)["state"] == "ready"
    assert dep["error"] is None


def test_a_failed_download_is_retried_and_the_same_deployment_becomes_ready(cluster, tmp_path):
    server = cluster["server"]
    folder = make_package(tmp_path, "echo", name="ro-download", version="1")
    record = server.api("POST", "/api/containers?activate=0", data=zip_folder(folder)).json()
    artifact = server.data / "artifacts" / record["artifact_sha256"]
    aside = cluster["root"] / "aside"
    os.replace(artifact, aside)   # the package file is gone while the workers fetch it
    restored = False
    try:
        answer = server.api("POST", "/api/containers/ro-download/activate",
                            json={"version": "1"})
        assert answer.status_code == 200, answer.text
        dep_id = answer.json()["deployment"]
        dep = _wait_status(server, dep_id, ("failed",), BUILD_S)
        assert all("trying again in 5s" in w["log"] for w in dep["workers"]), dep
        os.replace(aside, artifact)
        restored = True
    finally:
        if not restored:
            os.replace(aside, artifact)
    dep = _wait_status(server, dep_id, ("ready",), BUILD_S)
    assert [w["state"] for w in dep["workers"]] == ["ready", "ready"]
    response = server.invoke("ro-download/echo", {"ok": 1})
    assert response.status_code == 200 and response.json() == {"ok": 1}


def test_a_load_error_is_not_retried(cluster, tmp_path):
    server = cluster["server"]
    folder = make_package(tmp_path, "broken_import", name="ro-broken", version="1")
    record = server.deploy(folder, wait=False)
    dep = _wait_status(server, record["deployment"], ("failed", "ready", "partial"), BUILD_S)
    assert dep["status"] == "failed", dep
    # Watched over twice the first retry delay (and a heartbeat): no worker tries it again.
    end = time.monotonic() + 2 * RETRY_FIRST_S + 2
    while time.monotonic() < end:
        dep = _deployment(server, record["deployment"])
        assert dep["status"] == "failed"
        for w in dep["workers"]:
            assert w["state"] == "failed", w
            assert "not tried again" in w["log"], w
            assert "trying again" not in w["log"], w
            assert w["log"].count("not tried again") == 1, w
        time.sleep(0.5)


def test_a_worker_lost_during_a_deploy_does_not_hold_deploy_wait(cluster, tmp_path):
    server = cluster["server"]
    c = Worker(server, cluster["root"] / "data" / "c")
    cluster["workers"].append(c)
    server.wait_workers(3)
    _wait_heartbeats(server, c.id, 2)   # past its start-up sweep
    # The third worker's copy of the package is a FIFO nobody writes: its build blocks on
    # it, so it is still building when it dies.
    archive = tmp_path / "ro-lost.zip"
    archive.write_bytes(zip_folder(make_package(tmp_path, "echo", name="ro-lost", version="1")))
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    (c.data / "worker" / ".artifacts").mkdir(parents=True, exist_ok=True)
    os.mkfifo(c.data / "worker" / ".artifacts" / sha256)
    env = dict(os.environ, DOCKYARD_URL=server.url, DOCKYARD_TOKEN=server.admin)
    waiter = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "--data", str(server.data), "--json", "deploy",
         str(archive), "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT)
    try:
        dep_id = _wait_for_c_building(server, c, waiter)
        assert waiter.poll() is None   # held by the worker that is still building
        c.kill()
        killed = time.monotonic()
        lost_at = _wait_lost(server, c.id, LOST_S)
        out, err = waiter.communicate(timeout=LOST_S)
        returned = time.monotonic()
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, (out, err)
    assert json.loads(out)["artifact_sha256"] == sha256
    # Returned once the worker was counted lost, not at its 600 s timeout (the bound is far
    # from both, for a busy machine).
    assert returned - max(lost_at, killed) < 60, (killed, lost_at, returned)
    dep = _deployment(server, dep_id)
    assert dep["status"] == "ready"
    assert c.id not in [w["worker"] for w in dep["workers"]]


def _wait_heartbeats(server: Server, worker_id: str, count: int) -> None:
    seen: set[float] = set()
    end = time.monotonic() + LOST_S
    while time.monotonic() < end:
        for w in server.api("GET", "/api/workers").json()["workers"]:
            if w["id"] == worker_id and w["last_seen"] != w["registered_at"]:
                seen.add(w["last_seen"])
        if len(seen) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker {worker_id} sent fewer than {count} heartbeats")


def _wait_for_c_building(server: Server, c: Worker, waiter: subprocess.Popen) -> str:
    """The deployment of ro-lost once every other worker has it ready and `c` builds it."""
    end = time.monotonic() + BUILD_S
    dep = None
    while time.monotonic() < end:
        assert waiter.poll() is None, waiter.communicate()
        container = server.api("GET", "/api/containers/ro-lost")
        if container.status_code == 200 and container.json().get("last_deployment"):
            dep = _deployment(server, container.json()["last_deployment"])
            states = {w["worker"]: w["state"] for w in dep["workers"]}
            others = [s for w, s in states.items() if w != c.id]
            if states.get(c.id) == "building" and others and set(others) == {"ready"}:
                return dep["id"]
        time.sleep(0.2)
    raise AssertionError(f"never saw the third worker building alone: {dep}")


def _wait_lost(server: Server, worker_id: str, timeout: float) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for w in server.api("GET", "/api/workers").json()["workers"]:
            if w["id"] == worker_id and not w["ready"]:
                return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"worker {worker_id} was never counted lost")

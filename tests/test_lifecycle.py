"""Whole-process lifecycle: shutdown drains, a dead worker is a 502 and is replaced, a restart
mid-run loses no async call. Each test runs its own `serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from conftest import ROOT, Server, instance_uids, make_package, sandbox_processes
from conftest import poll_until as wait_for


@pytest.fixture
def own_server(private_tmp, wheelhouse, request):
    servers = []

    def start(name: str, extra: list[str] = (), workers: int = 1) -> Server:
        data = private_tmp / f"{request.node.name}-{name}" / "data"
        data.parent.mkdir(exist_ok=True)
        srv = Server(data, ["--find-links", str(wheelhouse), "--offline", *extra],
                     workers=workers)
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.stop()
        assert not srv.leftovers, srv.leftovers


def _worker_process(server: Server) -> psutil.Process:
    for p in server.descendants():
        if "worker" in p.cmdline():
            return p
    raise AssertionError("no worker process")


def test_sigterm_drains_in_flight_calls_and_leaves_nothing(own_server, tmp_path):
    srv = own_server("a")
    srv.deploy(make_package(tmp_path, "echo", name="lc-drain"))
    result = {}
    caller = threading.Thread(target=lambda: result.update(
        r=srv.invoke("lc-drain/sleep", {"s": 2})))
    caller.start()
    time.sleep(0.7)
    procs = srv.descendants()
    assert len(procs) >= 4  # gunicorn arbiter + web workers + worker + child
    assert srv.stop() == 0
    caller.join(30)
    assert result["r"].status_code == 200 and result["r"].json() == "slept"
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not sandbox_processes(srv.data)
    assert not (srv.data / "server.json").exists()


def test_worker_killed_mid_call_is_a_502_and_it_comes_back(own_server, tmp_path):
    srv = own_server("b")
    srv.deploy(make_package(tmp_path, "echo", name="lc-worker"))
    worker = _worker_process(srv)
    result = {}
    caller = threading.Thread(target=lambda: result.update(
        r=srv.invoke("lc-worker/sleep", {"s": 5})))
    caller.start()
    time.sleep(1.0)
    worker.kill()
    caller.join(30)
    assert result["r"].status_code == 502
    assert result["r"].json()["error"]["type"] == "WorkerDied"
    # serve restarts its worker; the version's venv is on disk, so it is back quickly.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = srv.invoke("lc-worker/echo", "back")
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        time.sleep(0.3)
    assert response.status_code == 200 and response.json() == "back"
    # The dead worker's child did not outlive it.
    assert len([p for p in sandbox_processes(srv.data) if "bootstrap" in " ".join(p.cmdline())]) == 1


def test_restart_mid_run_loses_no_async_call(private_tmp, wheelhouse, tmp_path):
    data = private_tmp / "lc-restart" / "data"
    data.parent.mkdir()
    first = Server(data, ["--find-links", str(wheelhouse), "--offline"])
    try:
        first.deploy(make_package(tmp_path, "echo", name="lc-async",
                                  manifest_extra="[limits]\nconcurrency = 2\n"))
        running = first.invoke("lc-async/sleep?async=1", {"s": 3}).json()["invocation_id"]
        deadline = time.monotonic() + 20
        while first.api("GET", f"/api/invocations/{running}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The whole serve process tree dies at once, mid-call.
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        first.stop()
    second = Server(data, ["--find-links", str(wheelhouse), "--offline"])
    try:
        queued = second.invoke("lc-async/echo?async=1", {"q": 1}).json()["invocation_id"]
        inv = second.wait_invocation(running, timeout=60)
        assert inv["status"] == "succeeded" and inv["attempt"] == 2, inv
        assert second.wait_invocation(queued)["status"] == "succeeded"
        assert requests.get(second.url + "/healthz", timeout=5).json()["workers"] == 1
    finally:
        assert second.stop() == 0
        assert not second.leftovers


def test_invoke_auth(own_server, tmp_path):
    srv = own_server("auth", ["--invoke-auth"])
    srv.deploy(make_package(tmp_path, "echo", name="lc-auth"))
    assert srv.invoke("lc-auth/echo", 1).status_code == 401
    wrong = srv.invoke("lc-auth/echo", 1, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "Unauthorized"
    # A caller on this host is told where the token is (a remote one is not).
    assert str(srv.data / "tokens" / "admin") in wrong.json()["error"]["message"]
    worker = srv.invoke("lc-auth/echo", 1, headers={"Authorization": f"Bearer {srv.worker_token}"})
    assert worker.status_code == 403
    invoke_token = (srv.data / "tokens" / "invoke").read_text().strip()
    for token in (invoke_token, srv.admin):
        ok = srv.invoke("lc-auth/echo", 1, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json() == 1
    # The invoke token opens /invoke only.
    assert requests.get(srv.url + "/api/containers", timeout=10,
                        headers={"Authorization": f"Bearer {invoke_token}"}).status_code == 403


def test_kill_9_of_serves_process_group_leaves_no_function_process(own_server, tmp_path):
    srv = own_server("kill9")
    srv.deploy(make_package(tmp_path, "hostile", name="lc-kill9"))
    # A detached grandchild too: it left its parent's session and process group.
    assert srv.invoke("lc-kill9/detach", {}).status_code == 200
    before = [p for p in sandbox_processes(srv.data) if p.uids().real != 0]
    assert len(before) >= 3   # the namespace's init, the function's process, the grandchild
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    gone, alive = psutil.wait_procs(before, timeout=20)
    assert not alive, alive
    left = [p for p in sandbox_processes(srv.data) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    gone, alive = psutil.wait_procs(left, timeout=20)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def test_serve_from_a_private_folder_serves_the_examples(private_tmp, wheelhouse):
    """The README's run command from a checkout under a home folder (mode 0700): the data
    dir lives below it, and the shipped examples answer."""
    home = private_tmp / "home-user"
    home.mkdir(mode=0o700)
    (home / "checkout").mkdir()
    srv = Server(home / "checkout" / ".dockyard", ["--deploy-dir", str(ROOT / "deploy"),
                                                  "--find-links", str(wheelhouse), "--offline"])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = srv.invoke("hello/greet", {"who": "you"})
            if response.status_code == 200:
                break
            time.sleep(0.2)
        assert response.status_code == 200, response.text
        assert response.json()["message"] == "hello, you!"
    finally:
        assert srv.stop() == 0
        assert not srv.leftovers


def test_a_worker_whose_data_dir_does_not_exist_yet_serves(own_server, tmp_path):
    srv = own_server("remote", ["--no-local-worker"], workers=0)
    data = tmp_path / "not" / "there" / "yet"
    token_file = tmp_path / "worker-token"
    token_file.write_text(srv.worker_token + "\n")
    os.chmod(token_file, 0o600)
    log = open(tmp_path / "worker.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "DOCKYARD_TOKEN"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "--data", str(data), "worker", "--server", srv.url,
         "--token-file", str(token_file)], env=env, stdout=log, stderr=log,
        start_new_session=True)
    try:
        srv.wait_workers(1)
        srv.deploy(make_package(tmp_path, "hostile", name="lc-remote"))
        assert srv.invoke("lc-remote/boot", {}).status_code == 200
        assert srv.worker_token not in " ".join(psutil.Process(worker.pid).cmdline())
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            assert worker.wait(timeout=60) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
            log.close()
    assert not [p for p in sandbox_processes(data) if p.is_running()]


def test_a_worker_that_cannot_run_here_stops_serve_with_one_line(private_tmp):
    data = private_tmp / "cannot-run" / "data"
    data.parent.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "dockyard", "--data", str(data), "serve", "--port", "0",
         "--deploy-dir", "", "--python", "/nonexistent/python3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "listening" not in done.stdout
    assert "--python /nonexistent/python3 does not exist" in done.stderr
    assert "the local worker cannot run on this host" in done.stderr
    assert "Traceback" not in done.stderr
    assert not sandbox_processes(data)


def test_a_503_says_what_happened_to_the_local_worker(tmp_path):
    from dockyard.app.store.db import connect, migrate
    from dockyard.app.invoke.execute import Target, _pick_worker
    from dockyard.app.invoke.liveness import Liveness
    from dockyard.app.store import workers as worker_store
    from dockyard.common.manifest import Manifest
    from dockyard.errors import Unavailable

    migrate(tmp_path / "db")
    db = connect(tmp_path / "db")
    target = Target("c", 1, "1", Manifest.from_dict({"name": "c"}), False)
    liveness = Liveness(connections=None)   # no worker to watch: only the 503's words matter
    with pytest.raises(Unavailable, match="start one with"):
        _pick_worker(db, target, [], set(), liveness)
    worker_store.set_local_worker_state(db, "exited", "exited (code -9) and is restarting")
    with pytest.raises(Unavailable, match="the local worker exited"):
        _pick_worker(db, target, [], set(), liveness)
    worker_store.set_local_worker_state(db, "running")
    with pytest.raises(Unavailable, match="the local worker is starting"):
        _pick_worker(db, target, [], set(), liveness)


def test_two_dockyards_on_one_host_never_share_a_uid(server, own_server, tmp_path):
    """Each fresh instance numbers its containers from 1; their uids still differ, so one
    instance's functions can never act as the other's."""
    other = own_server("second")
    for srv, name in ((server, "lc-one"), (other, "lc-two"), (other, "lc-three")):
        srv.deploy(make_package(tmp_path, "hostile", name=name))
    mine = {server.invoke("lc-one/boot", {}).json()["uid"]}
    theirs = {other.invoke(f"{name}/boot", {}).json()["uid"] for name in ("lc-two", "lc-three")}
    assert len(theirs) == 2 and not mine & theirs
    assert not instance_uids(server.data) & instance_uids(other.data)


def test_a_worker_sweeps_what_versions_removed_while_it_was_down_left(private_tmp, tmp_path):
    """A container removed while no worker ran leaves its version folder and cached package
    file on the worker: the worker removes them when it starts (and keeps what it holds);
    a container removed while the worker runs loses its folder and cached file at once."""
    data = private_tmp / "sweep" / "data"
    data.parent.mkdir()
    first = Server(data, [])
    try:
        first.deploy(make_package(tmp_path, "echo", name="sw-gone"))
        first.deploy(make_package(tmp_path, "echo", name="sw-stay"))
    finally:
        assert first.stop() == 0
    worker_dir = data / "worker"
    cached = {p.name for p in (worker_dir / ".artifacts").iterdir()}
    assert (worker_dir / "sw-gone").is_dir() and len(cached) == 2
    # The control plane alone: the container goes while no worker runs.
    alone = Server(data, ["--no-local-worker"], workers=0)
    try:
        gone = alone.api("GET", "/api/containers/sw-gone/versions").json()["versions"][0]
        assert alone.api("DELETE", "/api/containers/sw-gone").status_code == 200
    finally:
        assert alone.stop() == 0
    assert (worker_dir / "sw-gone").is_dir()
    again = Server(data, [])
    try:
        wait_for(lambda: again.invoke("sw-stay/echo", 1).status_code == 200, 60,
                 "sw-stay to serve again")
        wait_for(lambda: not (worker_dir / "sw-gone").exists(), 30, "the sweep")
        assert {p.name for p in (worker_dir / ".artifacts").iterdir()} == cached - {
            gone["artifact_sha256"]}
        assert (worker_dir / "sw-stay").is_dir()
        stay = again.api("GET", "/api/containers/sw-stay/versions").json()["versions"][0]
        assert again.api("DELETE", "/api/containers/sw-stay").status_code == 200
        wait_for(lambda: not any((worker_dir / "sw-stay").glob("*/code")), 30,
                 "the removal of sw-stay's version folder")
        wait_for(lambda: not (worker_dir / ".artifacts" / stay["artifact_sha256"]).exists(),
                 30, "the removal of sw-stay's cached package")
    finally:
        assert again.stop() == 0



def test_serve_without_a_view_runs_functions(wheelhouse, pkg):
    """`serve --no-view` (children reach their code through host paths, as the worker's
    fallback on a host without namespaces): a data dir every uid can pass through works."""
    import shutil
    import tempfile
    from pathlib import Path
    root = Path(tempfile.mkdtemp(prefix="dockyard-noview-", dir="/tmp"))
    os.chmod(root, 0o711)
    srv = None
    try:
        srv = Server(root / "data", ["--find-links", str(wheelhouse), "--offline", "--no-view"])
        srv.deploy(pkg("echo", name="noview-echo"))
        assert srv.invoke("noview-echo/echo", {"ok": 1}).json() == {"ok": 1}
    finally:
        if srv is not None:
            assert srv.stop() == 0, srv.log_path.read_text()[-3000:]
        shutil.rmtree(root, ignore_errors=True)

"""Redeploy and rollback: a new version takes over with no failed call, the old processes are
gone afterwards, a version that cannot import never takes traffic, and rollback is instant."""

from __future__ import annotations

import threading
import time

import psutil

from conftest import container_processes


def _pids(server, container: str) -> dict[int, str]:
    """The container's function processes: pid -> version."""
    return container_processes(server.data, container)


def test_redeploy_under_load_loses_nothing(server, pkg):
    server.deploy(pkg("echo", name="rd-load", version="1"))
    v1_pids = _pids(server, "rd-load")
    assert v1_pids
    stop = threading.Event()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client():
        import requests
        session = requests.Session()
        while not stop.is_set():
            r = session.post(f"{server.url}/invoke/rd-load/echo", data="1", timeout=60)
            with lock:
                results.append((r.status_code, r.headers.get("X-Dockyard-Version", "")))

    clients = [threading.Thread(target=client) for _ in range(8)]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        server.deploy(pkg("echo", name="rd-load", version="2"))
        time.sleep(1.0)
        server.deploy(pkg("echo", name="rd-load", version="3"))
        time.sleep(1.0)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    failed = [r for r in results if r[0] != 200]
    assert len(results) > 100
    assert not failed, failed[:5]
    versions = [v for _, v in results]
    assert versions[0] == "1" and versions[-1] == "3"
    assert "2" in versions
    # Old generations drain and are terminated: their pids are gone.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in v1_pids):
        time.sleep(0.2)
    assert not [p for p in v1_pids if psutil.pid_exists(p)]
    # Version 2 drains too: in the end only version 3's process is left.
    while time.monotonic() < deadline and len(_pids(server, "rd-load")) > 1:
        time.sleep(0.2)
    left = _pids(server, "rd-load")
    assert len(left) == 1, left


def test_a_stale_call_to_a_retired_version_is_routed_again(server, pkg):
    """A call routed to the old version just before a redeploy must not start a process
    for it on the worker: the worker answers not_running and the control plane re-routes.
    Only a pinned call starts an old version on demand."""
    from dockyard.app.invoke.worker_client import WorkerConnections

    v1 = server.deploy(pkg("echo", name="rd-stale", version="1"))
    v1_pids = _pids(server, "rd-stale")
    server.deploy(pkg("echo", name="rd-stale", version="2"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in v1_pids):
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in v1_pids)
    address = server.api("GET", "/api/workers").json()["workers"][0]["address"]
    connections = WorkerConnections(server.worker_token)
    try:
        frame = {"type": "invoke", "id": "inv_stale", "version_id": v1["id"],
                 "container": "rd-stale", "version": "1", "function": "echo", "event": 1,
                 "timeout": 10.0, "trigger": "http"}
        reply = connections.request(address, frame, timeout=30)
        assert reply["status"] == "not_running", reply
        assert not [d for d in _pids(server, "rd-stale").values() if "/rd-stale/1/" in d]
        # Pinned, the same version is started on demand and answers.
        pinned = connections.request(address, dict(frame, pinned=True), timeout=60)
        assert pinned["status"] == "succeeded" and pinned["result"] == 1, pinned
    finally:
        connections.close()
    assert server.invoke("rd-stale/echo", 2).headers["X-Dockyard-Version"] == "2"


def test_same_content_is_a_noop_and_conflicting_version_is_refused(server, pkg):
    folder = pkg("echo", name="rd-same", version="1.0")
    first = server.deploy(folder)
    again = server.deploy(folder)
    assert again["created"] is False and again["version"] == first["version"]
    changed = pkg("echo", name="rd-same", version="1.0", files={"extra.py": "X = 1\n"})
    from conftest import zip_folder
    artifacts = server.data / "artifacts"
    before = sorted(p.name for p in artifacts.iterdir())
    response = server.api("POST", "/api/containers", data=zip_folder(changed))
    assert response.status_code == 409
    assert "already exists" in response.json()["error"]["message"]
    # A refused upload leaves no package file behind.
    assert sorted(p.name for p in artifacts.iterdir()) == before
    # Nor does the same content packed another way (a tar.gz instead of a zip): a no-op.
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                tf.add(path, arcname=path.relative_to(folder).as_posix())
    repacked = server.api("POST", "/api/containers", data=buf.getvalue())
    assert repacked.status_code == 200 and repacked.json()["created"] is False
    assert sorted(p.name for p in artifacts.iterdir()) == before
    # Without a version name the content hash is the version.
    unnamed = server.deploy(pkg("echo", name="rd-hash"))
    assert len(unnamed["version"]) == 12


def test_broken_version_never_takes_traffic(server, pkg):
    server.deploy(pkg("echo", name="rd-broken", version="good"))
    broken = pkg("broken_import", name="rd-broken", version="bad")
    record = server.deploy(broken, expect="failed")
    dep = record["deployment_detail"]
    assert dep["status"] == "failed"
    assert "import" in (dep["error"] or "").lower() or "Error" in (dep["error"] or "")
    assert dep["workers"][0]["state"] == "failed"
    # The whole error in the deployment's record; in the log, its first line and where the
    # rest is (what the function wrote never reads as lines of the log, escaped or not).
    assert "import this_module_does_not_exist" in dep["workers"][0]["error"], dep
    said = [line for line in server.log_path.read_text().splitlines()
            if "rd-broken@bad: giving up:" in line]
    assert said and all(line.endswith("more lines: dockyard deployments rd-broken)") and
                        "\\n" not in line for line in said), said
    ok = server.invoke("rd-broken/echo", "still good")
    assert ok.status_code == 200 and ok.headers["X-Dockyard-Version"] == "good"
    detail = server.api("GET", "/api/containers/rd-broken").json()
    assert detail["serving_version"] == "good"


def test_first_version_broken_answers_503(server, pkg):
    server.deploy(pkg("broken_import", name="rd-only-broken"), expect="failed")
    response = server.invoke("rd-only-broken/echo", {})
    assert response.status_code == 503
    assert response.headers["Retry-After"]


def test_rollback_and_pinned_calls(server, pkg):
    server.deploy(pkg("echo", name="rd-roll", version="1"))
    server.deploy(pkg("echo", name="rd-roll", version="2"))
    assert server.invoke("rd-roll/echo", 0).headers["X-Dockyard-Version"] == "2"
    pinned = server.invoke("rd-roll@1/echo", "old")
    assert pinned.status_code == 200, pinned.text
    assert pinned.json() == "old" and pinned.headers["X-Dockyard-Version"] == "1"
    assert server.invoke("rd-roll@9/echo", 0).status_code == 404
    response = server.api("POST", "/api/containers/rd-roll/activate", json={"version": "1"})
    assert response.status_code == 200
    dep = server.wait_deployment(response.json()["deployment"])
    assert dep["status"] == "ready"
    assert server.invoke("rd-roll/echo", 0).headers["X-Dockyard-Version"] == "1"
    versions = server.api("GET", "/api/containers/rd-roll/versions").json()["versions"]
    assert [v["version"] for v in versions] == ["2", "1"]
    assert [v["serving"] for v in versions] == [False, True]


def test_delete_container_stops_its_processes(server, pkg):
    server.deploy(pkg("echo", name="rd-delete"))
    assert server.invoke("rd-delete/echo", 1).status_code == 200
    pids = _pids(server, "rd-delete")
    assert pids
    assert server.api("DELETE", "/api/containers/rd-delete").status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) for p in pids)
    assert server.invoke("rd-delete/echo", 1).status_code == 404


def test_scale_to_zero(server, pkg):
    server.deploy(pkg("echo", name="rd-zero", manifest_extra="[limits]\ninstances = 0\n"))
    assert not _pids(server, "rd-zero")
    first = server.invoke("rd-zero/echo", 1)
    assert first.status_code == 200, first.text
    inv = server.api("GET", f"/api/invocations/{first.headers['X-Dockyard-Invocation-Id']}")
    assert inv.json()["cold"] is True
    assert len(_pids(server, "rd-zero")) == 1


def test_a_container_deleted_mid_call_and_deployed_again_keeps_its_code(server, pkg):
    """Deleting a container stops its version once its calls are done, then removes the
    version's folder. The same content deployed again meanwhile lives in that same folder:
    the old removal must not take the new version's code with it."""
    # Scaled to zero: the new version's process starts (and imports the code) on its first
    # call, after the old version's removal.
    folder = pkg("jobs", name="rd-again",
                 manifest_extra="[limits]\nconcurrency = 1\ninstances = 0\n")
    server.deploy(folder)
    slow = threading.Thread(target=server.invoke, args=("rd-again/slow", {"s": 3}))
    slow.start()
    time.sleep(1.0)
    assert server.api("DELETE", "/api/containers/rd-again").status_code == 200
    server.deploy(folder)
    slow.join()
    time.sleep(2)   # the old version's removal runs once its call is done
    response = server.invoke("rd-again/tick", {"n": 1})
    assert response.status_code == 200, response.text


def test_a_container_deployed_again_with_other_code_under_the_same_version_runs_the_new_code(
        server, pkg):
    """Deleted while a call still runs (its version drains), then deployed again with other
    code but the same version name: the new version must run its own code, not the folder
    of the old one."""
    def package(text):
        return pkg("jobs", name="rd-renamed", version="1.0",
                   manifest_extra="[limits]\nconcurrency = 1\n",
                   files={"which.py": f"def f(event):\n    return {text!r}\n"})
    server.deploy(package("old"))
    assert server.invoke("rd-renamed/which:f", {}).json() == "old"
    slow = threading.Thread(target=server.invoke, args=("rd-renamed/slow", {"s": 3}))
    slow.start()
    time.sleep(1.0)
    assert server.api("DELETE", "/api/containers/rd-renamed").status_code == 200
    server.deploy(package("new"))
    assert server.invoke("rd-renamed/which:f", {}).json() == "new"
    slow.join()
    time.sleep(2)   # the old version's removal, once its call is done
    assert server.invoke("rd-renamed/which:f", {}).json() == "new"

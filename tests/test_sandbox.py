"""Hostile functions against the sandbox: each must stay inside its limits, the server must
stay healthy, and nothing may be left running. Where this host cannot provide a mechanism,
the isolation summary must say so."""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest
import requests

from conftest import zip_folder


@pytest.fixture(scope="module")
def summary(server):
    return server.api("GET", "/api/workers").json()["workers"][0]["isolation"]


def _uid_processes(uid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["uids"]):
        try:
            if p.info["uids"] and p.info["uids"].real == uid:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _healthy(server) -> None:
    assert requests.get(server.url + "/healthz", timeout=10).json()["status"] == "ok"


def test_summary_covers_every_mechanism(summary):
    for key in ("session", "environment", "uid", "filesystem", "cgroups", "memory",
                "processes", "tree_kill", "network", "rlimits", "cpu_time", "interpreter"):
        assert key in summary, key
        assert summary[key]["on"] in (True, False)
        assert summary[key].get("how") or summary[key].get("why")


def test_infinite_loop_is_stopped(server, pkg):
    server.deploy(pkg("hostile", name="sb-spin"))
    started = time.monotonic()
    response = server.invoke("sb-spin/spin", {})
    assert response.status_code == 504
    assert time.monotonic() - started < 20
    assert server.invoke("sb-spin/whoami", {}).status_code == 200


def test_memory_hog_is_reported_out_of_memory(server, pkg, summary):
    server.deploy(pkg("hostile", name="sb-hog", manifest_extra="[limits]\nmemory_mb = 128\n"
                                                                "timeout_s = 30\n"))
    response = server.invoke("sb-hog/hog", {"mb": 2048})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["reason"] == "out of memory"
    inv = server.api("GET", f"/api/invocations/{response.json()['invocation_id']}").json()
    assert inv["status"] == "crashed" and inv["error"]["reason"] == "out of memory"
    _healthy(server)
    assert server.invoke("sb-hog/hog", {"mb": 10}).json() == 10 * 1024 * 1024
    if not summary["cgroups"]["on"]:
        assert "RLIMIT_AS" in summary["memory"]["how"]


def test_fork_bomb_is_bounded_and_cleaned_up(server, pkg, summary):
    assert summary["processes"]["on"], summary["processes"]
    server.deploy(pkg("hostile", name="sb-bomb", manifest_extra="[limits]\nprocesses = 16\n"))
    uid = server.invoke("sb-bomb/whoami", {}).json()["uid"]
    response = server.invoke("sb-bomb/forkbomb", {"n": 5000})
    assert response.status_code == 200, response.text
    assert 0 < response.json() < 64
    _healthy(server)
    assert server.api("DELETE", "/api/containers/sb-bomb").status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _uid_processes(uid):
        time.sleep(0.2)
    assert not _uid_processes(uid)


def test_detached_grandchild_dies_with_its_version(server, pkg, summary):
    server.deploy(pkg("hostile", name="sb-detach"))
    child = server.invoke("sb-detach/whoami", {}).json()["pid"]
    pid = server.invoke("sb-detach/detach", {}).json()
    assert psutil.pid_exists(pid)
    # It really left the child's session and tree.
    assert os.getsid(pid) != os.getsid(child)
    assert pid not in [p.pid for p in psutil.Process(child).children(recursive=True)]
    assert server.api("DELETE", "/api/containers/sb-detach").status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        time.sleep(0.2)
    if summary["tree_kill"]["how"].startswith("every process in the child's cgroup"):
        assert not psutil.pid_exists(pid)
    else:  # no cgroup on this host: the summary must admit the escape
        assert "can escape" in summary["tree_kill"]["how"]


def test_network_false_cannot_connect(server, pkg, summary):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        server.deploy(pkg("hostile", name="sb-net-on"))
        assert server.invoke("sb-net-on/connect",
                             {"host": "127.0.0.1", "port": port}).json() == "connected"
        if not summary["network"]["on"]:
            record = server.deploy(pkg("hostile", name="sb-net-off",
                                       manifest_extra="[limits]\nnetwork = false\n"),
                                   expect="failed")
            assert "network = false" in record["deployment_detail"]["error"]
            return
        server.deploy(pkg("hostile", name="sb-net-off",
                          manifest_extra="[limits]\nnetwork = false\n"))
        result = server.invoke("sb-net-off/connect", {"host": "127.0.0.1", "port": port}).json()
        assert result != "connected" and "Error" in result
    finally:
        listener.close()


def test_identity_and_filesystem(server, pkg, summary):
    if not summary["uid"]["on"]:
        pytest.skip("not root: " + summary["uid"]["why"])
    server.deploy(pkg("hostile", name="sb-fs-a"))
    server.deploy(pkg("hostile", name="sb-fs-b"))
    me = server.invoke("sb-fs-a/whoami", {}).json()
    other = server.invoke("sb-fs-b/whoami", {}).json()
    assert me["uid"] != 0 and me["uid"] != other["uid"]
    assert me["groups"] in ([], [me["gid"]])
    data = server.data

    def read(path):
        return server.invoke("sb-fs-a/read_file", {"path": str(path)}).json()

    assert read(data / "tokens" / "admin") == {"error": "PermissionError"}
    assert read(data / "tokens" / "worker") == {"error": "PermissionError"}
    assert read(data / "dockyard.db") == {"error": "PermissionError"}
    assert read(data / "dockyard.db-wal")["error"] in ("PermissionError", "FileNotFoundError")
    other_code = next((data / "worker" / "sb-fs-b").iterdir()) / "code" / "main.py"
    assert other_code.exists()
    assert read(other_code) == {"error": "PermissionError"}
    own_code = next((data / "worker" / "sb-fs-a").iterdir()) / "code" / "main.py"
    assert read(own_code)["read"] == 100
    wrote = server.invoke("sb-fs-a/write_file", {"path": str(own_code)}).json()
    assert wrote == {"error": "PermissionError"}
    tmp_file = os.path.join(me["tmp"], "scratch")
    assert server.invoke("sb-fs-a/write_file", {"path": tmp_file}).json() == {"written": True}
    env = server.invoke("sb-fs-a/environ", {}).json()
    assert "OPERATOR_SECRET" not in env and not any("TOKEN" in k for k in env)
    assert "hunter2" not in repr(env)


def test_private_tmp_is_wiped_when_the_process_ends(server, pkg):
    server.deploy(pkg("hostile", name="sb-tmp"))
    tmp = server.invoke("sb-tmp/whoami", {}).json()["tmp"]
    assert os.path.isdir(tmp)
    assert server.invoke("sb-tmp/spin", {}).status_code == 504  # kills the process
    assert not os.path.exists(tmp)
    assert server.invoke("sb-tmp/whoami", {}).json()["tmp"] != tmp


def test_hostile_uploads_write_nothing(server, tmp_path):
    import io
    import tarfile
    import zipfile

    before = {str(p) for p in server.data.rglob("*")}

    def tar_with(build) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            info = tarfile.TarInfo("dockyard.toml")
            text = b'name = "evil"\n'
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text))
            build(tf)
        return buf.getvalue()

    def link(kind, name, target):
        def build(tf):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tf.addfile(info)
        return build

    cases = {
        "symlink": tar_with(link(tarfile.SYMTYPE, "x", "../../../../etc/passwd")),
        "hardlink": tar_with(link(tarfile.LNKTYPE, "x", "/etc/passwd")),
        "absolute": tar_with(lambda tf: tf.addfile(tarfile.TarInfo("/tmp/evil"))),
    }
    for name, body in cases.items():
        response = server.api("POST", "/api/containers", data=body)
        assert response.status_code == 400, (name, response.text)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dockyard.toml", 'name = "bomb"\n')
        with zf.open("zeros", "w", force_zip64=True) as member:
            for _ in range(520):
                member.write(b"\0" * (1 << 20))
    response = server.api("POST", "/api/containers", data=bomb.getvalue())
    assert response.status_code == 413 and "unpacks to" in response.json()["error"]["message"]
    assert not os.path.exists("/tmp/evil")
    after = {str(p) for p in server.data.rglob("*")}
    new = {p for p in after - before if "/uploads/" not in p and "dockyard.db" not in p}
    assert not [p for p in new if "evil" in p or "bomb" in p]
    assert not list((server.data / "uploads").iterdir())

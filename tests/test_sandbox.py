"""Hostile functions against the sandbox: each must stay inside its limits, the server must
stay healthy, and nothing may be left running. Where this host cannot provide a mechanism,
the isolation summary must say so."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from conftest import zip_folder


VIEW_ROOT = {"bin", "dev", "dockyard", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root",
             "sbin", "tmp", "usr", "var"}


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
    for key in ("view", "pid_namespace", "ipc_namespace", "session", "environment", "uid",
                "filesystem", "cgroups", "memory", "processes", "cpu_share", "tree_kill",
                "network", "rlimits", "cpu_time", "interpreter"):
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


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGSEGV"])
def test_a_function_killed_by_a_signal_is_said_so_and_shows_nothing_of_the_sandbox(
        server, pkg, signame):
    name = f"sb-{signame.lower()}"
    server.deploy(pkg("hostile", name=name))
    response = server.invoke(f"{name}/kill_self", {"signal": signame})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "Crashed" and f"killed by {signame}" in error["message"], error
    inv = server.api("GET", f"/api/invocations/{response.json()['invocation_id']}").json()
    assert inv["status"] == "crashed" and inv["stdout"] == "about to go\n", inv
    # The function's own words only: nothing of the processes around it.
    assert "Traceback" not in inv["stderr"] and "launch.py" not in inv["stderr"], inv
    assert "dockyard" not in inv["stderr"], inv
    # No report came from the process: nothing is said of a cold start either way.
    assert inv["cold"] is None and "cold start: -" in server.cli("logs", inv["id"]).stdout
    assert server.invoke(f"{name}/whoami", {}).status_code == 200


@pytest.mark.parametrize("code", [150, 160, 161])
def test_an_exit_code_the_sandbox_reads_as_a_signal_shows_nothing_of_it(server, pkg, code):
    """128 + n is how the sandbox's pid 1 passes on a signal n: a function's own exit code
    of that shape (a stop signal, or one of the C library's reserved ones) is its code."""
    name = f"sb-exit-{code}"
    server.deploy(pkg("hostile", name=name))
    response = server.invoke(f"{name}/exit_with", {"code": code})
    assert response.status_code == 502, response.text
    inv = server.api("GET", f"/api/invocations/{response.json()['invocation_id']}").json()
    assert inv["status"] == "crashed" and inv["stdout"] == "leaving\n", inv
    assert "Traceback" not in inv["stderr"] and "launch.py" not in inv["stderr"], inv
    assert server.invoke(f"{name}/whoami", {}).status_code == 200


def test_memory_hog_is_reported_out_of_memory(server, pkg, summary):
    server.deploy(pkg("hostile", name="sb-hog", manifest_extra="[limits]\nmemory_mb = 128\n"
                                                                "timeout_s = 30\n"))
    response = server.invoke("sb-hog/hog", {"mb": 2048})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["reason"] == "out of memory"
    inv = server.api("GET", f"/api/invocations/{response.json()['invocation_id']}").json()
    assert inv["status"] == "crashed" and inv["error"]["reason"] == "out of memory"
    assert "Traceback" not in inv["stderr"] and "launch.py" not in inv["stderr"], inv
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
    uid = server.invoke("sb-detach/boot", {}).json()["uid"]
    pid = server.invoke("sb-detach/detach", {}).json()
    # It really left the call's process tree, and lives on.
    assert str(pid) in server.invoke("sb-detach/processes", {}).json()
    assert len(_uid_processes(uid)) >= 2
    assert server.api("DELETE", "/api/containers/sb-detach").status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _uid_processes(uid):
        time.sleep(0.2)
    assert not _uid_processes(uid)


def test_network_false_cannot_connect(server, pkg, summary):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        server.deploy(pkg("hostile", name="sb-net-on"))
        reached = server.invoke("sb-net-on/connect", {"host": "127.0.0.1", "port": port}).json()
        # network = true has a namespace of its own where pasta is installed (the host's
        # loopback is out of reach, see test_network.py); else it shares the host's.
        if summary["network_true"]["on"]:
            assert reached != "connected" and "Error" in reached
        else:
            assert reached == "connected"
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
    assert me["cwd"] == "/dockyard/code" and me["tmp"] == "/tmp"
    data = server.data
    other_code = next((data / "worker" / "sb-fs-b").iterdir()) / "code" / "main.py"
    assert other_code.exists()
    # Nothing of the data dir exists in the view: not the tokens, not the database, not
    # another container's code, not even the data dir's folder.
    seen = server.invoke("sb-fs-a/exists", {"paths": [
        str(data), str(data / "tokens" / "admin"), str(data / "tokens" / "worker"),
        str(data / "dockyard.db"), str(other_code), str(Path.home()), "/home",
        "/dockyard/code/main.py", "/dockyard/venv/bin/python"]}).json()
    assert seen.pop("/dockyard/code/main.py") and seen.pop("/dockyard/venv/bin/python")
    assert not any(seen.values()), seen
    root = server.invoke("sb-fs-a/listdir", {"path": "/"}).json()
    assert set(root) <= VIEW_ROOT, root
    assert server.invoke("sb-fs-a/read_file", {"path": "/dockyard/code/main.py"}).json()[
        "read"] == 100
    for path in ("/dockyard/code/main.py", "/dockyard/venv/pyvenv.cfg", "/usr/pwned",
                 "/etc/pwned", "/pwned"):
        assert server.invoke("sb-fs-a/write_file", {"path": path}).json()["error"] in (
            "PermissionError", "OSError"), path
    env = server.invoke("sb-fs-a/environ", {}).json()
    assert "OPERATOR_SECRET" not in env and not any("TOKEN" in k for k in env)
    assert "hunter2" not in repr(env)


def test_proc_shows_only_the_functions_own_processes(server, pkg):
    server.deploy(pkg("hostile", name="sb-proc"))
    seen = server.invoke("sb-proc/processes", {}).json()
    # pid 1 is the namespace's init, pid 2 the function's process: nothing of the host.
    assert set(seen) == {"1", "2"}, seen
    assert "bootstrap" in seen["2"]
    everything = " ".join(seen.values())
    for secret in (server.worker_token, server.admin, "gunicorn", "dockyard serve",
                   str(server.data)):
        assert secret not in everything
    # And the host's process list holds no token either.
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        assert server.worker_token not in cmdline and server.admin not in cmdline


def test_tmp_and_shm_are_private_and_die_with_the_process(server, pkg):
    server.deploy(pkg("hostile", name="sb-tmp-a"))
    server.deploy(pkg("hostile", name="sb-tmp-b"))
    host_tmp = Path(tempfile.mkdtemp(prefix="dockyard-host-"))
    try:
        for path in ("/tmp/secret", "/dev/shm/secret", "/var/tmp/secret"):
            assert server.invoke("sb-tmp-a/write_text",
                                 {"path": path, "text": "a"}).json() == {"written": True}
            assert server.invoke("sb-tmp-a/read_text", {"path": path}).json() == {"text": "a"}
            assert server.invoke("sb-tmp-b/exists", {"paths": [path]}).json()[path] is False
        assert not os.path.exists("/tmp/secret") and not os.path.exists("/dev/shm/secret")
        assert server.invoke("sb-tmp-b/exists", {"paths": [str(host_tmp)]}).json()[
            str(host_tmp)] is False
        before = server.invoke("sb-tmp-a/boot", {}).json()["boot"]
        assert server.invoke("sb-tmp-a/spin", {}).status_code == 504  # kills the process
        assert server.invoke("sb-tmp-a/boot", {}).json()["boot"] != before
        assert not any(server.invoke("sb-tmp-a/exists", {
            "paths": ["/tmp/secret", "/dev/shm/secret"]}).json().values())
    finally:
        shutil.rmtree(host_tmp)


def test_sysv_shared_memory_dies_with_the_process(server, pkg):
    server.deploy(pkg("hostile", name="sb-ipc-a"))
    server.deploy(pkg("hostile", name="sb-ipc-b"))
    assert server.invoke("sb-ipc-a/sysv_shm", {"create": True}).json() == {"segments": 1}
    assert server.invoke("sb-ipc-b/sysv_shm", {}).json() == {"segments": 0}
    with open("/proc/sysvipc/shm") as f:
        assert not any(line.split()[0] == str(0x0D0C) for line in f.read().splitlines()[1:])
    assert server.invoke("sb-ipc-a/spin", {}).status_code == 504
    assert server.invoke("sb-ipc-a/sysv_shm", {}).json() == {"segments": 0}


def test_tmp_mb_stops_a_disk_filling_function(server, pkg):
    server.deploy(pkg("hostile", name="sb-fill", manifest_extra="[limits]\ntmp_mb = 16\n"
                                                                 "memory_mb = 256\n"))
    for path in ("/tmp/big", "/dev/shm/big"):
        result = server.invoke("sb-fill/fill", {"path": path, "max_mb": 200}).json()
        assert result["error"] == "OSError" and result["written_mb"] <= 16, result
    _healthy(server)


def test_cpu_budget_cannot_be_lifted(server, pkg, summary):
    server.deploy(pkg("hostile", name="sb-cpu", manifest_extra="[limits]\ntimeout_s = 2\n"))
    first = server.invoke("sb-cpu/boot", {}).json()
    burning = [p for p in _uid_processes(first["uid"]) if "bootstrap" in " ".join(p.cmdline())]
    assert len(burning) == 1
    result = server.invoke("sb-cpu/lift_cpu", {}).json()
    if "RLIMIT_CPU set from outside" in summary["cpu_time"]["how"]:
        assert result["lifted"] != "infinity", result   # the hard limit was set from outside
    # The thread it left burning (no call comes in to give it a new budget) is stopped once
    # it used the call's budget, however the function tried to lift its limit.
    gone, _ = psutil.wait_procs(burning, timeout=60)
    assert gone, "the process kept burning CPU past its budget"
    assert server.invoke("sb-cpu/boot", {}).json()["boot"] != first["boot"]


def test_cpus_holds_a_spinning_function_near_its_share(server, pkg, summary):
    if not summary["cpu_share"]["on"]:
        pytest.skip(summary["cpu_share"]["why"])
    server.deploy(pkg("hostile", name="sb-share", manifest_extra="[limits]\ncpus = 0.5\n"
                                                                  "timeout_s = 20\n"))
    result = server.invoke("sb-share/burn", {"threads": 2, "seconds": 3}).json()
    assert result["cpu_s"] / result["wall_s"] < 0.7, result


def test_deleted_containers_uid_is_never_given_again(server, pkg):
    server.deploy(pkg("hostile", name="sb-uid"))
    first = server.invoke("sb-uid/boot", {}).json()["uid"]
    assert server.api("DELETE", "/api/containers/sb-uid").status_code == 200
    server.deploy(pkg("hostile", name="sb-uid-next"))
    server.deploy(pkg("hostile", name="sb-uid"))
    again = server.invoke("sb-uid/boot", {}).json()["uid"]
    following = server.invoke("sb-uid-next/boot", {}).json()["uid"]
    assert len({first, again, following}) == 3


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


def test_a_dependencys_build_code_runs_in_the_sandbox(server, pkg, summary):
    """Installing dependencies runs their authors' code (build backends): it runs as the
    container's uid, in a view without the data dir, the tokens or the operator's variables."""
    data = server.data
    folder = pkg("evilbuild", name="sb-build", files={"evilpkg/secrets.txt": "\n".join([
        str(data / "tokens" / "admin"), str(data / "dockyard.db"), str(data)])})
    record = server.deploy(folder, expect="failed")
    log = record["deployment_detail"]["workers"][0]["log"]
    reports = [line for line in log.splitlines() if "RuntimeError: BUILDREPORT" in line]
    assert reports, log
    report = reports[0]
    assert "uid=" in report and "uid=0 " not in report, report
    assert "False" in report and "True" not in report, report
    assert "OPERATOR_SECRET" not in report


def test_a_forked_process_burning_cpu_after_the_call_is_stopped(server, pkg, summary):
    """The CPU budget counts the whole process tree (its cgroup), not only the function's
    own process: a burner it forked and left behind is stopped too."""
    if "whole process tree" not in summary["cpu_time"]["how"]:
        pytest.skip(summary["cpu_time"]["how"])
    server.deploy(pkg("hostile", name="sb-forkburn", manifest_extra="[limits]\ntimeout_s = 2\n"))
    uid = server.invoke("sb-forkburn/boot", {}).json()["uid"]
    assert server.invoke("sb-forkburn/fork_burn", {}).json() == "forked"
    tree = _uid_processes(uid)
    assert len(tree) >= 3   # init, the function's process, the burner
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    assert server.invoke("sb-forkburn/boot", {}).status_code == 200


def test_a_reply_that_is_not_a_reply_kills_the_process_and_nothing_shifts(server, pkg):
    server.deploy(pkg("hostile", name="sb-badreply"))
    worker = next(p for p in psutil.Process(server.proc.pid).children(recursive=True)
                  if " worker " in " ".join(p.cmdline()))
    rss_before = worker.memory_info().rss
    for mode in ("garbage", "huge"):
        before = server.invoke("sb-badreply/boot", {}).json()["boot"]
        response = server.invoke("sb-badreply/bad_reply", {"mode": mode})
        assert response.status_code == 502, response.text
        assert "reply protocol" in response.json()["error"]["message"]
        # The next call gets its own answer from a fresh process, not a leftover frame.
        after = server.invoke("sb-badreply/boot", {}).json()
        assert after["boot"] != before and after["uid"]
    # A 64 MB announcement was never read into the worker's memory.
    assert worker.memory_info().rss - rss_before < 32 * 1024 * 1024


def test_user_namespaces_and_keyrings_are_refused(server, pkg, summary):
    """A user namespace would give the function every capability inside it (mounts, raw
    sockets, nf_tables: the road to kernel exploits), and a key written to the user keyring
    would outlive the process: the seccomp filter refuses both."""
    if not summary["syscalls"]["on"]:
        pytest.skip(summary["syscalls"]["why"])
    server.deploy(pkg("hostile", name="sb-seccomp"))
    before = server.invoke("sb-seccomp/boot", {}).json()
    result = server.invoke("sb-seccomp/kernel_escape", {})
    assert result.status_code == 200, result.text
    assert result.json() == {"unshare": "EPERM", "add_key": "EPERM"}
    assert server.invoke("sb-seccomp/boot", {}).json() == before   # the same process, unharmed
    _healthy(server)

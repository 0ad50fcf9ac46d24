"""Unit tests of the sandbox's pure pieces: the host-wide uid registry, the view spec, the
summary when namespaces are not available, and the launcher run for real on one command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dockyard.common.manifest import Limits
from dockyard.sandbox.isolation import Isolation, run_sandboxed
from dockyard.sandbox.uids import UidRegistry
from dockyard.sandbox.view import BOOTSTRAP, CODE, VENV, HostLayout, passwd, sandbox_spec


def test_uids_are_allocated_once_and_never_reused(tmp_path):
    registry = UidRegistry(tmp_path / "uids.json", base=300_000)
    first = registry.uid_for("inst.1.100")
    assert registry.uid_for("inst.1.100") == first
    # The same container id made again later (after a delete) is another container.
    second = registry.uid_for("inst.1.200")
    assert second != first
    # Another registry object on the same file (another worker on this host) agrees, and
    # continues the same counter.
    other = UidRegistry(tmp_path / "uids.json", base=300_000)
    assert other.uid_for("inst.1.100") == first
    assert other.uid_for("other-instance.1.100") not in (first, second)


def test_uids_skip_real_accounts_and_survive_a_damaged_registry(tmp_path):
    registry = UidRegistry(tmp_path / "uids.json", base=0)
    uid = registry.uid_for("a")
    assert uid > 0   # uid 0 (root) and every account in /etc/passwd are skipped
    (tmp_path / "uids.json").write_text("{broken")
    again = UidRegistry(tmp_path / "uids.json", base=0).uid_for("b")
    assert again > uid   # never restarts from the base over what it may have handed out


def test_concurrent_allocations_never_collide(tmp_path):
    path = tmp_path / "uids.json"
    got: list[int] = []
    lock = threading.Lock()

    def allocate(n):
        uid = UidRegistry(path, base=400_000).uid_for(f"key-{n}")
        with lock:
            got.append(uid)

    threads = [threading.Thread(target=allocate, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 20
    assert len(json.loads(path.read_text())["uids"]) == 20


def test_the_view_spec_holds_only_what_python_needs(tmp_path):
    layout = HostLayout.probe([sys.executable])
    spec = sandbox_spec(layout, root=tmp_path, code=tmp_path / "code", venv=tmp_path / "venv",
                        bootstrap=tmp_path / "b.py", uid=250_000, gid=250_000, tmp_mb=64,
                        network=False, rlimits={}, env={"A": "1"})
    targets = {target for _, target, _ in spec["binds"]}
    assert {CODE, VENV, BOOTSTRAP, "/usr", "/dev/null"} <= targets
    assert not any(t.startswith(("/home", "/var/lib", "/tmp", "/proc", "/sys")) for t in targets)
    assert all(kind in ("ro", "dev") for _, _, kind in spec["binds"])
    assert spec["env"]["HOME"] == spec["env"]["TMPDIR"] == "/tmp" and spec["env"]["A"] == "1"
    assert spec["network"] is False and spec["cwd"] == CODE
    accounts = passwd(250_000, 250_000)["/etc/passwd"]
    assert "250000" in accounts and "root:" in accounts and len(accounts.splitlines()) == 3


def test_summary_without_namespaces_says_what_is_missing():
    isolation = Isolation(drop_privileges=False)
    isolation.view_note = "the worker does not run as root, so it cannot build namespaces"
    summary = isolation.summary()
    for key in ("view", "pid_namespace", "ipc_namespace"):
        assert summary[key]["on"] is False and "root" in summary[key]["why"]
    assert "can lift" in summary["cpu_time"]["how"]
    limits = Limits()
    assert "RLIMIT_CPU" not in isolation.rlimits(limits)


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root here")
def test_the_launcher_runs_a_command_in_a_view(tmp_path):
    layout = HostLayout.probe()
    assert run_sandboxed(layout, ["/bin/true"], network=False) is None
    reason = run_sandboxed(layout, ["/bin/sh", "-c", "exit 3"], network=True)
    assert reason == "exit code 3"
    # A folder that is not in the view does not exist there.
    outside = tmp_path / "outside"
    outside.mkdir()
    assert run_sandboxed(layout, ["/bin/sh", "-c", f"test ! -e {outside}"], network=True) is None
    assert run_sandboxed(layout, ["/bin/sh", "-c", "test $(id -u) = 65534"],
                         network=True) is None


def test_a_cpu_budget_catches_a_process_burning_past_it():
    from dockyard.runner.cpu_budget import CpuBudget
    burner = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        budget, quiet = CpuBudget(burner.pid, 0.1, False), CpuBudget(idle.pid, 0.1, False)
        assert not budget.exceeded()          # nothing armed yet
        budget.arm()
        quiet.arm()
        assert budget.allowed > 1 and not budget.exceeded()
        deadline = time.monotonic() + 60
        while not budget.exceeded() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert budget.exceeded() and budget.used() > budget.allowed
        assert not quiet.exceeded()
        budget.close()
        quiet.close()
    finally:
        for proc in (burner, idle):
            proc.kill()
            proc.wait()


def test_spare_launchers_are_handed_out_and_replaced():
    from dockyard.runner.spares import Spares
    spares = Spares()
    spares.refill()
    deadline = time.monotonic() + 30
    while not spares.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    spare = spares.ready[0]
    taken = spares.take()
    try:
        assert taken is spare and taken.popen.poll() is None   # started, waiting for a spec
        while not spares.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spares.ready and spares.ready[0] is not taken    # the next one is started
        # A spare that died is never handed out.
        spares.ready[0].popen.kill()
        spares.ready[0].popen.wait()
        fresh = spares.take()
        assert fresh.popen.poll() is None
        fresh.discard()
    finally:
        taken.discard()
        waiting = list(spares.ready)
        spares.close()
    assert all(launcher.popen.poll() is not None for launcher in waiting)


def test_uids_skip_ranges_delegated_in_subuid(tmp_path, monkeypatch):
    from dockyard.sandbox import uids
    monkeypatch.setattr(uids, "_delegated", lambda: [(500_000, 65_536)])
    uid = UidRegistry(tmp_path / "uids.json", base=500_000).uid_for("k")
    assert uid >= 565_536


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root here")
def test_without_network_loopback_still_works():
    layout = HostLayout.probe()
    program = ("import socket\n"
               "server = socket.create_server(('127.0.0.1', 0))\n"
               "client = socket.create_connection(server.getsockname())\n"
               "client.sendall(b'ok')\n"
               "assert server.accept()[0].recv(2) == b'ok'\n"
               "try:\n"
               "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
               "    raise SystemExit('reached the outside')\n"
               "except OSError:\n"
               "    pass\n")
    assert run_sandboxed(layout, ["/usr/bin/python3", "-I", "-c", program],
                         network=False) is None

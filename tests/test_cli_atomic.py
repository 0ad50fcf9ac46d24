"""deploy --wait and rollback are atomic for their user: a deployment that fails, or that no
worker can take, leaves the version that was active active, and the CLI says in one line what
happened and what serves now. A 401 names the token files involved."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dockyard.app.datadir import DataDir

MISSING = "dockyard-no-such-distribution"   # not in the wheelhouse: the build fails offline
BROKEN = f'dependencies = ["{MISSING}"]\n'


def error_line(done) -> str:
    """The error a command ended with: its last stderr line, after any progress lines."""
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[-1]


def container(server, name: str) -> dict:
    return server.api("GET", f"/api/containers/{name}").json()


def test_deploy_whose_build_fails_leaves_the_previous_version_active(server, pkg):
    server.cli("deploy", str(pkg("echo", name="at-build", version="1")), "--wait")
    broken = pkg("echo", name="at-build", version="2", manifest_extra=BROKEN)
    done = server.cli("deploy", str(broken), "--wait", check=False)
    assert done.returncode == 1
    line = error_line(done)
    assert line.startswith("Error: at-build@2 failed to deploy: "), line
    assert MISSING in line, line
    assert line.endswith("; still serving at-build@1 (the new version is stored; see dockyard "
                         "deployments at-build)"), line
    detail = container(server, "at-build")
    assert detail["active_version"] == "1" and detail["serving_version"] == "1"
    versions = json.loads(server.cli("versions", "at-build", "--json").stdout)["versions"]
    assert [v["version"] for v in versions] == ["2", "1"]
    assert [(v["active"], v["serving"]) for v in versions] == [(False, False), (True, True)]
    assert server.invoke("at-build/echo", 1).headers["X-Dockyard-Version"] == "1"
    # --json: the record says the new version is neither active nor serving.
    again = server.cli("deploy", str(broken), "--wait", "--json", check=False)
    assert again.returncode == 1
    record = json.loads(again.stdout)
    assert record["deployment"]["status"] == "failed"
    assert record["active"] is False and record["serving"] is False
    assert container(server, "at-build")["active_version"] == "1"


def test_rollback_that_fails_changes_nothing_and_each_deployment_has_its_own_log(server, pkg):
    first = json.loads(server.cli("deploy", str(pkg("echo", name="at-roll", version="1")),
                                  "--wait", "--json").stdout)["deployment"]
    server.cli("deploy", str(pkg("echo", name="at-roll", version="2")), "--wait")
    broken = pkg("echo", name="at-roll", version="3", manifest_extra=BROKEN)
    server.cli("deploy", str(broken), "--no-activate")

    done = server.cli("rollback", "at-roll", "3", check=False)
    assert done.returncode == 1
    line = error_line(done)
    assert line.startswith("Error: rollback to at-roll@3 failed: ") and MISSING in line, line
    assert "nothing changed: at-roll@2 is still active and serving" in line, line
    detail = container(server, "at-roll")
    assert detail["active_version"] == "2" and detail["serving_version"] == "2"

    rolled = server.cli("rollback", "at-roll", "1")
    assert "at-roll now serves 1" in rolled.stdout
    assert server.invoke("at-roll/echo", 0).headers["X-Dockyard-Version"] == "1"
    latest = json.loads(server.cli("deployments", "at-roll", "--json").stdout)
    assert latest["version"] == "1" and latest["id"] != first["id"]
    first_log = first["workers"][0]["log"].splitlines()
    assert any("fetching package" in x for x in first_log), first_log
    log = latest["workers"][0]["log"].splitlines()
    assert log, latest
    # Only lines written for the rollback: none of the first deployment's, none of the
    # failed attempt's.
    assert not set(log) & set(first_log), (log, first_log)
    assert not any(MISSING in x for x in log), log
    # The first deployment still shows its own log.
    again = json.loads(server.cli("deployments", first["id"], "--json").stdout)
    assert again["workers"][0]["log"].splitlines()[:len(first_log)] == first_log


def test_rollback_that_times_out_says_what_it_left(server, pkg):
    server.cli("deploy", str(pkg("echo", name="at-slow", version="1")), "--wait")
    slow = pkg("echo", name="at-slow", version="2",
               files={"slow.py": "import time\ntime.sleep(15)\n\ndef f(event):\n    return event\n"},
               manifest_extra='[functions]\nslow = "slow:f"\n')
    server.cli("deploy", str(slow), "--no-activate")
    done = server.cli("rollback", "at-slow", "2", "--timeout", "2", check=False)
    assert done.returncode == 1
    line = error_line(done)
    assert re.match(r"Error: stopped waiting for at-slow@2 \(deployment dep_[0-9a-f]+\): it is "
                    r"still (pending|in_progress) after 2s; at-slow@2 is active and takes over "
                    r"once a worker has it ready; at-slow@1 serves until then \(see dockyard "
                    r"deployments at-slow\)$", line), line
    detail = container(server, "at-slow")
    assert detail["active_version"] == "2" and detail["serving_version"] == "1"
    assert server.invoke("at-slow/echo", 0).headers["X-Dockyard-Version"] == "1"


# -- a server with no worker, started in a folder of its own --------------------------------

def cli_env(state: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
    env["XDG_STATE_HOME"] = str(state)   # where serve leaves its note, and the CLI looks
    return env


def run(folder: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockyard", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def lone_server(private_tmp, tmp_path):
    """`dockyard --data other serve --no-local-worker` in a folder that also holds a stale
    ./.dockyard from an earlier run."""
    folder = private_tmp / f"lone-{tmp_path.name}"
    folder.mkdir()
    DataDir(folder / ".dockyard").ensure()      # an earlier run's tokens, no server
    env = cli_env(tmp_path / "state")
    proc = subprocess.Popen([sys.executable, "-m", "dockyard", "--data", "other", "serve",
                             "--port", "0", "--no-local-worker", "--no-deploy-dir"],
                            cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"dockyard listening on (http://\S+)", line)
        assert match, line
        yield folder, env, match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not list((tmp_path / "state" / "dockyard" / "servers").glob("*.json"))


def test_without_a_worker_rollback_changes_nothing_and_deploy_says_what_it_left(
        lone_server, pkg):
    folder, env, _ = lone_server
    # Found by the note serve left: ./.dockyard is stale, the server runs from ./other.
    first = run(folder, env, "deploy", str(pkg("echo", name="at-lone", version="1")))
    assert first.returncode == 0, first.stderr
    run(folder, env, "deploy", str(pkg("echo", name="at-lone", version="2")), "--no-activate")
    done = run(folder, env, "rollback", "at-lone", "2")
    assert done.returncode == 1
    assert error_line(done).startswith("Error: Unavailable: no worker is connected to deploy "
                                       "at-lone@2; nothing changed (at-lone@1 stays active)")
    listing = json.loads(run(folder, env, "ls", "--json").stdout)["containers"]
    assert listing[0]["active_version"] == "1"
    waited = run(folder, env, "deploy", str(pkg("echo", name="at-lone", version="3")), "--wait",
                 "--timeout", "1")
    assert waited.returncode == 1
    assert re.fullmatch(r"Error: stopped waiting for at-lone@3 \(deployment dep_[0-9a-f]+\): no "
                        r"worker is connected to take it; at-lone@3 is active and takes over "
                        r"once a worker has it ready \(see dockyard deployments at-lone\)",
                        error_line(waited)), waited.stderr
    # No worker: a call runs nothing, and the answer carries no invocation id.
    call = run(folder, env, "invoke", "at-lone/echo", "1")
    assert call.returncode == 1 and "no worker is connected" in call.stderr
    assert "dockyard logs" not in call.stderr and "inv_" not in call.stderr


def test_a_401_names_the_token_files(lone_server):
    folder, env, url = lone_server
    served = folder / "other" / "tokens" / "admin"
    stale = folder / ".dockyard" / "tokens" / "admin"
    done = run(folder, env, "ls", "--url", url, "--data", ".dockyard")
    assert done.returncode == 1
    line = error_line(done)
    assert "<data>" not in line
    assert line.startswith(f"Error: Unauthorized: wrong token: not a token of this server (its "
                           f"admin token is in {served}); the CLI sent the token in {stale}; "
                           "point it at the server's data dir with --data DIR or DOCKYARD_HOME"), line
    missing = run(folder, env, "ls", "--url", url, "--data", "nowhere")
    assert f"the CLI sent no token ({folder / 'nowhere' / 'tokens' / 'admin'} does not exist)" \
        in error_line(missing)
    # --data or DOCKYARD_HOME naming the server's data dir works; so does nothing at all.
    assert run(folder, env, "ls", "--url", url, "--data", "other").returncode == 0
    assert run(folder, dict(env, DOCKYARD_HOME="other"), "ls").returncode == 0
    assert run(folder, env, "ls").returncode == 0


def test_a_note_is_trusted_only_for_the_very_process_that_left_it(tmp_path, monkeypatch):
    """A note whose pid now belongs to another process (the server was killed and the pid
    reused) names no server: the CLI must not send a data dir's token to whatever listens at
    its URL now. Nor is a note trusted in a folder others can write to."""
    from dockyard.app import datadir
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = datadir.servers_dir()
    folder.mkdir(parents=True, mode=0o700)
    note = {"url": "http://127.0.0.1:1", "data": str(tmp_path / "data"), "pid": os.getpid(),
            "cwd": str(tmp_path)}
    (folder / "mine.json").write_text(json.dumps(dict(
        note, pid_start=datadir.process_start(os.getpid()))))
    (folder / "reused.json").write_text(json.dumps(dict(note, pid_start=1)))
    assert [n["pid_start"] for n in datadir.running_servers(tmp_path)] == [
        datadir.process_start(os.getpid())]
    assert not (folder / "reused.json").exists()   # removed as stale
    folder.chmod(0o777)
    assert datadir.running_servers(tmp_path) == []
    assert datadir.record_server("http://x", tmp_path, os.getpid()) is None

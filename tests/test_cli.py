"""The CLI as a user runs it: every verb, human and --json output, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_init_deploy_invoke_logs(server, tmp_path):
    folder = tmp_path / "cli-hello"
    done = subprocess.run([sys.executable, "-m", "dockyard", "init", str(folder)],
                          capture_output=True, text=True, check=True)
    assert "created" in done.stdout
    assert (folder / "dockyard.toml").exists() and (folder / "main.py").exists()
    deployed = server.cli("deploy", str(folder), "--wait")
    assert "cli-hello@" in deployed.stdout and "ready" in deployed.stdout
    assert "ready" in deployed.stderr  # progress lines
    out = server.cli("invoke", "cli-hello/hello", '{"who": "cli"}')
    body = json.loads(out.stdout)
    assert body["message"] == "hello, cli"
    logs = server.cli("logs", body["invocation"])
    assert "succeeded" in logs.stdout and "REPORT duration" in logs.stdout
    assert "cold start: yes" in logs.stdout
    as_json = json.loads(server.cli("--json", "logs", body["invocation"]).stdout)
    assert as_json["status"] == "succeeded" and as_json["output"]["message"] == "hello, cli"


def test_ls_versions_rollback_workers(server, pkg):
    v1 = pkg("echo", name="cli-roll", version="1")
    v2 = pkg("echo", name="cli-roll", version="2")
    server.cli("deploy", str(v1), "--wait")
    server.cli("deploy", str(v2), "--wait")
    listing = server.cli("ls").stdout
    assert "cli-roll" in listing and "NAME" in listing
    data = json.loads(server.cli("--json", "ls").stdout)
    entry = next(c for c in data["containers"] if c["name"] == "cli-roll")
    assert entry["serving_version"] == "2" and entry["versions"] == 2
    versions = server.cli("versions", "cli-roll").stdout
    assert "serving" in versions.splitlines()[1] and versions.splitlines()[1].startswith("2")
    rolled = server.cli("rollback", "cli-roll", "1")
    assert "now serves 1" in rolled.stdout
    out = server.cli("--json", "invoke", "cli-roll/echo", '"x"')
    assert json.loads(out.stdout) == "x"
    workers = server.cli("workers").stdout
    assert "wrk_" in workers and "cli-roll@1:ready" in workers
    workers_json = json.loads(server.cli("--json", "workers").stdout)
    assert workers_json["workers"][0]["isolation"]


def test_deploy_archive_formats(server, pkg, tmp_path):
    import tarfile
    folder = pkg("echo", name="cli-tar", version="t1")
    archive = tmp_path / "cli-tar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cli-tar")
    out = server.cli("--json", "deploy", str(archive), "--wait")
    assert json.loads(out.stdout)["deployment"]["status"] == "ready"
    assert json.loads(server.cli("invoke", "cli-tar/echo", "5").stdout) == 5


def test_errors_are_one_line(server, tmp_path):
    bad = server.cli("invoke", "nothere/fn", "{}", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "nothere" in bad.stderr
    bad_json = server.cli("invoke", "nothere/fn", "{oops", check=False)
    assert bad_json.returncode != 0 and "not valid JSON" in bad_json.stderr
    missing = server.cli("deploy", str(tmp_path / "nope"), check=False)
    assert missing.returncode != 0 and "no such file" in missing.stderr
    no_manifest = tmp_path / "empty"
    no_manifest.mkdir()
    (no_manifest / "x.py").write_text("")
    refused = server.cli("deploy", str(no_manifest), check=False)
    assert refused.returncode != 0 and "dockyard.toml" in refused.stderr
    assert "Traceback" not in refused.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "dockyard", "--url", "http://127.0.0.1:9", "ls"],
        capture_output=True, text=True)
    assert unreachable.returncode != 0 and "cannot reach dockyard" in unreachable.stderr


def test_the_listening_socket_gives_every_connection_tcp_nodelay():
    """serve binds before gunicorn starts; a connection accepted in between must not wait for
    delayed ACKs (gunicorn sets TCP_NODELAY only on sockets it accepts itself)."""
    import socket

    from dockyard.cli.serve import ServeOptions, Supervisor

    supervisor = Supervisor.__new__(Supervisor)
    supervisor.options = ServeOptions(port=0)
    listener = supervisor._bind()
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client = socket.create_connection(listener.getsockname()[:2])
        accepted, _ = listener.accept()
        try:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            accepted.close()
            client.close()
    finally:
        listener.close()


def test_global_options_after_the_verb(server, private_tmp):
    import os
    import signal

    assert "containers" in json.loads(server.cli("ls", "--json").stdout)
    assert "jobs" in json.loads(server.cli("jobs", "ls", "--json").stdout)
    assert "jobs" in json.loads(server.cli("--json", "jobs", "ls").stdout)
    # --data after the verb: the URL and token come from that data dir.
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKYARD_URL", "DOCKYARD_TOKEN")}
    listing = subprocess.run([sys.executable, "-m", "dockyard", "workers", "--data",
                              str(server.data), "--json"], capture_output=True, text=True,
                             env=env)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["workers"]
    # --url after the verb wins over DOCKYARD_URL.
    unreachable = server.cli("ls", "--url", "http://127.0.0.1:9", check=False)
    assert unreachable.returncode != 0 and "cannot reach dockyard" in unreachable.stderr
    # `serve --data DIR` serves from DIR.
    data = private_tmp / "serve-data-after-verb"
    proc = subprocess.Popen([sys.executable, "-m", "dockyard", "serve", "--data", str(data),
                             "--port", "0", "--no-local-worker", "--no-deploy-dir"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert "dockyard listening on" in line, line
        assert (data / "tokens" / "admin").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_invoke_async_prints_the_id_alone(server, pkg):
    server.cli("deploy", str(pkg("echo", name="cli-async", version="1")), "--wait")
    out = server.cli("invoke", "--async", "cli-async/echo", '"later"').stdout
    invocation = out.strip()
    assert invocation.startswith("inv_") and out == invocation + "\n"
    assert server.wait_invocation(invocation)["status"] == "succeeded"
    logs = server.cli("logs", invocation).stdout
    assert invocation in logs and "succeeded" in logs and '"later"' in logs
    answer = json.loads(server.cli("invoke", "cli-async/echo", "1", "--async", "--json").stdout)
    assert answer["invocation_id"].startswith("inv_") and answer["status"] == "queued"


def test_rm_undeploys(server, pkg):
    server.cli("deploy", str(pkg("echo", name="cli-rm", version="1")), "--wait")
    server.cli("deploy", str(pkg("echo", name="cli-rm2", version="1")), "--wait")
    out = server.cli("rm", "cli-rm")
    assert "cli-rm removed" in out.stdout
    names = [c["name"] for c in json.loads(server.cli("ls", "--json").stdout)["containers"]]
    assert "cli-rm" not in names and "cli-rm2" in names
    assert server.invoke("cli-rm/echo", 1).status_code == 404
    artifact = server.api("GET", "/api/containers/cli-rm2/versions").json()[
        "versions"][0]["artifact_sha256"]
    assert (server.data / "artifacts" / artifact).exists()
    assert json.loads(server.cli("rm", "cli-rm2", "--json").stdout) == {
        "deleted": "cli-rm2", "artifacts_removed": 1}
    assert not (server.data / "artifacts" / artifact).exists()   # no version uses it now
    again = server.cli("rm", "cli-rm", check=False)
    assert again.returncode == 1 and "no container named 'cli-rm'" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_rm_keep_versions_takes_a_container_out_of_service_and_rollback_brings_it_back(
        server, pkg):
    server.cli("deploy", str(pkg("echo", name="cli-keep", version="1")), "--wait")
    server.cli("deploy", str(pkg("echo", name="cli-keep", version="2",
                                 files={"extra.py": "X = 2\n"})), "--wait")
    out = server.cli("rm", "cli-keep", "--keep-versions")
    assert "cli-keep undeployed; its 2 version(s) are kept" in out.stdout
    listed = {c["name"]: c for c in json.loads(server.cli("ls", "--json").stdout)["containers"]}
    assert listed["cli-keep"]["serving_version"] is None
    assert listed["cli-keep"]["active_version"] is None
    answer = server.invoke("cli-keep/echo", 1)
    assert answer.status_code == 404 and "no active version" in answer.json()["error"]["message"]
    versions = json.loads(server.cli("versions", "cli-keep", "--json").stdout)["versions"]
    assert sorted(v["version"] for v in versions) == ["1", "2"]
    assert all((server.data / "artifacts" / v["artifact_sha256"]).exists()
               for v in server.api("GET", "/api/containers/cli-keep/versions").json()["versions"])
    server.cli("rollback", "cli-keep", "1")
    assert server.invoke("cli-keep/echo", 7).json() == 7


def test_deployments_and_invocations(server, pkg):
    deployed = json.loads(server.cli("deploy", str(pkg("echo", name="cli-hist", version="1")),
                                     "--wait", "--json").stdout)
    deployment = deployed["deployment"]["id"]
    shown = server.cli("deployments", "cli-hist").stdout
    assert deployment in shown and "cli-hist@1" in shown and "ready" in shown
    # Workers by name, as everywhere else (records keep the id).
    name = server.api("GET", "/api/workers").json()["workers"][0]["name"]
    assert "WORKER" in shown and f"--- build log of {name}\n" in shown, shown
    assert "wrk_" not in shown, shown
    again = server.cli("deploy", str(pkg("echo", name="cli-hist-named")), "--wait")
    assert f"[{name}] ready\n" in again.stderr and "[wrk_" not in again.stderr, again.stderr
    by_id = json.loads(server.cli("deployments", deployment, "--json").stdout)
    assert by_id["id"] == deployment and by_id["status"] == "ready"
    assert by_id["workers"][0]["state"] == "ready" and by_id["workers"][0]["log"]
    none = server.cli("deployments", "nothere", check=False)
    assert none.returncode == 1 and "nothere" in none.stderr

    server.cli("invoke", "cli-hist/echo", "1")
    server.cli("invoke", "cli-hist/boom", "{}", check=False)
    table = server.cli("invocations", "cli-hist").stdout.splitlines()
    assert table[0].split() == ["ID", "CALL", "STATUS", "TRIGGER", "DURATION", "WORKER", "TIME"]
    assert len(table) == 3
    assert "cli-hist@1/boom" in table[1] and "failed" in table[1] and "http" in table[1]
    assert "cli-hist@1/echo" in table[2] and "succeeded" in table[2]
    failed = json.loads(server.cli("invocations", "cli-hist", "--status", "failed",
                                   "--json").stdout)["invocations"]
    assert [i["function"] for i in failed] == ["boom"]
    latest = json.loads(server.cli("--json", "invocations", "--limit", "1").stdout)
    assert len(latest["invocations"]) == 1
    recent = json.loads(server.cli("invocations", "cli-hist", "--since", "1h",
                                   "--json").stdout)["invocations"]
    assert len(recent) == 2
    bad = server.cli("invocations", "--since", "yesterday", check=False)
    assert bad.returncode == 1 and "since must be a duration" in bad.stderr
    nothing = server.cli("invocations", "cli-hist", "--status", "timed_out").stdout
    assert "no invocations of cli-hist match" in nothing


def test_invoke_suggests_logs_only_for_recorded_calls(server, pkg):
    server.cli("deploy", str(pkg("echo", name="cli-noid", version="1")), "--wait")
    server.cli("deploy", str(pkg("broken_import", name="cli-noid-broken")), "--wait",
               check=False)
    refused = {
        "NotFound": [server.cli("invoke", target, "{}", check=False)
                     for target in ("cli-noid-nothere/echo", "cli-noid/nope")],
        # 400: the CLI checks the JSON before sending it, so nothing reaches the server.
        "not valid JSON": [server.cli("invoke", "cli-noid/echo", "{nope", check=False)],
        "TooLarge": [server.cli("invoke", "cli-noid/echo", "-", check=False,
                                input='"' + "x" * (6 * 1024 * 1024 + 10) + '"')],
        # 503 before any worker was asked: the only version failed to start.
        "Unavailable": [server.cli("invoke", "cli-noid-broken/echo", "{}", check=False)],
    }
    for what, answers in refused.items():
        for done in answers:
            assert done.returncode == 1 and what in done.stderr, (what, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert "dockyard logs" not in done.stderr and "inv_" not in done.stderr, done.stderr
    failed = server.cli("invoke", "cli-noid/boom", "{}", check=False)
    assert failed.returncode == 1 and "(dockyard logs inv_" in failed.stderr
    invocation = failed.stderr.split("(dockyard logs ")[1].split(")")[0]
    assert "failed" in server.cli("logs", invocation).stdout


def test_build_log_has_no_uv_activate_hint(server, pkg):
    deployed = json.loads(server.cli("deploy", str(pkg("echo", name="cli-buildlog")),
                                     "--wait", "--json").stdout)
    log = "\n".join(w["log"] for w in deployed["deployment"]["workers"])
    assert "creating virtualenv" in log and "Creating virtual environment" in log, log
    assert "Activate with" not in log and "bin/activate" not in log, log

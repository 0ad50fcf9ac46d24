"""`dockyard status`, `logs NAME [--follow]`, `versions prune` and serve's retention, through
the real CLI against a real `serve`."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import Server, one_line_error


def test_status(server, pkg):
    server.cli("deploy", str(pkg("echo", name="insp-status", version="1")), "--wait")
    server.cli("invoke", "insp-status/boom", "{}", check=False)
    overview = server.cli("status").stdout
    assert f"server  {server.url}" in overview and f"data {server.data}" in overview
    assert "WORKER" in overview and "wrk_" in overview and "insp-status@1:ready" in overview
    row = next(line for line in overview.splitlines() if line.startswith("insp-status "))
    cells = row.split()
    assert cells[1:3] == ["1", "1"] and cells[3].startswith("dep_") and cells[4] == "ready"
    assert cells[5] == "1" and "ValueError: boom" in row
    data = json.loads(server.cli("status", "--json").stdout)
    assert data["server"]["url"] == server.url and data["server"]["uptime_s"] >= 0
    assert data["workers"][0]["state"] == "up"
    entry = next(c for c in data["containers"] if c["name"] == "insp-status")
    assert entry["last_deployment_status"] == "ready" and entry["instances"] == 1
    assert entry["last_error"]["source"] == "invocation"
    assert entry["last_error"]["message"] == "ValueError: boom"

    detail = server.cli("status", "insp-status").stdout
    assert detail.startswith("insp-status\n") and "serving     1" in detail
    assert "last error  ValueError: boom (invocation inv_" in detail
    name = server.api("GET", "/api/workers").json()["workers"][0]["name"]
    assert "last deployment:" in detail and f"--- build log of {name}\n" in detail, detail
    one = json.loads(server.cli("--json", "status", "insp-status").stdout)
    assert one["container"]["name"] == "insp-status"
    assert one["deployment"]["status"] == "ready"
    assert one["workers"][0]["version"] == "1" and one["workers"][0]["state"] == "ready"
    assert "no container named 'nothere'" in one_line_error(
        server.cli("status", "nothere", check=False))


class Follow:
    """`dockyard logs NAME --follow` in the background, its stdout read line by line."""

    def __init__(self, server, *args: str):
        env = dict(os.environ, DOCKYARD_URL=server.url, DOCKYARD_TOKEN=server.admin)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dockyard", "--data", str(server.data), "logs", *args,
             "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, done, timeout: float = 60) -> list[str]:
        end = time.monotonic() + timeout
        while not done(self.seen):
            try:
                self.seen.append(self.lines.get(timeout=max(0.01, end - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"not seen in {timeout}s: {self.seen}") from None
        return self.seen

    def interrupt(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, self.proc.stderr.read()
        return self.proc.stderr.read()


def test_logs_of_a_container_and_follow(server, pkg):
    server.cli("deploy", str(pkg("echo", name="insp-logs", version="1")), "--wait")
    first = server.invoke("insp-logs/echo", "before").headers["X-Dockyard-Invocation-Id"]
    follow = Follow(server, "insp-logs")
    as_json = Follow(server, "insp-logs", "--json")
    try:
        # What finished before the follow started is shown first.
        follow.until(lambda seen: any(first in line for line in seen))
        as_json.until(lambda seen: any(first in line for line in seen))
        ids: list[str] = []

        def call(function: str, event) -> None:
            ids.append(server.invoke(f"insp-logs/{function}", event)
                       .headers["X-Dockyard-Invocation-Id"])

        calls = [threading.Thread(target=call, args=("echo", i)) for i in range(6)]
        calls += [threading.Thread(target=call, args=("printer", {"text": "hi"})),
                  threading.Thread(target=call, args=("boom", {}))]
        for thread in calls:
            thread.start()
        for thread in calls:
            thread.join()
        queued = server.invoke("insp-logs/echo", "later", params={"async": "1"}).json()
        ids.append(queued["invocation_id"])
        follow.until(lambda seen: all(any(i in line for line in seen) for i in ids))
        objects = [json.loads(line) for line in as_json.until(
            lambda seen: all(any(i in line for line in seen) for i in ids))]
        # One more call: once it shows, every block before it is whole.
        last = server.invoke("insp-logs/echo", "last").headers["X-Dockyard-Invocation-Id"]
        lines = follow.until(lambda seen: any(last in line for line in seen))
    finally:
        follow_err = follow.interrupt()
        json_err = as_json.interrupt()
    assert "Traceback" not in follow_err and "Traceback" not in json_err
    heads = [line for line in lines if line.startswith("inv_")]
    assert len(heads) == len(set(heads)) == len(ids) + 2       # each call once
    for i in ids:
        at = next(n for n, line in enumerate(lines) if line.startswith(i))
        assert lines[at + 1].startswith("REPORT duration: ") and "cold start: " in lines[at + 1]
    printer = next(n for n, line in enumerate(lines) if "insp-logs@1/printer" in line)
    assert lines[printer + 2:printer + 4] == ["--- stdout", "to stdout hi"]
    assert any(line == "--- error: ValueError: boom" for line in lines)
    assert sorted(o["id"] for o in objects) == sorted([first, *ids])
    assert next(o for o in objects if o["id"] == queued["invocation_id"])["trigger"] == "async"

    # Without --follow: the last 20, oldest first, the same way.
    recent = server.cli("logs", "insp-logs").stdout.splitlines()
    heads = [line.split()[0] for line in recent if line.startswith("inv_")]
    assert len(heads) == 11 and heads[0] == first and heads[-1] == last
    assert sum(line.startswith("REPORT duration: ") for line in recent) == 11
    listed = json.loads(server.cli("logs", "insp-logs", "--json").stdout)
    assert [i["id"] for i in listed["invocations"]] == heads
    assert "neither an invocation id" in one_line_error(
        server.cli("logs", "nothere", check=False))
    assert "no invocation with id 'inv_0000'" in one_line_error(
        server.cli("logs", "inv_0000", check=False))


def wait_for(what, timeout: float = 60, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"still not so after {timeout}s")


def worker_states(server, container: str) -> dict[str, str]:
    workers = server.api("GET", "/api/workers").json()["workers"]
    return {v["version"]: v["state"] for w in workers for v in w["versions"]
            if v["container"] == container}


def test_versions_prune(server, pkg):
    records = [server.deploy(pkg("echo", name="insp-prune", version=str(n))) for n in range(1, 5)]
    server.cli("rollback", "insp-prune", "1")
    wait_for(lambda: worker_states(server, "insp-prune").get("2") == "standby"
             and worker_states(server, "insp-prune").get("3") == "standby")
    before = server.cli("versions", "insp-prune").stdout
    assert before.splitlines()[0].split() == ["VERSION", "STATE", "CONTENT", "CREATED"]
    dry = server.cli("versions", "prune", "insp-prune", "--keep", "1", "--dry-run").stdout
    assert "insp-prune: would delete 2 version(s): 3, 2" in dry
    assert "serving, active" in dry and "one of the 1 newest" in dry
    assert server.cli("versions", "insp-prune").stdout == before
    done = json.loads(server.cli("versions", "prune", "insp-prune", "--keep", "1",
                                 "--json").stdout)
    assert [v["version"] for v in done["deleted"]] == ["3", "2"]
    kept = {v["version"]: v["reasons"] for v in done["kept"]}
    assert "serving" in kept["1"] and "active" in kept["1"]
    name = server.api("GET", "/api/workers").json()["workers"][0]["name"]
    assert f"ready on {name}" in kept["1"], kept     # the worker by name, as everywhere
    assert "one of the 1 newest" in kept["4"]
    artifacts = server.data / "artifacts"
    assert sorted(done["artifacts_removed"]) == sorted(r["artifact_sha256"] for r in records[1:3])
    assert not (artifacts / records[1]["artifact_sha256"]).exists()
    assert (artifacts / records[0]["artifact_sha256"]).exists()
    # The listing, in each of its spellings, as it always was.
    for args in (("versions", "insp-prune", "--json"), ("--json", "versions", "insp-prune"),
                 ("versions", "ls", "insp-prune", "--json")):
        listed = json.loads(server.cli(*args).stdout)
        assert [v["version"] for v in listed["versions"]] == ["4", "1"], args
    assert [line.split()[0] for line in server.cli("versions", "insp-prune").stdout
            .splitlines()[1:]] == ["4", "1"]
    wait_for(lambda: set(worker_states(server, "insp-prune")) == {"1", "4"})
    assert server.invoke("insp-prune/echo", 1).json() == 1
    assert server.invoke("insp-prune@2/echo", 1).status_code == 404
    nothing = server.cli("versions", "prune", "insp-prune", "--keep", "5").stdout
    assert "insp-prune: nothing to delete" in nothing
    for bad in (["--keep", "0"], ["--keep", "many"], []):
        assert "--keep N" in one_line_error(
            server.cli("versions", "prune", "insp-prune", *bad, check=False))
    assert "no container named 'nothere'" in one_line_error(
        server.cli("versions", "prune", "nothere", "--keep", "1", check=False))


@pytest.fixture(scope="module")
def retaining(private_tmp, wheelhouse):
    """A serve that keeps invocation records 2 s and 2 versions, pruning every second."""
    data = private_tmp / "retain" / "data"
    data.parent.mkdir()
    srv = Server(data, ["--find-links", str(wheelhouse), "--offline", "--keep-invocations",
                        "2s", "--keep-versions", "2", "--prune-every", "1s"])
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert not srv.leftovers, srv.leftovers


def test_retention(retaining, pkg):
    srv = retaining
    for n in range(1, 5):
        srv.deploy(pkg("echo", name="ret-echo", version=str(n),
                       manifest_extra="[limits]\ntimeout_s = 60\nconcurrency = 4\n"))
    status = json.loads(srv.cli("status", "--json").stdout)["server"]["retention"]
    assert status == {"keep_invocations_s": 2.0, "keep_versions": 2, "prune_every_s": 1.0,
                      "forget_workers_after_s": 600.0}
    old = srv.invoke("ret-echo/echo", "old").headers["X-Dockyard-Invocation-Id"]
    running = srv.invoke("ret-echo/sleep", {"s": 50}, params={"async": "1"}).json()
    running = running["invocation_id"]
    wait_for(lambda: srv.api("GET", f"/api/invocations/{running}").json()["status"]
             == "running")
    srv.cli("jobs", "add", "ret-job", "ret-echo/echo", "@every 1h")
    ran = json.loads(srv.cli("jobs", "run", "ret-job", "--wait", "--json").stdout)
    job_call = ran["invocation_id"]
    # Old records go; the call still running and the job run's call stay.
    wait_for(lambda: srv.api("GET", f"/api/invocations/{old}").status_code == 404)
    wait_for(lambda: [v["version"] for v in srv.api(
        "GET", "/api/containers/ret-echo/versions").json()["versions"]] == ["4", "3"])
    time.sleep(2.5)   # a few more passes
    assert srv.api("GET", f"/api/invocations/{running}").json()["status"] == "running"
    assert srv.api("GET", f"/api/invocations/{job_call}").json()["status"] == "succeeded"
    assert job_call in srv.cli("jobs", "runs", "ret-job").stdout
    # Once it is over, it goes too.
    srv.api("POST", f"/api/invocations/{running}/cancel")
    wait_for(lambda: srv.api("GET", f"/api/invocations/{running}").status_code == 404)
    assert srv.invoke("ret-echo/echo", 2).json() == 2


def test_follow_prints_only_what_is_new_even_past_the_kept_output():
    from dockyard.cli.history import _new_part

    assert _new_part("", "a\n") == "a\n"
    assert _new_part("a\n", "a\nb\n") == "b\n"
    # Past 64 KB the output so far is its start, a note, and its end, which moves on.
    start, note = "".join(f"s{i}\n" for i in range(50)), "[... 10 bytes not kept ...]\n"
    shown = start + note + "".join(f"t{i}\n" for i in range(100, 300))
    later = start + "[... 20 bytes not kept ...]\n" + "".join(f"t{i}\n" for i in range(110, 305))
    assert _new_part(shown, later) == "t300\nt301\nt302\nt303\nt304\n"
    # More printed between two looks than is kept: from the note on, which says so.
    far = start + "[... 9000 bytes not kept ...]\n" + "u1\n"
    assert _new_part(shown, far) == "[... 9000 bytes not kept ...]\nu1\n"

"""A synchronous call is recorded `running` when it is handed to a worker: it shows in
`dockyard invocations --status running` and `dockyard logs ID` while it runs, `dockyard logs
ID --follow` waits for its end, and `dockyard cancel ID` stops it. A quick call is still
written once, finished."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import requests

from conftest import ROOT
from dockyard.common.protocol import Frame
from failover_cluster import wait_for


def _running(server, container: str) -> list[dict]:
    listed = server.cli("--json", "invocations", container, "--status", "running")
    return json.loads(listed.stdout)["invocations"]


def test_a_running_call_is_seen_followed_and_cancelled(server, pkg):
    server.deploy(pkg("echo", name="running-calls"))
    answers: list = []
    caller = threading.Thread(target=lambda: answers.append(
        server.invoke("running-calls/print_then_sleep", {"s": 60})))
    caller.start()
    try:
        calls = wait_for("the call listed as running",
                         lambda: _running(server, "running-calls"), 30, 0.1)
        assert len(calls) == 1
        call_id = calls[0]["id"]
        shown = server.cli("--json", "logs", call_id)
        record = json.loads(shown.stdout)
        assert record["status"] == "running" and record["worker_id"]
        assert record["input"] == {"s": 60} and record["finished_at"] is None
        # What it printed so far comes from the worker that runs it.
        so_far = wait_for("its output so far", lambda: (lambda r: r.get("output_so_far") and
                          "before the sleep" in r["stdout"] and r)(json.loads(server.cli(
                              "--json", "logs", call_id).stdout)), 30, 0.1)
        assert so_far["status"] == "running" and so_far["stderr"] == ""
        human = server.cli("logs", call_id).stdout
        assert "--- stdout so far\nbefore the sleep" in human, human
        with requests.Session() as browser:   # and the dashboard's page of the call
            page = browser.get(f"{server.url}/ui/sign-in", timeout=30).text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            browser.post(f"{server.url}/ui/sign-in", data={"csrf": csrf, "token": server.admin},
                         timeout=30)
            page = browser.get(f"{server.url}/ui/invocations/{call_id}", timeout=30).text
        assert re.search(r'stdout <span class="dim">so far</span></h2>\s*<pre id="stdout" '
                         r'class="log">before the sleep', page), page

        env = dict(server_env(server))
        follower = subprocess.Popen(
            [sys.executable, "-m", "dockyard", "--data", str(server.data), "logs", call_id,
             "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=ROOT)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
        reader.start()
        try:
            # --follow prints what the call prints as it runs...
            wait_for("the follower printing the call's output",
                     lambda: "before the sleep\n" in lines, 30, 0.1)
            cancelled = server.cli("cancel", call_id)
            assert f"{call_id}: cancelled" in cancelled.stdout
            follower.wait(timeout=60)
            reader.join(10)
            err = follower.stderr.read()
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
            follower.stdout.close()
            follower.stderr.close()
        assert follower.returncode == 0, err
        out = "".join(lines)
        # ...then its end, without printing that output again.
        assert "cancelled" in out and out.count("before the sleep") == 1, out
    finally:
        caller.join(90)
    answer = answers[0]
    assert answer.status_code == 409, answer.text
    assert answer.headers["X-Dockyard-Invocation-Id"] == call_id
    final = json.loads(server.cli("--json", "logs", call_id).stdout)
    assert final["status"] == "cancelled"
    assert "before the sleep" in final["stdout"]
    # Cancelling it again says it has ended; an unknown id says there is no such call.
    again = server.cli("cancel", call_id, check=False)
    assert again.returncode == 1 and "finished already" in again.stderr
    unknown = server.cli("cancel", "inv_0000", check=False)
    assert unknown.returncode == 1 and "no call with id 'inv_0000'" in unknown.stderr
    # An id is one path segment, whatever it holds (it was sent as a path and a query).
    odd = server.cli("cancel", "inv_0?key=1/x", check=False)
    assert odd.returncode == 1 and "no call with id 'inv_0?key=1/x'" in odd.stderr


def test_a_running_async_call_names_its_worker_and_shows_its_output_so_far(server, pkg):
    server.deploy(pkg("echo", name="running-async"))
    queued = server.invoke("running-async/print_then_sleep", {"s": 60}, params={"async": "1"})
    assert queued.status_code == 202, queued.text
    call_id = queued.json()["invocation_id"]
    try:
        so_far = wait_for("the async call's output so far", lambda: (lambda r: r.get(
            "output_so_far") and "before the sleep" in r["stdout"] and r)(json.loads(
                server.cli("--json", "logs", call_id).stdout)), 30, 0.1)
        assert so_far["status"] == "running" and so_far["trigger"] == "async"
        workers = {w["id"] for w in server.api("GET", "/api/workers").json()["workers"]}
        assert so_far["worker_id"] in workers, so_far
        # Asked for no version: it runs the serving one, which its record names once it ends.
        assert so_far["version"] is None
        human = server.cli("logs", call_id).stdout
        assert "--- stdout so far\nbefore the sleep" in human, human
    finally:
        server.cli("cancel", call_id, check=False)
    final = wait_for("the cancelled call's record", lambda: (lambda r: r["status"] ==
                     "cancelled" and r)(server.api("GET", f"/api/invocations/{call_id}").json()),
                     30, 0.1)
    assert final["version"] and final["worker_id"] == so_far["worker_id"], final


def test_a_quick_call_is_recorded_once_finished(server, pkg):
    server.deploy(pkg("echo", name="quick-calls"))
    cursor = server.api("GET", "/api/invocations?container=quick-calls").json()["cursor"]
    ids = [server.invoke("quick-calls/echo", n).headers["X-Dockyard-Invocation-Id"]
           for n in range(30)]
    finished: list[str] = []

    def all_finished():
        nonlocal cursor
        page = server.api("GET", f"/api/invocations?container=quick-calls&after={cursor}"
                          ).json()
        finished.extend(r["id"] for r in page["invocations"])
        cursor = page["cursor"]
        return len(finished) >= len(ids)
    wait_for("every call finished", all_finished, 30, 0.1)
    assert sorted(finished) == sorted(ids)
    assert not _running(server, "quick-calls")


def test_a_process_of_another_container_cannot_pass_its_output_off_as_a_running_calls(
        server, pkg):
    # Deployed first: its pool is the first a worker would look in.
    server.deploy(pkg("slotforger", name="output-thief"))
    server.deploy(pkg("echo", name="output-victim"))
    caller = threading.Thread(target=lambda: server.invoke("output-victim/print_then_sleep",
                                                           {"s": 60}))
    caller.start()
    try:
        call_id = wait_for("the call listed as running",
                           lambda: _running(server, "output-victim"), 30, 0.1)[0]["id"]
        path = f"/api/invocations/{call_id}"
        wait_for("its output so far", lambda: "before the sleep" in (
            server.api("GET", path).json().get("stdout") or ""), 30, 0.1)
        # The thief's process prints, and its slot names the victim's call as its own.
        claim = server.invoke("output-thief/claim_call", {"id": call_id, "seconds": 3})
        assert claim.status_code == 200, claim.text
        reads = [server.api("GET", path).json() for _ in range(20)]
        assert all(r["status"] == "running" and r["stdout"] == "before the sleep\n"
                   for r in reads), [r["stdout"] for r in reads if "forged" in r["stdout"]]
        # The claim was made, and cost the thief its process.
        wait_for("the thief's process killed", lambda: re.search(
            r"output-thief@\S+ pid \d+: broke the slot protocol", server.log_path.read_text()),
            30, 0.1)
    finally:
        server.cli("cancel", call_id, check=False)
        caller.join(90)


def test_the_worker_asks_only_the_named_versions_processes_for_a_calls_output(monkeypatch):
    """Whichever process of another version claims the call id (its slot is the function's to
    write), the output so far comes from the version the call went to, or from nobody."""
    from types import SimpleNamespace

    from dockyard.runner import agent

    def pool(what, holds, printed):
        child = SimpleNamespace(read_output=lambda: (printed, ""))
        return SimpleNamespace(what=what, holding=lambda call_id: child if holds == call_id
                               else None)

    thief = pool("thief@v1", "inv_1", "forged")
    victim = pool("victim@v1", "inv_1", "real")
    monkeypatch.setattr(agent, "live_pools", lambda: [thief, victim])
    worker = SimpleNamespace(calls={})
    assert agent.Agent.output(worker, "inv_1", "victim@v1")["stdout"] == "real"
    monkeypatch.setattr(agent, "live_pools", lambda: [thief])
    assert agent.Agent.output(worker, "inv_1", "victim@v1") == {
        "type": Frame.OUTPUT, "id": "inv_1", "found": False}
    # A call whose record names no version yet (an async call to the serving one): any
    # version of its container, never another container's, even one whose name starts alike.
    lookalike = pool("victimx@v1", "inv_2", "forged")
    newer = pool("victim@v2", "inv_2", "real")
    monkeypatch.setattr(agent, "live_pools", lambda: [thief, lookalike, newer])
    assert agent.Agent.output(worker, "inv_2", "victim")["stdout"] == "real"
    monkeypatch.setattr(agent, "live_pools", lambda: [thief, lookalike])
    assert agent.Agent.output(worker, "inv_2", "victim")["found"] is False


def server_env(server) -> dict:
    import os
    return dict(os.environ, DOCKYARD_URL=server.url, DOCKYARD_TOKEN=server.admin)

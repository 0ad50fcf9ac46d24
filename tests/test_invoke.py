"""End to end: deploy a package to a real `dockyard serve`, call its functions over HTTP, and
check the status, body, headers and the invocation record of every kind of outcome."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import requests

from conftest import container_processes


def test_deploy_and_invoke(server, pkg):
    record = server.deploy(pkg("echo", name="inv-basic"))
    assert record["container"] == "inv-basic"
    assert record["deployment_detail"]["workers"][0]["state"] == "ready"
    response = server.invoke("inv-basic/echo", {"who": "you", "n": [1, 2]})
    assert response.status_code == 200, response.text
    assert response.json() == {"who": "you", "n": [1, 2]}
    inv_id = response.headers["X-Dockyard-Invocation-Id"]
    assert response.headers["X-Dockyard-Version"] == record["version"]
    assert float(response.headers["X-Dockyard-Duration-Ms"]) >= 0
    inv = server.api("GET", f"/api/invocations/{inv_id}").json()
    assert inv["status"] == "succeeded"
    assert inv["input"] == {"who": "you", "n": [1, 2]}
    assert inv["output"] == {"who": "you", "n": [1, 2]}
    assert inv["trigger"] == "http" and inv["attempt"] == 1
    assert inv["cold"] is True and inv["max_rss_kb"] > 1000
    assert inv["worker_id"].startswith("wrk_")
    # The second call is warm.
    second = server.invoke("inv-basic/echo", None)
    assert second.status_code == 200 and second.json() is None
    inv2 = server.api("GET", f"/api/invocations/{second.headers['X-Dockyard-Invocation-Id']}")
    assert inv2.json()["cold"] is False


def test_context_async_handler_and_output_capture(server, pkg):
    server.deploy(pkg("echo", name="inv-ctx"))
    ctx = server.invoke("inv-ctx/ctx", {"x": 1})
    assert ctx.status_code == 200, ctx.text
    body = ctx.json()
    assert body["container"] == "inv-ctx" and body["function"] == "ctx"
    assert body["invocation_id"] == ctx.headers["X-Dockyard-Invocation-Id"]
    assert 0 < body["remaining_ms"] <= 30_000
    assert server.invoke("inv-ctx/aecho", {"a": 1}).json() == {"a": 1}
    printed = server.invoke("inv-ctx/printer", {"text": "hi"})
    assert printed.status_code == 200
    inv = server.api("GET", f"/api/invocations/{printed.headers['X-Dockyard-Invocation-Id']}")
    inv = inv.json()
    assert "stdout" in inv["stdout"] or inv["stdout"].strip()
    assert inv["stderr"].strip()
    # Output belongs to the call that wrote it, not to the next one.
    quiet = server.invoke("inv-ctx/echo", 1)
    inv = server.api("GET", f"/api/invocations/{quiet.headers['X-Dockyard-Invocation-Id']}")
    assert inv.json()["stdout"] == "" and inv.json()["stderr"] == ""


def test_explicit_module_callable_and_unknown_function(server, pkg):
    server.deploy(pkg("echo", name="inv-names"))
    assert server.invoke("inv-names/main:echo", [1]).json() == [1]
    missing = server.invoke("inv-names/nope", {})
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]["message"]
    gone = server.invoke("inv-names/main:nope", {})
    assert gone.status_code == 404, gone.text
    assert server.invoke("no-such-container/echo", {}).status_code == 404


def test_handler_errors(server, pkg):
    server.deploy(pkg("echo", name="inv-errors"))
    boom = server.invoke("inv-errors/boom", {})
    assert boom.status_code == 500
    error = boom.json()["error"]
    assert error["type"] == "ValueError" and "boom" in error["message"]
    assert "Traceback" in error["traceback"] and "main.py" in error["traceback"]
    assert boom.json()["invocation_id"].startswith("inv_")
    inv = server.api("GET", f"/api/invocations/{boom.json()['invocation_id']}").json()
    assert inv["status"] == "failed" and inv["error"]["type"] == "ValueError"

    not_json = server.invoke("inv-errors/not_json", {})
    assert not_json.status_code == 500
    assert not_json.json()["error"]["type"] == "ResultNotSerializable"
    assert "set" in not_json.json()["error"]["message"]

    exited = server.invoke("inv-errors/exit", {})
    assert exited.status_code == 500
    assert exited.json()["error"]["type"] == "SystemExit"
    assert server.invoke("inv-errors/echo", "still here").json() == "still here"


def test_big_output_is_capped(server, pkg):
    server.deploy(pkg("echo", name="inv-big"))
    response = server.invoke("inv-big/big_print", {})
    assert response.status_code == 200, response.text
    stdout = server.api("GET", "/api/invocations/"
                        f"{response.headers['X-Dockyard-Invocation-Id']}").json()["stdout"]
    # Its start and its end in whole lines, and a line between that says how much is not kept.
    line = "x" * 1023 + "\n"
    first, rest = stdout.split("[... ", 1)
    count, last = rest.split(" bytes not kept ...]\n", 1)
    assert first and last and first == line * (len(first) // 1024), first[-100:]
    assert last == line * (len(last) // 1024), last[-100:]
    assert len(first) + int(count) + len(last) == 5 * 1024 * 1024
    assert len(stdout) <= 64 * 1024 and "bytes not kept" not in last
    assert server.invoke("inv-big/echo", 2).json() == 2


def test_crash_and_timeout_get_a_fresh_process(server, pkg):
    server.deploy(pkg("echo", name="inv-crash", manifest_extra="[limits]\ntimeout_s = 2\n"))
    crashed = server.invoke("inv-crash/hard_exit", {})
    assert crashed.status_code == 502, crashed.text
    assert crashed.json()["error"]["type"] == "Crashed"
    inv = server.api("GET", f"/api/invocations/{crashed.json()['invocation_id']}").json()
    assert inv["status"] == "crashed"
    after = server.invoke("inv-crash/echo", "next")
    assert after.status_code == 200 and after.json() == "next"

    started = time.monotonic()
    slow = server.invoke("inv-crash/sleep", {"s": 60})
    assert slow.status_code == 504, slow.text
    assert time.monotonic() - started < 30
    assert slow.json()["error"]["type"] == "Timeout"
    inv = server.api("GET", f"/api/invocations/{slow.json()['invocation_id']}").json()
    assert inv["status"] == "timed_out"
    assert server.invoke("inv-crash/echo", "again").json() == "again"


def test_process_killed_from_outside_mid_call(server, pkg):
    server.deploy(pkg("echo", name="inv-kill"))
    assert server.invoke("inv-kill/echo", 0).status_code == 200
    result = {}

    def call():
        result["response"] = server.invoke("inv-kill/sleep", {"s": 20})

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)
    victims = [psutil.Process(pid) for pid in container_processes(server.data, "inv-kill")]
    assert victims, "no child process found for inv-kill"
    for p in victims:
        p.send_signal(signal.SIGKILL)
    caller.join(30)
    assert result["response"].status_code == 502
    assert server.invoke("inv-kill/echo", "fresh").json() == "fresh"



def test_bad_requests(server, pkg):
    server.deploy(pkg("echo", name="inv-bad"))
    bad_json = requests.post(f"{server.url}/invoke/inv-bad/echo", data=b"{not json",
                             timeout=30)
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.json()["error"]["message"]
    big = requests.post(f"{server.url}/invoke/inv-bad/echo",
                        data=b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"', timeout=60)
    assert big.status_code == 413
    assert big.json()["error"]["type"] == "TooLarge"
    # A chunked body has no Content-Length: read up to the limit, then refused.
    chunked = requests.post(f"{server.url}/invoke/inv-bad/echo",
                            data=iter([b'{"a": ', b'1}']), timeout=30)
    assert chunked.status_code == 200 and chunked.json() == {"a": 1}
    big_chunked = requests.post(
        f"{server.url}/invoke/inv-bad/echo",
        data=iter([b'"'] + [b"x" * (1 << 20)] * 7 + [b'"']), timeout=60)
    assert big_chunked.status_code == 413
    assert server.invoke("inv-bad/echo", "ok").status_code == 200


def test_async_invoke(server, pkg):
    server.deploy(pkg("echo", name="inv-async"))
    response = server.invoke("inv-async/echo", {"later": True},
                             headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    inv_id = response.json()["invocation_id"]
    assert response.headers["Location"].startswith(f"/api/invocations/{inv_id}?key=")
    inv = server.wait_invocation(inv_id)
    assert inv["status"] == "succeeded" and inv["output"] == {"later": True}
    assert inv["trigger"] == "async"
    failing = server.invoke("inv-async/boom?async=1", {})
    assert failing.status_code == 202
    inv = server.wait_invocation(failing.json()["invocation_id"])
    assert inv["status"] == "failed" and inv["error"]["type"] == "ValueError"
    listed = server.api("GET", "/api/invocations?container=inv-async&limit=10").json()
    assert {i["id"] for i in listed["invocations"]} >= {inv_id, failing.json()["invocation_id"]}
    assert server.invoke("inv-async/nope?async=1", {}).status_code == 404


def test_dependency_from_wheelhouse(server, pkg):
    folder = pkg("echo", name="inv-deps",
                 manifest_extra='dependencies = ["dytiny==1.0"]\n',
                 files={"usedep.py": "import dytiny\n\ndef shout(event):\n"
                                     "    return dytiny.shout(event)\n"})
    record = server.deploy(folder)
    log = record["deployment_detail"]["workers"][0]["log"]
    assert "dytiny" in log
    assert server.invoke("inv-deps/usedep:shout", "hey").json() == "HEY!"


def test_metrics_and_health(server, pkg):
    server.deploy(pkg("echo", name="inv-metrics"))
    response = server.invoke("inv-metrics/echo", 1)
    # Records land just after the answer; reading the record waits for it.
    server.api("GET", f"/api/invocations/{response.headers['X-Dockyard-Invocation-Id']}")
    health = requests.get(server.url + "/healthz", timeout=10).json()
    assert health == {"status": "ok", "workers": 1}
    text = server.api("GET", "/metrics", timeout=10).text
    assert 'dockyard_invocations_total{container="inv-metrics",status="succeeded"}' in text
    assert "dockyard_workers_ready 1.0" in text


def test_child_environment_is_scrubbed(server, pkg):
    server.deploy(pkg("echo", name="inv-env", manifest_extra='env = { GREETING = "hi" }\n'))
    env = server.invoke("inv-env/environ", {}).json()
    assert env["GREETING"] == "hi"
    assert not any(k.startswith("DOCKYARD") for k in env)
    assert set(env) <= {"GREETING", "PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "VIRTUAL_ENV",
                        "PYTHONUNBUFFERED", "LC_CTYPE"}
    # Each process has a private /tmp (its own tmpfs in its view) as its home.
    assert env["HOME"] == env["TMPDIR"] == "/tmp"


def test_a_full_pool_queues_a_call_for_the_default_queue_time(server, pkg):
    """One instance busy for 6 s: a call sent meanwhile waits for it (queue_timeout_s is
    10 s by default) and runs once it is free (see test_queue_timeout.py for the 429)."""
    server.deploy(pkg("echo", name="inv-full", manifest_extra="[limits]\ntimeout_s = 20\n"))
    busy = {}
    caller = threading.Thread(target=lambda: busy.update(r=server.invoke("inv-full/sleep",
                                                                          {"s": 6})))
    caller.start()
    deadline = time.monotonic() + 30
    while not busy and not any(r["status"] == "running" for r in server.api(
            "GET", "/api/invocations?container=inv-full").json()["invocations"]):
        assert time.monotonic() < deadline, "the first call never started"
        time.sleep(0.05)
    queued = server.invoke("inv-full/echo", "waiting")
    assert queued.status_code == 200, queued.text
    assert queued.json() == "waiting"
    caller.join(30)
    assert busy["r"].status_code == 200


def test_answers_that_ran_nothing_name_no_invocation(server, pkg):
    server.deploy(pkg("echo", name="inv-noid"))
    server.deploy(pkg("broken_import", name="inv-noid-broken"), expect="failed")
    refused = {
        "bad json": requests.post(f"{server.url}/invoke/inv-noid/echo", data=b"{nope",
                                  timeout=30),
        "unknown container": server.invoke("inv-noid-nothere/echo", {}),
        "unknown function": server.invoke("inv-noid/nope", {}),
        "too large": requests.post(f"{server.url}/invoke/inv-noid/echo",
                                   data=b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"', timeout=60),
        "no ready instance": server.invoke("inv-noid-broken/echo", {}),
        "async, unknown function": server.invoke("inv-noid/nope?async=1", {}),
    }
    codes = {what: r.status_code for what, r in refused.items()}
    assert codes == {"bad json": 400, "unknown container": 404, "unknown function": 404,
                     "too large": 413, "no ready instance": 503,
                     "async, unknown function": 404}
    for what, response in refused.items():
        assert "invocation_id" not in response.json(), what
        assert "X-Dockyard-Invocation-Id" not in response.headers, what
        assert response.json()["error"]["message"], what
    # One that reached the worker keeps its id, and the id names its record.
    boom = server.invoke("inv-noid/boom", {})
    assert boom.status_code == 500
    assert boom.json()["invocation_id"] == boom.headers["X-Dockyard-Invocation-Id"]
    assert server.wait_invocation(boom.json()["invocation_id"])["status"] == "failed"


def test_a_failed_first_deploy_is_retried_when_the_same_package_comes_again(server, pkg,
                                                                             wheelhouse):
    """Nothing serves yet, the build fails (a dependency the wheelhouse lacks); once the
    dependency is there, deploying the same package again tries again and succeeds."""
    from conftest import build_wheel
    folder = pkg("echo", name="inv-retry", manifest_extra='dependencies = ["dylate==1.0"]\n',
                 files={"uselate.py": "import dylate\n\ndef value(event):\n"
                                      "    return dylate.VALUE\n"})
    failed = server.deploy(folder, expect="failed")
    assert "dylate" in failed["deployment_detail"]["error"]
    build_wheel(wheelhouse, "dylate", "1.0", {"dylate/__init__.py": "VALUE = 42\n"})
    again = server.deploy(folder)
    assert again["deployment"] != failed["deployment"] and not again["created"]
    assert server.invoke("inv-retry/uselate:value", {}).json() == 42


def test_an_async_call_waits_for_a_busy_instance_instead_of_failing(server, pkg):
    """One instance, one call at a time, busy longer than the worker's queue wait (5 s): a
    synchronous call then gets a 503, but a queued call is the dispatcher's to deliver, so it
    runs once the instance is free."""
    server.deploy(pkg("jobs", name="inv-busy",
                      manifest_extra="[limits]\nconcurrency = 1\ninstances = 1\n"))
    busy = threading.Thread(target=server.invoke, args=("inv-busy/slow", {"s": 7}))
    busy.start()
    try:
        time.sleep(0.5)
        queued = server.invoke("inv-busy/tick?async=1", {"n": 1})
        assert queued.status_code == 202
        inv = server.wait_invocation(queued.json()["invocation_id"], timeout=60)
        assert inv["status"] == "succeeded", inv
        assert inv["output"]["event"] == {"n": 1}
    finally:
        busy.join()


def test_a_503_says_why_no_instance_is_ready(server, pkg):
    """A container whose only version failed to build: the 503 names the version and the
    build's reason, not a guess; it carries no invocation id (nothing ran)."""
    server.deploy(pkg("echo", name="inv-broken",
                      manifest_extra='dependencies = ["dockyard-no-such-distribution"]\n'),
                  expect="failed")
    response = server.invoke("inv-broken/echo", {})
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "X-Dockyard-Invocation-Id" not in response.headers
    message = response.json()["error"]["message"]
    assert message.startswith("inv-broken@") and " failed to deploy: " in message, message
    assert "dockyard-no-such-distribution" in message, message
    assert "dockyard deployments inv-broken" in message


def test_queued_calls_for_a_busy_container_do_not_hold_up_other_containers(server, pkg):
    """More queued calls for a container whose one instance is busy than the dispatcher has
    threads: each is put back in the queue after a short wait instead of holding a thread,
    so another container's queued call still runs at once, and the busy container's calls
    all run once it is free."""
    server.deploy(pkg("jobs", name="inv-hog",
                      manifest_extra="[limits]\nconcurrency = 1\ninstances = 1\n"))
    server.deploy(pkg("echo", name="inv-free"))
    busy = threading.Thread(target=server.invoke, args=("inv-hog/slow", {"s": 10}))
    busy.start()
    try:
        time.sleep(0.5)
        hogs = [server.invoke("inv-hog/tick?async=1", {"n": n}).json()["invocation_id"]
                for n in range(24)]
        time.sleep(1.5)   # the dispatcher has claimed them (it has 16 threads)
        free = server.invoke("inv-free/echo?async=1", {"ok": 1}).json()["invocation_id"]
        assert server.wait_invocation(free, timeout=60)["status"] == "succeeded"
        # Done while the busy container's only instance was still taken.
        assert busy.is_alive()
    finally:
        busy.join()
    for invocation_id in hogs:
        assert server.wait_invocation(invocation_id, timeout=120)["status"] == "succeeded"

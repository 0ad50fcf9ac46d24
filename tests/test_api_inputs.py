"""Malformed requests to the JSON API are refused with a 4xx that says what is wrong, never
answered with a 500 (each case is an input that once did: see test_openapi.py, whose fuzzing
found them)."""

from __future__ import annotations

import requests


def _fake_worker(server, name: str) -> tuple[str, dict]:
    """A registered worker that is no agent (nothing listens at its address)."""
    headers = {"Authorization": f"Bearer {server.worker_token}"}
    made = requests.post(server.url + "/api/workers/register", headers=headers, timeout=30,
                         json={"name": name, "address": "unix:/nonexistent/invoke.sock"})
    assert made.status_code == 201, made.text
    return made.json()["id"], headers


def test_a_heartbeat_with_bad_version_reports_is_a_400(server):
    worker_id, headers = _fake_worker(server, "bad-heartbeats")
    url = f"{server.url}/api/workers/{worker_id}/heartbeat"
    try:
        for versions in ([{"version_id": 2 ** 70, "state": "ready"}],   # past SQLite's INTEGER
                         [{"version_id": -3, "state": "ready"}],
                         [{"version_id": "1", "state": "ready"}],
                         [{"version_id": True, "state": "ready"}],
                         [{"state": "ready"}],
                         [{"version_id": 1, "state": "sleeping"}],
                         [{"version_id": 1, "state": "ready", "error": {"no": 1}}],
                         [7], "ready"):
            answer = requests.post(url, headers=headers, json={"versions": versions},
                                   timeout=30)
            assert answer.status_code == 400, (versions, answer.text)
            assert answer.json()["error"]["type"] == "BadRequest"
        for in_flight in (2 ** 70, -1, "3", 1.5):
            answer = requests.post(url, headers=headers, json={"in_flight": in_flight},
                                   timeout=30)
            assert answer.status_code == 400, (in_flight, answer.text)
        fine = requests.post(url, headers=headers, timeout=30, json={"versions": []})
        assert fine.status_code == 200, fine.text
    finally:
        # Stopped, then forgotten: it never takes a call of another test.
        stopped = requests.post(url, headers=headers, json={"stopping": True}, timeout=30)
        assert stopped.status_code == 200, stopped.text
        assert server.api("DELETE", f"/api/workers/{worker_id}").status_code == 200


def test_numbers_past_the_stores_range_are_a_400(server):
    for query in ({"after": str(2 ** 70)}, {"limit": str(-2 ** 64)}, {"after": "x"}):
        answer = server.api("GET", "/api/invocations", params=query)
        assert answer.status_code == 400, (query, answer.text)
        assert answer.json()["error"]["type"] == "BadRequest"
    assert server.api("GET", "/api/invocations", params={"after": "0"}).status_code == 200


def test_a_registration_with_bad_fields_is_a_400(server):
    headers = {"Authorization": f"Bearer {server.worker_token}"}
    for body in ({"name": "bad-pid", "pid": 2 ** 70}, {"name": "bad-pid", "pid": "12x"},
                 {"name": "bad-pid", "pid": -1}, {"name": "bad-address", "address": ["x"]},
                 {"name": "bad-isolation", "isolation": "on"}):
        answer = requests.post(server.url + "/api/workers/register", headers=headers,
                               json=body, timeout=30)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["type"] == "BadRequest"
    names = {w["name"] for w in server.api("GET", "/api/workers").json()["workers"]}
    assert not names & {"bad-pid", "bad-address", "bad-isolation"}


def test_a_caller_cannot_move_a_request_with_scriptname_or_pathinfo_headers(server):
    for header in ({"SCRIPT_NAME": "/elsewhere"}, {"SCRIPT_NAME": "/heal"},
                   {"PATH_INFO": "/api/containers"}):
        answer = requests.get(server.url + "/healthz", headers=header, timeout=30)
        assert answer.status_code == 200, (header, answer.status_code, answer.text[:200])
        assert answer.json()["status"] == "ok"


def test_a_list_asked_for_no_rows_too_many_or_an_unknown_status_is_a_400(server, pkg):
    server.deploy(pkg("echo", name="inputs-echo"))
    made = server.api("POST", "/api/jobs", json={"name": "inputs-job",
                                                 "target": "inputs-echo/echo",
                                                 "schedule": "@every 1h"})
    assert made.status_code == 201, made.text
    for path in ("/api/invocations", "/api/jobs/inputs-job/runs"):
        for limit in ("0", "-5", "1001", "ten"):
            answer = server.api("GET", path, params={"limit": limit})
            assert answer.status_code == 400, (path, limit, answer.text)
            assert answer.json()["error"]["message"] == (
                "limit must be a whole number from 1 to 1000"), answer.text
        assert server.api("GET", path, params={"limit": "1000"}).status_code == 200
        unknown = server.api("GET", path, params={"status": "bogus"})
        assert unknown.status_code == 400, (path, unknown.text)
        assert unknown.json()["error"]["message"].startswith("status must be one of ")
    runs = server.api("GET", "/api/jobs/inputs-job/runs", params={"status": "skipped"})
    assert runs.status_code == 200 and runs.json()["runs"] == []
    # The CLI says so before asking.
    refused = server.cli("invocations", "--limit", "0", check=False)
    assert refused.returncode == 2 and "--limit" in refused.stderr
    bogus = server.cli("jobs", "runs", "inputs-job", "--status", "bogus", check=False)
    assert bogus.returncode == 1 and "status must be one of waiting, queued" in bogus.stderr

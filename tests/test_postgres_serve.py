"""One `serve --db postgresql://…` with its local worker, through the paths that write state:
deploy and invoke, async calls and their records, the finish cursor `logs --follow` reads,
cancel, jobs, metrics, versions pruned and a container removed with its package files, and a
restart that finds everything where it was."""

from __future__ import annotations

import json
import time

import pytest

from conftest import Server, make_package
from dockyard.app.store.db import connect
from failover_cluster import wait_for


@pytest.fixture(scope="module")
def pg_serve(private_tmp, wheelhouse, postgres_server):
    name = postgres_server.create_database()
    url = postgres_server.url(name)
    data = private_tmp / "pg-serve" / "data"
    data.parent.mkdir()
    args = ["--db", url, "--find-links", str(wheelhouse), "--offline"]
    running = {"srv": Server(data, args)}   # the restart test replaces it
    try:
        yield running, url, args
    finally:
        srv = running["srv"]
        code = srv.stop()
        postgres_server.drop_database(name)
        assert code == 0, srv.log_path.read_text()[-3000:]
        assert not srv.leftovers, srv.leftovers


def _count(url: str, sql: str, params=()) -> int:
    db = connect(url)
    try:
        return db.execute(sql, params).fetchone()[0]
    finally:
        db.close()


def test_calls_records_and_the_finish_cursor(pg_serve, tmp_path):
    running, url, _ = pg_serve
    srv = running["srv"]
    srv.deploy(make_package(tmp_path, "echo", name="pg-echo"))
    listed, cursor = srv.api("GET", "/api/invocations?container=pg-echo").json(), None
    cursor = listed["cursor"]
    answers = [srv.invoke("pg-echo/echo", {"n": n}) for n in range(20)]
    assert [a.json() for a in answers] == [{"n": n} for n in range(20)]
    queued = srv.invoke("pg-echo/echo", {"async": True}, headers={"Prefer": "respond-async"})
    assert queued.status_code == 202, queued.text
    done = srv.wait_invocation(queued.json()["invocation_id"])
    assert done["status"] == "succeeded" and done["output"] == {"async": True}
    ids = {a.headers["X-Dockyard-Invocation-Id"] for a in answers} | {done["id"]}

    seen: list[str] = []

    def followed():
        nonlocal cursor
        page = srv.api("GET", f"/api/invocations?container=pg-echo&after={cursor}").json()
        seen.extend(r["id"] for r in page["invocations"])
        cursor = page["cursor"]
        return set(seen) >= ids
    wait_for("every call after the cursor", followed, 30, 0.1)
    assert len(seen) == len(set(seen)) == 21
    metrics = srv.api("GET", "/metrics").text
    assert 'dockyard_invocations_total{container="pg-echo",status="succeeded"} 21' in metrics


def test_cancel_a_running_call(pg_serve, tmp_path):
    srv = pg_serve[0]["srv"]
    srv.deploy(make_package(tmp_path, "echo", name="pg-sleep"))
    queued = srv.invoke("pg-sleep/sleep", {"s": 60}, headers={"Prefer": "respond-async"})
    inv_id = queued.json()["invocation_id"]
    wait_for("running", lambda: srv.api("GET", f"/api/invocations/{inv_id}").json()["status"]
             == "running", 30, 0.05)
    assert srv.api("POST", f"/api/invocations/{inv_id}/cancel").status_code == 200
    assert srv.wait_invocation(inv_id, 30)["status"] == "cancelled"


def test_a_job_fires_and_pauses(pg_serve, tmp_path):
    running, url, _ = pg_serve
    srv = running["srv"]
    srv.deploy(make_package(tmp_path, "echo", name="pg-job"))
    made = srv.api("POST", "/api/jobs", json={"name": "pg-tick", "target": "pg-job/echo",
                                               "schedule": "@every 1s", "payload": {"t": 1}})
    assert made.status_code == 201, made.text
    runs = wait_for("three fires", lambda: (r := srv.api("GET", "/api/jobs/pg-tick/runs")
                                            .json()["runs"]) and len(
        [x for x in r if x["status"] == "succeeded"]) >= 3 and r, 30, 0.2)
    assert len({r["scheduled_at"] for r in runs}) == len(runs)
    assert srv.api("POST", "/api/jobs/pg-tick/pause").status_code == 200
    manual = srv.api("POST", "/api/jobs/pg-tick/run")
    assert manual.status_code in (200, 201, 202), manual.text
    assert srv.api("DELETE", "/api/jobs/pg-tick").status_code == 200
    assert _count(url, "SELECT count(*) FROM jobs WHERE name = 'pg-tick'") == 0


def test_pruned_versions_and_a_removed_container_take_their_package_files(pg_serve, tmp_path):
    running, url, _ = pg_serve
    srv = running["srv"]
    shas = []
    for n in range(3):
        record = srv.deploy(make_package(tmp_path, "echo", name="pg-prune", version=f"v{n}"))
        shas.append(record["artifact_sha256"])
    chunks = "SELECT count(*) FROM artifact_chunks WHERE sha256 = ?"
    assert all(_count(url, chunks, [sha]) for sha in shas)
    removed: set[str] = set()

    def prune():
        # The version before the serving one stays while a worker keeps it on standby or
        # drains it: prune until the oldest is gone.
        pruned = srv.api("POST", "/api/containers/pg-prune/versions/prune", json={"keep": 1})
        assert pruned.status_code == 200, pruned.text
        removed.update(pruned.json()["artifacts_removed"])
        return shas[0] in removed
    wait_for("the oldest version pruned", prune, 60, 0.5)
    assert shas[2] not in removed
    assert [_count(url, chunks, [sha]) > 0 for sha in shas] == [sha not in removed
                                                                for sha in shas]
    assert srv.api("DELETE", "/api/containers/pg-prune").status_code == 200
    assert _count(url, chunks, [shas[2]]) == 0
    assert srv.invoke("pg-prune/echo", {}).status_code == 404


def test_a_restart_finds_everything_where_it_was(pg_serve, tmp_path):
    running, url, args = pg_serve
    srv = running["srv"]
    srv.deploy(make_package(tmp_path, "echo", name="pg-keep"))
    first_call = srv.invoke("pg-keep/echo", {"before": 1})
    assert first_call.json() == {"before": 1}
    before = srv.api("GET", "/api/containers/pg-keep").json()
    assert srv.stop() == 0 and not srv.leftovers
    again = running["srv"] = Server(srv.data, args)
    after = again.api("GET", "/api/containers/pg-keep").json()
    assert after["serving_version"] == before["serving_version"]
    wait_for("the call after the restart", lambda: again.invoke(
        "pg-keep/echo", {"after": 1}).status_code == 200, 60, 0.2)
    kept = again.api("GET", "/api/invocations/"
                     + first_call.headers["X-Dockyard-Invocation-Id"]).json()
    assert kept["status"] == "succeeded" and kept["input"] == {"before": 1}
    assert "pg-keep" in again.cli("status").stdout
    assert "pg-keep" in [c["name"] for c in json.loads(again.cli("--json", "ls").stdout)
                         ["containers"]]

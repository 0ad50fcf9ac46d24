"""How deployments are judged, on a real SQLite database through the store's own functions:
a deployment overtaken by a newer one ends (it is not left pending, holding its version from
pruning), and a rollback is judged on the workers' reports about the rollback, not on what
they said about the version before it."""

from __future__ import annotations

import pytest

from dockyard.app.store.db import connect, migrate
from dockyard.app.store import containers, workers
from dockyard.common.manifest import Manifest


@pytest.fixture
def db(store_target):
    path = store_target
    migrate(path)
    database = connect(path)
    yield database
    database.close()


def _upload(db, version: str) -> dict:
    manifest = Manifest.from_dict({"name": "app", "version": version,
                                   "functions": {"f": "main:f"}})
    _, row, _ = containers.add_version(db, manifest, f"content-{version}",
                                       f"artifact-{version}", 1, activate=True)
    return row


def _deployment(db, version_row: dict) -> dict:
    return containers.latest_deployment(db, version_row["id"])


def _report(db, worker: str, version_row: dict, state: str, deployment: str | None) -> None:
    workers.heartbeat(db, worker, [{"version_id": version_row["id"], "state": state,
                                    "deployment": deployment}])


def test_a_deployment_overtaken_by_a_newer_one_ends_and_its_version_can_be_pruned(db):
    worker = workers.register(db, {"address": "unix:/w"})["id"]
    v1 = _upload(db, "v1")
    _report(db, worker, v1, "ready", _deployment(db, v1)["id"])
    v2 = _upload(db, "v2")      # still building when v3 arrives
    _report(db, worker, v2, "building", _deployment(db, v2)["id"])
    v3 = _upload(db, "v3")
    over = _deployment(db, v2)
    assert over["status"] == "superseded" and over["finished_at"]
    assert over["error"].startswith("superseded: app@v3 was deployed")
    # Nothing is held against v2: its version is no failed one (for rollback, `versions`
    # and the Lambda API's State).
    listed = {v["version"]: v["last_deployment"]["status"]
              for v in containers.list_versions(db, "app")}
    assert listed == {"v3": "pending", "v2": "superseded", "v1": "ready"}, listed
    _report(db, worker, v3, "ready", _deployment(db, v3)["id"])
    assert _deployment(db, v3)["status"] == "ready"
    pruned = containers.prune_versions(db, "app", keep=1)
    assert [v["version"] for v in pruned["deleted"]] == ["v2", "v1"]


def test_a_rollback_is_judged_on_reports_about_it_not_on_earlier_ones(db):
    worker = workers.register(db, {"address": "unix:/w"})["id"]
    v1 = _upload(db, "v1")
    first = _deployment(db, v1)["id"]
    _report(db, worker, v1, "ready", first)
    v2 = _upload(db, "v2")
    _report(db, worker, v2, "ready", _deployment(db, v2)["id"])
    # v1 is standby now; a pinned call started it on demand, and its pool scaled to zero.
    workers.heartbeat(db, worker, [
        {"version_id": v1["id"], "state": "idle", "deployment": first},
        {"version_id": v2["id"], "state": "ready", "deployment": _deployment(db, v2)["id"]}])
    containers.activate(db, "app", "v1")
    rollback = _deployment(db, v1)
    assert rollback["id"] != first and rollback["status"] == "pending"
    # A heartbeat from before the worker saw the rollback changes nothing: v2 still serves.
    workers.heartbeat(db, worker, [
        {"version_id": v1["id"], "state": "idle", "deployment": first},
        {"version_id": v2["id"], "state": "ready", "deployment": _deployment(db, v2)["id"]}])
    assert containers.get_container(db, "app")["serving_version_id"] == v2["id"]
    assert _deployment(db, v1)["status"] == "pending"
    # The worker's report about the rollback switches traffic.
    workers.heartbeat(db, worker, [
        {"version_id": v1["id"], "state": "ready", "deployment": rollback["id"]},
        {"version_id": v2["id"], "state": "draining", "deployment": _deployment(db, v2)["id"]}])
    assert containers.get_container(db, "app")["serving_version_id"] == v1["id"]
    assert _deployment(db, v1)["status"] == "ready"


def test_deploying_the_serving_version_again_keeps_its_workers_routable(db):
    worker = workers.register(db, {"address": "unix:/w"})["id"]
    v1 = _upload(db, "v1")
    _report(db, worker, v1, "ready", _deployment(db, v1)["id"])
    rows = db.execute("SELECT count(*) FROM worker_versions WHERE version_id = ? AND "
                           "state = 'ready'", [v1["id"]]).fetchone()[0]
    containers.activate(db, "app", "v1")   # already active and serving: nothing to do
    assert db.execute("SELECT count(*) FROM worker_versions WHERE version_id = ? AND "
                           "state = 'ready'", [v1["id"]]).fetchone()[0] == rows == 1


@pytest.mark.parametrize("log, expected", [
    # Nothing cut: everything after the earlier log.
    ("09:00 built\n09:00 ready\n09:05 virtualenv already built\n09:05 ready\n",
     "09:05 virtualenv already built\n09:05 ready\n"),
    # The worker cut the log's first line: what is left of the earlier log, then the new lines
    # (the same second), the last of them the very line the earlier log ends with.
    ("09:00 ready\n09:00 again\n09:00 ready\n", "09:00 again\n09:00 ready\n"),
])
def test_a_deployment_s_own_log_lines_survive_a_cut_log_and_repeated_lines(log, expected):
    from dockyard.app.store.workers import own_log
    assert own_log(log, "09:00 built\n09:00 ready\n") == expected

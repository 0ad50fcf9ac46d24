"""The traffic split in the store, on SQLite and PostgreSQL alike: what it holds and refuses, its
part in the route (a change bumps the routing generation), the versions workers keep running,
and what ends it."""

from __future__ import annotations

import pytest

from dockyard.app.store import containers, routing, traffic
from dockyard.app.store.db import connect, migrate, routing_generation
from dockyard.common.manifest import Manifest
from dockyard.errors import BadRequest, Conflict, NotFound


def _version(db, version: str, activate: bool) -> None:
    manifest = Manifest.from_dict({"name": "app", "version": version,
                                   "functions": {"f": "main:f"}})
    containers.add_version(db, manifest, version * 8, "a" * 64, 1, activate)


@pytest.fixture
def db(store_target):
    migrate(store_target)
    database = connect(store_target)
    _version(database, "v1", activate=True)
    # As a worker's report would: v1 is ready, so it serves.
    database.execute("UPDATE containers SET serving_version_id = active_version_id")
    _version(database, "v2", activate=False)
    _version(database, "v3", activate=False)
    yield database
    database.close()


def _roles(db) -> dict[str, str]:
    return {v["version"]: v["role"] for v in containers.desired_versions(db)}


def test_a_split_is_held_routed_and_kept_running(db):
    assert traffic.describe(db, "app")["weights"] == {"v1": 1.0}
    assert _roles(db) == {"v1": "serve", "v2": "standby", "v3": "standby"}
    before = routing_generation(db)
    answer = traffic.set_split(db, "app", {"v2": 0.1, "v3": 0.25})
    assert answer["weights"] == {"v1": 0.65, "v2": 0.1, "v3": 0.25}
    assert answer["serving"] == "v1"
    # Part of the route: every web process looks it up again.
    assert routing_generation(db) > before
    assert routing.split(db, "app") == (("v2", 0.1), ("v3", 0.25))
    assert _roles(db) == {"v1": "serve", "v2": "serve", "v3": "serve"}
    assert containers.list_containers(db)[0]["traffic"] == {"v1": 0.65, "v2": 0.1,
                                                            "v3": 0.25}
    # Naming the serving version too: the shares add up to 1; a zero share is no share.
    assert traffic.set_split(db, "app", {"v1": 0.7, "v2": 0.3, "v3": 0})["weights"] == \
        {"v1": 0.7, "v2": 0.3}
    assert routing.split(db, "app") == (("v2", 0.3),)
    assert traffic.set_split(db, "app", {})["weights"] == {"v1": 1.0}
    assert routing.split(db, "app") == ()
    assert containers.list_containers(db)[0]["traffic"] is None


@pytest.mark.parametrize("weights, error", [
    ({"v2": 1.2}, BadRequest), ({"v2": -0.1}, BadRequest), ({"v2": float("nan")}, BadRequest),
    ({"v2": "0.1"}, BadRequest), ({"v2": False}, BadRequest), (["v2"], BadRequest),
    ({"v2": 0.6, "v3": 0.6}, BadRequest), ({"v1": 0.5, "v2": 0.1}, BadRequest),
    ({"v9": 0.1}, NotFound)])
def test_bad_splits_change_nothing(db, weights, error):
    traffic.set_split(db, "app", {"v2": 0.2})
    with pytest.raises(error):
        traffic.set_split(db, "app", weights)
    assert routing.split(db, "app") == (("v2", 0.2),)


def test_a_deploy_a_rollback_or_an_undeploy_ends_the_split(db):
    with pytest.raises(NotFound):
        traffic.set_split(db, "nope", {})
    traffic.set_split(db, "app", {"v2": 0.2})
    _version(db, "v4", activate=True)            # a deploy: v4 takes all once ready
    assert routing.split(db, "app") == ()
    # ...and while it is under way, a split waits for it.
    with pytest.raises(Conflict):
        traffic.set_split(db, "app", {"v2": 0.2})
    db.execute("UPDATE containers SET serving_version_id = active_version_id")
    traffic.set_split(db, "app", {"v2": 0.2})
    containers.undeploy(db, "app")
    assert routing.split(db, "app") == ()
    with pytest.raises(Conflict):                # nothing serves: nothing to split
        traffic.set_split(db, "app", {"v2": 0.2})


def test_prune_keeps_the_split_and_rm_forgets_it(db):
    traffic.set_split(db, "app", {"v2": 0.2})
    pruned = containers.prune_versions(db, "app", keep=1)
    # v3 is the newest (kept), v1 serves, v2 is in the split: none goes.
    assert pruned["deleted"] == []
    assert "in the traffic split" in {k["version"]: k["reasons"] for k in pruned["kept"]}["v2"]
    containers.delete_container(db, "app")
    assert db.execute("SELECT count(*) FROM traffic_splits").fetchone()[0] == 0


def test_the_versions_an_alias_names_are_kept_running(db):
    from dockyard.app.store import aliases
    aliases.create(db, "app", "prod", "v2", None, "")
    assert _roles(db) == {"v1": "serve", "v2": "serve", "v3": "standby"}
    aliases.update(db, "app", "prod", {"extra": {"v3": 0.1}})
    assert _roles(db) == {"v1": "serve", "v2": "serve", "v3": "serve"}
    # Following $LATEST names no version of its own; a changed alias lets its old one go.
    aliases.update(db, "app", "prod", {"function_version": "$LATEST", "extra": {}})
    assert _roles(db) == {"v1": "serve", "v2": "standby", "v3": "standby"}
    aliases.update(db, "app", "prod", {"function_version": "v3"})
    aliases.delete(db, "app", "prod")
    assert _roles(db) == {"v1": "serve", "v2": "standby", "v3": "standby"}

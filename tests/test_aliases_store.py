"""The aliases table on SQLite and PostgreSQL: create, read, update (with its revision),
delete, and the version a call through an alias runs."""

from __future__ import annotations

import json

import pytest

from dockyard.app.store import aliases
from dockyard.app.store.db import connect, migrate
from dockyard.errors import BadRequest, Conflict, NotFound


@pytest.fixture
def db(store_target):
    migrate(store_target)
    database = connect(store_target)
    database.execute("INSERT INTO containers (id, name) VALUES (1, 'app')")
    for vid, version in ((10, "v1"), (11, "v2")):
        database.execute("INSERT INTO versions (id, container_id, version, manifest) "
                         "VALUES (?, 1, ?, ?)", [vid, version, json.dumps({"name": "app"})])
    yield database
    database.close()


def test_alias_rows(db):
    row = aliases.create(db, "app", "live", "v1", {"v2": 0.25}, "canary")
    assert (row["function_version"], row["extra_version"], row["extra_weight"]) == \
        ("v1", "v2", 0.25)
    assert aliases.get(db, "app", "live")["description"] == "canary"
    with pytest.raises(Conflict):
        aliases.create(db, "app", "live", "v1", None, "")
    with pytest.raises(Conflict):
        aliases.create(db, "app", "v2", "v1", None, "")
    with pytest.raises(NotFound):
        aliases.create(db, "app", "x", "v3", None, "")
    with pytest.raises(NotFound):
        aliases.create(db, "nope", "x", "v1", None, "")
    with pytest.raises(BadRequest):
        aliases.create(db, "app", "x", "v1", {"v1": 0.5}, "")
    revision = row["revision"]
    moved = aliases.update(db, "app", "live", {"function_version": "v2", "extra": {}},
                           revision)
    assert moved["function_version"] == "v2" and moved["extra_version"] is None
    assert moved["revision"] != revision
    with pytest.raises(Conflict):
        aliases.update(db, "app", "live", {"function_version": "v1"}, revision)
    kept = aliases.update(db, "app", "live", {"description": "all on v2"})
    assert kept["function_version"] == "v2" and kept["description"] == "all on v2"
    aliases.create(db, "app", "latest", "$LATEST", None, "")
    assert [a["name"] for a in aliases.list_for(db, "app")] == ["latest", "live"]
    aliases.delete(db, "app", "live")
    assert aliases.get(db, "app", "live") is None
    with pytest.raises(NotFound):
        aliases.update(db, "app", "live", {})


def test_pick_draws_the_extra_version_by_its_weight():
    alias = {"function_version": "v1", "extra_version": "v2", "extra_weight": 0.3}
    assert aliases.pick(alias, draw=lambda: 0.29) == "v2"
    assert aliases.pick(alias, draw=lambda: 0.3) == "v1"
    assert aliases.pick(dict(alias, extra_weight=0.0), draw=lambda: 0.0) == "v1"
    assert aliases.pick({"function_version": "$LATEST", "extra_version": None,
                         "extra_weight": None}) is None

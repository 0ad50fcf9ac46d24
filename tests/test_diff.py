"""The reconcile diff is a pure function."""

from dockyard.runner.diff import diff_versions


def spec(version_id, role="serve"):
    return {"version_id": version_id, "role": role}


def test_added_changed_removed():
    diff = diff_versions([spec(1), spec(2, "standby"), spec(4)],
                         {1: "serve", 2: "serve", 3: "serve"})
    assert [s["version_id"] for s in diff.added] == [4]
    assert [s["version_id"] for s in diff.changed] == [2]
    assert diff.removed == [3]
    assert diff


def test_nothing_to_do():
    assert not diff_versions([spec(1)], {1: "serve"})
    assert not diff_versions([], {})
    assert diff_versions([], {7: "standby"}).removed == [7]


def test_a_new_deployment_of_a_served_version_is_a_change():
    desired = [{"version_id": 1, "role": "serve", "deployment": "dep_b"},
               {"version_id": 2, "role": "standby", "deployment": "dep_c"}]
    diff = diff_versions(desired, {1: "serve", 2: "standby"}, {1: "dep_a", 2: "dep_x"})
    assert [s["version_id"] for s in diff.changed] == [1]   # a standby is not retried
    assert not diff_versions(desired, {1: "serve", 2: "standby"}, {1: "dep_b", 2: "dep_c"})


def test_a_reused_version_id_naming_another_version_is_a_replacement():
    """SQLite gives a deleted version's id to the next version inserted: a container deleted
    and deployed again can bring the same id with other content, for which the held runtime
    (its code, its uid) is wrong."""
    from dockyard.runner.diff import identity
    old = {"version_id": 5, "role": "serve", "uid_key": "i.3.100", "container": "app",
           "content_sha256": "aaa"}
    new = dict(old, uid_key="i.3.200", content_sha256="bbb")
    diff = diff_versions([new], {5: "serve"}, {5: None}, {5: identity(old)})
    assert diff.replaced == [new] and not diff.added and not diff.changed and not diff.removed
    assert not diff_versions([old], {5: "serve"}, {5: None}, {5: identity(old)})

"""A container's traffic split (`dockyard traffic`, /api/containers/<name>/traffic): a share of
the calls that name no version goes to another version, the split survives a restart, shows in
`status` and on /metrics, a deploy or rollback replaces it, and prune never removes a version
a split or an alias names."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
import requests

from conftest import Server, make_package, poll_until, zip_folder

CALLS = 500
SHARE = 0.2


def _upload(server: Server, folder, activate: bool = False) -> dict:
    response = server.api("POST", "/api/containers" + ("" if activate else "?activate=0"),
                          data=zip_folder(folder))
    assert response.status_code in (200, 201), response.text
    return response.json()


def _ready_on_a_worker(server: Server, container: str, version: str) -> bool:
    return any(v["container"] == container and v["version"] == version and v["state"] == "ready"
               for w in server.api("GET", "/api/workers").json()["workers"]
               for v in w["versions"])


def _ran(server: Server, container: str, count: int) -> dict[str, int]:
    """How many of `count` unpinned calls each version ran (as the call's context says, and
    the answer's header)."""
    ran: dict[str, int] = {}
    with requests.Session() as http:
        for _ in range(count):
            answer = http.post(f"{server.url}/invoke/{container}/ctx", data="{}", timeout=60)
            assert answer.status_code == 200, answer.text
            version = answer.json()["version"]
            assert answer.headers["X-Dockyard-Version"] == version
            ran[version] = ran.get(version, 0) + 1
    return ran


def _metric(server: Server, name: str, **labels) -> float | None:
    text = server.api("GET", "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return None


def _canary(server: Server, tmp, name: str) -> None:
    """Container `name`: v1 serving, v2 uploaded and not activated."""
    server.deploy(make_package(tmp, "echo", name=name, version="v1"))
    _upload(server, make_package(tmp, "echo", name=name, version="v2",
                                 files={"extra.py": "X = 2\n"}))


@pytest.fixture
def own_server(private_tmp, wheelhouse, tmp_path):
    """A serve of this test's own (it is restarted), with container `canary`."""
    data = private_tmp / "traffic" / "data"
    data.parent.mkdir()
    server = Server(data, ["--find-links", str(wheelhouse), "--offline"])
    servers = [server]
    try:
        _canary(server, tmp_path, "canary")
        yield {"servers": servers, "data": data, "wheelhouse": wheelhouse}
    finally:
        for s in servers:
            if s.proc.poll() is None:
                assert s.stop() == 0, s.log_path.read_text()[-3000:]
                assert not s.leftovers, s.leftovers


def test_a_split_sends_its_share_survives_a_restart_and_a_rollback_ends_it(own_server):
    canary = own_server
    server = canary["servers"][0]
    shown = server.cli("traffic", "canary").stdout
    assert re.search(r"v1\s+100%\s+serving", shown), shown
    assert "no split" in shown

    done = server.cli("traffic", "canary", "v2=20%", "--json")
    assert json.loads(done.stdout)["weights"] == {"v1": 0.8, "v2": 0.2}
    # The split's version is started on every worker, as the serving one is (no cold start
    # for the calls it draws).
    poll_until(lambda: _ready_on_a_worker(server, "canary", "v2"), 120, "v2 never started")

    ran = _ran(server, "canary", CALLS)
    assert set(ran) == {"v1", "v2"}, ran
    expected, spread = CALLS * SHARE, 4 * (CALLS * SHARE * (1 - SHARE)) ** 0.5
    assert abs(ran["v2"] - expected) <= spread, ran

    # Every call's record names the version that ran it, and /metrics counts them by version.
    def by_version() -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in server.api("GET", "/api/invocations", params={
                "container": "canary", "limit": 1000}).json()["invocations"]:
            counts[record["version"]] = counts.get(record["version"], 0) + 1
        return counts

    # (Records are written off the request thread: each shortly after its answer.)
    poll_until(lambda: by_version() == ran, 30, "the records never named the versions that ran")
    poll_until(lambda: _metric(server, "dockyard_version_invocations_total",
                               container="canary", version="v2", status="succeeded")
               == ran["v2"], 30, "metrics never counted v2's calls")
    assert _metric(server, "dockyard_traffic_share", container="canary", version="v2") == 0.2
    assert _metric(server, "dockyard_traffic_share", container="canary", version="v1") == 0.8

    status = server.cli("status").stdout
    assert "v1 80% · v2 20%" in status, status
    assert "v1 80% · v2 20%" in server.cli("status", "canary").stdout

    # A pinned call is not split.
    pinned = server.invoke("canary@v1/ctx", {})
    assert pinned.status_code == 200 and pinned.json()["version"] == "v1"

    # The split is kept in the store: a restart keeps it.
    assert server.stop() == 0
    server = Server(canary["data"], ["--find-links", str(canary["wheelhouse"]), "--offline"])
    canary["servers"].append(server)
    assert server.api("GET", "/api/containers/canary/traffic").json()["weights"] == \
        {"v1": 0.8, "v2": 0.2}
    poll_until(lambda: _ready_on_a_worker(server, "canary", "v1") and
               _ready_on_a_worker(server, "canary", "v2"), 120, "the versions never restarted")
    ran = _ran(server, "canary", 60)
    assert set(ran) == {"v1", "v2"}, ran

    # A rollback (any activation) replaces the split: the version it activates takes it all.
    server.cli("rollback", "canary", "v2")
    assert server.api("GET", "/api/containers/canary/traffic").json()["weights"] == {"v2": 1.0}
    assert _ran(server, "canary", 40) == {"v2": 40}
    assert _metric(server, "dockyard_traffic_share", container="canary", version="v1") is None


def test_a_share_on_a_version_that_cannot_start_is_served_by_the_serving_one(server, tmp_path):
    _canary(server, tmp_path, "canary-broken")
    broken = make_package(tmp_path, "broken_import", name="canary-broken", version="v3")
    _upload(server, broken)
    server.cli("traffic", "canary-broken", "v3=50%")
    # Each worker tries it (it is in the split) and it fails there; its calls never did.
    poll_until(lambda: any(v["container"] == "canary-broken" and v["version"] == "v3" and
                           v["state"] == "failed"
                           for w in server.api("GET", "/api/workers").json()["workers"]
                           for v in w["versions"]), 120, "v3 was never tried")
    assert _ran(server, "canary-broken", 40) == {"v1": 40}


def test_bad_splits_are_refused_with_one_line_and_change_nothing(server, tmp_path):
    _canary(server, tmp_path, "canary-bad")
    server.cli("traffic", "canary-bad", "v2=10%")
    refusals = [
        ({"weights": {"v2": 1.5}}, 400, "must be a number from 0 to 1"),
        ({"weights": {"v2": "10%"}}, 400, "must be a number from 0 to 1"),
        ({"weights": {"v2": True}}, 400, "must be a number from 0 to 1"),
        ({"weights": {"v1": 0.5, "v2": 0.2}}, 400, "must add up to 1"),
        ({"weights": {"nope": 0.1}}, 404, "has no version 'nope'"),
        ({"weights": ["v2"]}, 400, "e.g."),
        ({"weight": {"v2": 0.1}}, 400, "e.g."),
    ]
    for body, status, words in refusals:
        answer = server.api("POST", "/api/containers/canary-bad/traffic", json=body)
        assert answer.status_code == status, (body, answer.text)
        assert words in answer.json()["error"]["message"], (body, answer.text)
    assert server.api("POST", "/api/containers/nope/traffic",
                      json={"weights": {}}).status_code == 404
    assert server.api("GET", "/api/containers/canary-bad/traffic").json()["weights"] == \
        {"v1": 0.9, "v2": 0.1}
    bad = server.cli("traffic", "canary-bad", "v2=abc", check=False)
    assert bad.returncode != 0 and "the share is a percentage" in bad.stderr, bad.stderr
    over = server.cli("traffic", "canary-bad", "v2=150", check=False)
    assert over.returncode != 0 and "150%" in over.stderr, over.stderr
    # The serving version named too: the shares must add up to 1.
    done = server.cli("traffic", "canary-bad", "v1=70%", "v2=30%", "--json")
    assert json.loads(done.stdout)["weights"] == {"v1": 0.7, "v2": 0.3}
    # --reset ends it.
    assert json.loads(server.cli("traffic", "canary-bad", "--reset", "--json").stdout)[
        "weights"] == {"v1": 1.0}
    # While a deployment is under way the split waits for it.
    slow = make_package(tmp_path, "echo", name="canary-bad", version="v9",
                        files={"slow.py": "import time\ntime.sleep(30)\n\ndef f(event):\n"
                                          "    return event\n"},
                        manifest_extra='[functions]\nslow = "slow:f"\n')
    _upload(server, slow, activate=True)
    answer = server.api("POST", "/api/containers/canary-bad/traffic", json={"weights": {"v2": 0.1}})
    assert answer.status_code == 409, answer.text
    assert "a deployment of 'canary-bad' is under way" in answer.json()["error"]["message"]
    server.cli("rm", "canary-bad")   # its slow version stops starting


def test_prune_keeps_what_a_split_or_an_alias_names_and_rm_forgets_both(server, tmp_path):
    _canary(server, tmp_path, "canary-prune")
    for version in ("v3", "v4"):
        _upload(server, make_package(tmp_path, "echo", name="canary-prune", version=version,
                                     files={"extra.py": f"X = '{version}'\n"}))
    server.cli("traffic", "canary-prune", "v2=10%")
    db = sqlite3.connect(server.data / "dockyard.db")
    try:
        with db:
            db.execute("INSERT INTO aliases (container, name, function_version, revision, "
                       "created_at, updated_at) VALUES ('canary-prune', 'live', 'v3', 'r', 0, 0)")
    finally:
        db.close()
    # Newest first: v4, v3, v2, v1; keep 1 keeps v4, and v1 serves, v2 is in the split, v3
    # has an alias: nothing else to delete. Without those, all but v4 and v1 would go.
    pruned = server.api("POST", "/api/containers/canary-prune/versions/prune",
                        json={"keep": 1}).json()
    assert pruned["deleted"] == [], pruned
    reasons = {k["version"]: k["reasons"] for k in pruned["kept"]}
    assert "in the traffic split" in reasons["v2"], reasons
    assert "alias live" in reasons["v3"], reasons
    shown = server.cli("versions", "prune", "canary-prune", "--keep", "1").stdout
    assert "in the traffic split" in shown and "alias live" in shown, shown

    server.cli("rm", "canary-prune")
    db = sqlite3.connect(server.data / "dockyard.db")
    try:
        assert db.execute("SELECT count(*) FROM aliases WHERE container = 'canary-prune'"
                          ).fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM traffic_splits WHERE container_id NOT IN "
                          "(SELECT id FROM containers)").fetchone()[0] == 0
    finally:
        db.close()

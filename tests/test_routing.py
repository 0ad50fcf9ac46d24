"""Routes kept in memory by each web process: any write that changes where a call goes bumps
the routing generation (by trigger), and the transaction that made it raises the routing hint
(a page beside the database) once committed, so a kept route is never used after a deploy, an
activation, a removal or a worker's change of state; writes that change nothing about
routing (heartbeats, records) leave both alone, so routes stay kept under load. A write made
outside dockyard's transactions (by hand, in another tool) is seen within a second."""

from __future__ import annotations

import json
import time

import pytest

from dockyard.app.invoke import execute as invoke
from dockyard.app.store.db import connect, migrate, transaction
from dockyard.app.store.routing_hint import routing_hint
from dockyard.app.store import routing
from dockyard.errors import NotFound


def _manifest(name: str) -> str:
    return json.dumps({"name": name, "functions": {"f": "main:f"}})


@pytest.fixture
def db(store_target):
    path = store_target
    migrate(path)
    database = connect(path)
    conn = database
    conn.execute("INSERT INTO containers (id, name, active_version_id, serving_version_id) "
                 "VALUES (1, 'app', 10, 10)")
    for vid, version in ((10, "v1"), (11, "v2")):
        conn.execute("INSERT INTO versions (id, container_id, version, manifest) "
                     "VALUES (?, 1, ?, ?)", [vid, version, _manifest("app")])
    conn.execute("INSERT INTO workers (id, address, state, last_seen) "
                 "VALUES ('w1', 'unix:/w1', 'up', ?)", [time.time()])
    conn.execute("INSERT INTO worker_versions (worker_id, version_id, state) "
                 "VALUES ('w1', 10, 'ready'), ('w1', 11, 'ready')")
    invoke._routes.clear()
    yield database
    invoke._routes.clear()
    conn.close()


def _write(db, sql: str) -> None:
    """As dockyard's own store functions write: in a transaction."""
    with transaction(db) as conn:
        conn.execute(sql)


def _queries(monkeypatch) -> list:
    made = []
    real = routing.route

    def counting(*args):
        made.append(args[1:])
        return real(*args)
    monkeypatch.setattr(routing, "route", counting)
    return made


def test_a_kept_route_is_used_until_something_about_routing_changes(db, monkeypatch):
    queries = _queries(monkeypatch)
    target, workers = invoke.route(db, "app", None)
    assert (target.version, [w["id"] for w in workers]) == ("v1", ["w1"])
    for _ in range(5):
        assert invoke.route(db, "app", None)[0].version == "v1"
    assert len(queries) == 1

    # An activation that switches traffic is seen on the very next call.
    _write(db, "UPDATE containers SET serving_version_id = 11 WHERE id = 1")
    assert invoke.route(db, "app", None)[0].version == "v2"
    assert len(queries) == 2

    # The worker stops having the version ready: no worker for it any more.
    _write(db, "UPDATE worker_versions SET state = 'stopping' WHERE version_id = 11")
    assert invoke.route(db, "app", None)[1] == []

    # The worker is marked lost: gone from the pinned version's route too.
    assert [w["id"] for w in invoke.route(db, "app", "v1")[1]] == ["w1"]
    _write(db, "UPDATE workers SET state = 'lost' WHERE id = 'w1'")
    assert invoke.route(db, "app", "v1")[1] == []

    # Removal: the container is gone at once.
    with transaction(db) as conn:
        conn.execute("DELETE FROM worker_versions")
        conn.execute("DELETE FROM versions")
        conn.execute("DELETE FROM containers")
    with pytest.raises(NotFound):
        invoke.route(db, "app", None)


def test_the_hint_moves_with_a_committed_route_change_only(db):
    hint = routing_hint(db.path)
    before = hint.value()
    _write(db, "UPDATE workers SET last_seen = last_seen + 1")   # a heartbeat
    assert hint.value() == before
    _write(db, "UPDATE containers SET serving_version_id = 11 WHERE id = 1")
    raised = hint.value()
    assert raised != before
    with pytest.raises(RuntimeError):
        with transaction(db) as conn:
            conn.execute("UPDATE containers SET serving_version_id = 10 WHERE id = 1")
            raise RuntimeError("rolled back")
    assert hint.value() == raised


def test_the_hint_is_one_counter_for_every_process_and_thread(db):
    """Bumps from several threads and processes at once are all counted (a lost bump could
    leave a process trusting a route it should look up again)."""
    import multiprocessing
    import threading
    hint = routing_hint(db.path)
    before = hint.value()

    def bumps(n: int) -> None:
        for _ in range(n):
            routing_hint(db.path).bump()

    threads = [threading.Thread(target=bumps, args=(200,)) for _ in range(4)]
    procs = [multiprocessing.get_context("fork").Process(target=bumps, args=(200,))
             for _ in range(2)]
    for worker in [*threads, *procs]:
        worker.start()
    for worker in [*threads, *procs]:
        worker.join()
    assert all(p.exitcode == 0 for p in procs)
    assert hint.value() == before + 6 * 200


def test_a_write_made_outside_dockyard_is_seen_within_a_second(db, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(invoke.time, "monotonic", lambda: clock[0])
    assert invoke.route(db, "app", None)[0].version == "v1"
    db.execute("UPDATE containers SET serving_version_id = 11 WHERE id = 1")
    clock[0] += invoke.ROUTE_MAX_AGE_S + 0.01
    assert invoke.route(db, "app", None)[0].version == "v2"


def test_heartbeats_and_records_leave_the_generation_alone(db):
    before = routing.generation(db)
    db.execute("UPDATE workers SET last_seen = last_seen + 1, state = 'up'")
    db.execute("UPDATE worker_versions SET state = 'ready', updated_at = 5")
    db.execute("INSERT INTO invocations (id, container, status) VALUES ('inv_1', 'app', "
                    "'succeeded')")
    assert routing.generation(db) == before
    db.execute("UPDATE workers SET address = 'unix:/elsewhere'")
    assert routing.generation(db) == before + 1


def test_a_route_is_looked_up_again_once_it_is_a_second_old(db, monkeypatch):
    """A worker whose heartbeats stopped drops out of the query's answer by time alone, with
    no write: a kept route must not outlive that by more than ROUTE_MAX_AGE_S."""
    queries = _queries(monkeypatch)
    invoke.route(db, "app", None)
    monkeypatch.setattr(invoke, "ROUTE_MAX_AGE_S", 0.0)
    invoke.route(db, "app", None)
    assert len(queries) == 2


def test_a_fresh_lookup_is_forced_when_asked(db, monkeypatch):
    """After a worker answered not_running or was gone, the retry looks again."""
    queries = _queries(monkeypatch)
    invoke.route(db, "app", None)
    invoke.route(db, "app", None, fresh=True)
    assert len(queries) == 2

"""The guarantees that rest on the database, on SQLite and on PostgreSQL alike: one lease
holder with a growing fencing number, a scheduled time fired once, finish numbers a follower
reads without a gap or a repeat while many writers finish calls at once, migrations run once
by whichever process comes first, and (PostgreSQL) route changes heard by another control
plane, package files and tokens shared through the database."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time

import pytest

from dockyard.app.artifacts import ArtifactStore
from dockyard.app.store import invocations, job_runs, leases
from dockyard.app.store import tokens as token_store
from dockyard.app.store.db import connect, migrate, transaction
from dockyard.app.store.engine import POSTGRES, DbUrl, is_postgres
from dockyard.app.store.route_listener import RouteListener
from dockyard.app.store.routing_hint import routing_hint


@pytest.fixture
def target(store_target):
    migrate(store_target)
    return store_target


def _threads(n: int, work) -> list:
    results: list = [None] * n
    errors: list = []

    def run(i):
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_one_holder_of_a_lease_and_a_new_fencing_number_on_takeover(target):
    start = threading.Barrier(8)

    def contend(i):
        db = connect(target)
        try:
            start.wait()
            return leases.acquire(db, "scheduler", f"holder-{i}", ttl_s=30)
        finally:
            db.close()
    got = _threads(8, contend)
    assert [g for g in got if g is not None] == [1]
    winner = f"holder-{got.index(1)}"
    db = connect(target)
    try:
        assert leases.acquire(db, "scheduler", winner, 30) == 1          # a renewal
        # The holder stalls past its expiry: another takes over with a new number, and the
        # stalled one can write nothing under its old one.
        db.execute("UPDATE leases SET expires_at = ? WHERE name = 'scheduler'", [time.time() - 1])
        assert leases.acquire(db, "scheduler", "successor", 30) == 2
        with pytest.raises(leases.LeaseLost):
            with leases.holding(db, "scheduler", winner, 1) as conn:
                conn.execute("INSERT INTO settings (key, value) VALUES ('stale', 'write')")
        assert db.execute("SELECT count(*) FROM settings WHERE key = 'stale'").fetchone()[0] == 0
        with leases.holding(db, "scheduler", "successor", 2) as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES ('fresh', 'write')")
        assert db.execute("SELECT count(*) FROM settings WHERE key = 'fresh'").fetchone()[0] == 1
    finally:
        db.close()


def test_one_refused_a_lease_tries_again_as_it_runs_out(target):
    db = connect(target)
    try:
        assert leases.retry_in(db, "dispatcher", 3.0) == 0.0        # nobody holds it: now
        assert leases.acquire(db, "dispatcher", "holder", ttl_s=30) == 1
        assert leases.retry_in(db, "dispatcher", 3.0) == 3.0        # far off: the period
        db.execute("UPDATE leases SET expires_at = ? WHERE name = 'dispatcher'",
                   [time.time() + 60])
        assert 30 < leases.retry_in(db, "dispatcher", 120) <= 60.05  # just after it ends
        db.execute("UPDATE leases SET expires_at = ? WHERE name = 'dispatcher'",
                   [time.time() - 5])
        assert leases.retry_in(db, "dispatcher", 3.0) == 0.05       # over: at once
    finally:
        db.close()


def test_a_scheduled_time_fires_once_whoever_writes_it(target):
    start = threading.Barrier(6)

    def fire(i):
        db = connect(target)
        try:
            start.wait()
            with transaction(db) as conn:
                return job_runs.insert(conn, "job_1", "schedule", 1_700_000_000.0, 1, "queued",
                                       fencing=i)
        finally:
            db.close()
    assert sorted(_threads(6, fire)) == [False] * 5 + [True]


def test_a_follower_sees_every_finish_once_while_writers_race(target):
    """Four writers finish 152 calls (52 records written finished, 100 queued calls finished
    in place), and a follower reads `finished_after` from its cursor the whole time: at the end
    it has seen each call exactly once."""
    db = connect(target)
    queued = [invocations.new_id() + f"{n:04d}" for n in range(100)]
    for inv_id in queued:
        invocations.enqueue(db, inv_id, "app", "v1", "f", "async", "{}")
        db.execute("UPDATE invocations SET status = 'running', owner = 'd' WHERE id = ?",
                   [inv_id])
    done = threading.Event()
    seen: list[str] = []

    def follow():
        reader = connect(target)
        cursor = 0
        try:
            while True:
                finished = done.is_set()
                rows, cursor = invocations.finished_after(reader, cursor, None, None, 50)
                seen.extend(r["id"] for r in rows)
                if finished and not rows:
                    return
        finally:
            reader.close()
    follower = threading.Thread(target=follow)
    follower.start()

    def write(i):
        writer = connect(target)
        try:
            for n in range(25):
                if n % 2:
                    inv_id = queued[i * 25 + n]
                    invocations.finish(writer, inv_id, "d", {"status": "succeeded",
                                                             "output": "1"})
                else:
                    with transaction(writer):
                        invocations.record_finished(writer, {
                            "id": invocations.new_id() + f"w{i}{n:03d}", "container": "app",
                            "version": "v1", "function": "f", "trigger": "http",
                            "status": "succeeded", "created_at": time.time()})
                    invocations.finish(writer, queued[i * 25 + n], "d",
                                       {"status": "failed", "error": {"type": "E"}})
        finally:
            writer.close()
    _threads(4, write)
    done.set()
    follower.join(60)
    finished = {r[0] for r in db.execute(
        "SELECT id FROM invocations WHERE status NOT IN ('queued', 'running')").fetchall()}
    db.close()
    assert len(finished) == 152
    assert len(seen) == len(set(seen)), "a finish was read twice"
    assert set(seen) == finished


def _migrate_in_child(target, queue):
    try:
        migrate(target)
        queue.put("ok")
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put(repr(exc))


def test_migrations_run_once_whichever_process_starts_first(store_target):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_migrate_in_child, args=(store_target, queue))
                for _ in range(4)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
    assert results == ["ok"] * 4
    db = connect(store_target)
    try:
        # One instance id: the step that writes it ran once.
        assert db.execute("SELECT count(*) FROM settings WHERE key = 'instance_id'"
                          ).fetchone()[0] == 1
    finally:
        db.close()


# -- PostgreSQL: what several control planes share through the database ----------------------

@pytest.fixture
def pg_target(pg_url, tmp_path):
    target = DbUrl(pg_url, tmp_path / "a" / "routing.hint")
    target.hint_path.parent.mkdir()
    migrate(target)
    return target


def test_a_route_change_reaches_the_other_hosts_hint_by_a_notification(pg_target, tmp_path):
    other_host = DbUrl(str(pg_target), tmp_path / "b.routing.hint")
    listener = RouteListener(other_host).start()
    try:
        hint = routing_hint(other_host)
        deadline = time.monotonic() + 10
        while listener.heard == 0 and hint.value() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)      # the listener raises the hint once it is connected
        before, heard_before = hint.value(), listener.heard
        db = connect(pg_target)
        try:
            with transaction(db):
                db.execute("INSERT INTO containers (name, created_at) VALUES ('app', 0)")
            changed = time.monotonic()
            while hint.value() == before and time.monotonic() - changed < 30:
                time.sleep(0.005)
            # Raised by the notification the write sent (the listener heard it), which
            # nothing else here could do: how soon is a figure, not a test.
            assert hint.value() != before
            assert listener.heard > heard_before
            # A write that changes no route tells no one.
            heard = listener.heard
            with transaction(db):
                db.execute("INSERT INTO settings (key, value) VALUES ('x', 'y')")
            time.sleep(0.6)
            assert listener.heard == heard
        finally:
            db.close()
    finally:
        listener.stop()


def test_package_files_reach_every_control_plane_through_the_database(pg_target, tmp_path):
    def store(name):
        root = tmp_path / name
        (root / "artifacts").mkdir(parents=True)
        (root / "uploads").mkdir()
        return ArtifactStore(root / "artifacts", root / "uploads", pg_target)
    here, there = store("here"), store("there")
    payload = bytes(range(256)) * 9000          # more than one chunk
    sha = hashlib.sha256(payload).hexdigest()
    tmp = here.uploads / "upload-x"
    tmp.write_bytes(payload)
    with here.lock():
        here.keep(tmp, sha)
    assert not there.path(sha).exists()
    assert there.local(sha).read_bytes() == payload      # fetched, checked, kept
    # Bytes that do not match their hash are never served.
    db = connect(pg_target)
    try:
        db.execute("UPDATE artifact_chunks SET data = ? WHERE sha256 = ? AND n = 0",
                   [b"forged", sha])
        elsewhere = store("elsewhere")
        with pytest.raises(FileNotFoundError):
            elsewhere.local(sha)
        assert not elsewhere.path(sha).exists()
        assert list(elsewhere.uploads.iterdir()) == []
        with pytest.raises(FileNotFoundError):
            there.local("0" * 64)
        # Retention on one host removes the database's copy too.
        assert there.remove_unused([sha], lambda sha256s: set()) == [sha]
        assert db.execute("SELECT count(*) FROM artifact_chunks").fetchone()[0] == 0
    finally:
        db.close()


def test_the_first_control_planes_tokens_are_kept_hashed(pg_target):
    db = connect(pg_target)
    try:
        first = {"admin": "dya_first", "worker": "dyw_first", "invoke": "dyi_first"}
        assert token_store.adopt(db, first) == {k: token_store.digest(v)
                                                 for k, v in first.items()}
        other = {"admin": "dya_other", "worker": "dyw_other", "invoke": "dyi_other"}
        assert token_store.adopt(db, other)["admin"] == token_store.digest("dya_first")
        stored = " ".join(r[0] for r in db.execute("SELECT value FROM settings").fetchall())
        assert "dya_first" not in stored
    finally:
        db.close()


def test_every_statement_the_store_writes_is_one_text_for_both_engines():
    """No SQLite-only SQL in the store: the dialect differences are named in engine.py, the
    PostgreSQL schema in schema_pg.py, SQLite's history in db.py."""
    import re
    from pathlib import Path

    store = Path(__file__).resolve().parent.parent / "dockyard" / "app" / "store"
    sqlite_only = re.compile(r"INSERT OR |\browid\b|json_extract|sqlite_master|"
                             r"BEGIN IMMEDIATE|strftime|julianday|group_concat")
    for source in store.glob("*.py"):
        if source.name in ("db.py", "engine.py", "schema_pg.py"):
            continue
        text = source.read_text()
        assert not sqlite_only.findall(text), source.name
    assert is_postgres("postgresql://x/y") and POSTGRES.name == "postgresql"


def test_a_nul_character_a_tenant_wrote_costs_no_write(target):
    """A function that prints a NUL character, or a build that logs one: SQLite keeps it,
    PostgreSQL (whose text cannot hold it) keeps U+FFFD in its place; neither fails the
    record or the heartbeat that carries it."""
    from dockyard.app.store import workers as worker_store

    db = connect(target)
    try:
        with transaction(db):
            invocations.record_finished(db, {
                "id": "inv_nul", "container": "app", "version": "v1", "function": "f",
                "trigger": "http", "status": "succeeded", "stdout": "a\x00b",
                "created_at": time.time()})
        stored = invocations.get(db, "inv_nul")["stdout"]
        assert stored == ("a\ufffdb" if is_postgres(target) else "a\x00b")
        worker = worker_store.register(db, {"name": "w-nul", "address": "unix:/x", "pid": 1})
        worker_store.heartbeat(db, worker["id"], [{"version_id": 1, "state": "failed",
                                                   "error": "bad\x00", "log": "log\x00line"}])
        row = db.execute("SELECT error, log FROM worker_versions").fetchone()
        assert row[1].startswith("log") and row[1].endswith("line") and len(row[1]) == 8
    finally:
        db.close()


def test_a_lost_connection_is_replaced_on_the_next_use(pg_target):
    """A database restarted or a connection killed: the query that finds it fails, and the
    thread's next get_db opens a new connection instead of failing for ever."""
    from dockyard.app.store.db import get_db
    from dockyard.app.store.engine import transient_errors

    db = get_db(pg_target)
    pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    killer = connect(pg_target)
    try:
        killer.execute("SELECT pg_terminate_backend(?)", [pid])
    finally:
        killer.close()
    with pytest.raises(transient_errors()):
        db.execute("SELECT 1")
    again = get_db(pg_target)
    assert again is not db
    assert again.execute("SELECT 1").fetchone()[0] == 1
    again.close()


def test_a_synchronous_call_recorded_running_then_finished(target):
    """A web process records its call `running` as it hands it over, then finished in place
    (one finish number); a call cancelled meanwhile keeps its status; a dispatcher taking
    over never requeues it (it is not queued work); and one its web process left behind is
    failed once its lease has passed."""
    db = connect(target)
    try:
        t = time.time()
        row = {"id": "inv_sync1", "container": "app", "version": "v1", "function": "f",
               "trigger": "http", "input": "{}", "created_at": t, "started_at": t}
        with transaction(db):
            invocations.record_started(db, row, "web:host:1", t + 60)
        assert invocations.get(db, "inv_sync1")["status"] == "running"
        assert invocations.recover(db, "dispatcher-2", lease_expired_only=False) == 0
        with transaction(db):
            invocations.record_finished(db, dict(row, status="succeeded", output="1",
                                                 finished_at=t + 1, duration_ms=3.0))
        done = invocations.get(db, "inv_sync1")
        assert (done["status"], done["output"], done["duration_ms"]) == ("succeeded", 1, 3.0)
        rows, _ = invocations.finished_after(db, 0, None, None, 100)
        assert [r["id"] for r in rows] == ["inv_sync1"]
        with pytest.raises(ValueError):       # a record is finished once
            invocations.record_finished(db, dict(row, status="failed"))

        with transaction(db):
            invocations.record_started(db, dict(row, id="inv_sync2"), "web:host:1", t + 60)
        assert invocations.stop(db, "inv_sync2", "cancelled",
                                {"type": "Cancelled", "message": "asked"}) == "running"
        with transaction(db):
            invocations.record_finished(db, dict(row, id="inv_sync2", status="crashed",
                                                 stdout="partial"))
        stopped = invocations.get(db, "inv_sync2")
        assert (stopped["status"], stopped["stdout"]) == ("cancelled", "partial")

        with transaction(db):
            invocations.record_started(db, dict(row, id="inv_sync3"), "web:host:1", t - 1)
            invocations.record_started(db, dict(row, id="inv_sync4"), "web:host:1", t + 60)
        assert invocations.abandoned_web_calls(db, time.time()) == 1
        lost = invocations.get(db, "inv_sync3")
        assert lost["status"] == "failed" and lost["error"]["type"] == "Lost"
        assert invocations.get(db, "inv_sync4")["status"] == "running"
        invocations.forget_started(db, "inv_sync4")
        with pytest.raises(Exception):
            invocations.get(db, "inv_sync4")
    finally:
        db.close()


def test_a_dispatcher_past_its_lease_claims_nothing(target):
    db = connect(target)
    try:
        invocations.enqueue(db, "inv_q1", "app", None, "f", "async", "{}")
        assert leases.acquire(db, "dispatcher", "d1", 30) == 1
        db.execute("UPDATE leases SET expires_at = ? WHERE name = 'dispatcher'",
                   [time.time() - 1])
        assert leases.acquire(db, "dispatcher", "d2", 30) == 2
        with pytest.raises(leases.LeaseLost):
            invocations.claim_queued(db, "d1", 10, 60, fencing=("dispatcher", 1))
        claimed = invocations.claim_queued(db, "d2", 10, 60, fencing=("dispatcher", 2))
        assert [c["id"] for c in claimed] == ["inv_q1"]
    finally:
        db.close()

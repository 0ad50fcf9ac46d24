"""Invocation records are never lost for another call's fault: every field of a reply is
checked before it is bound, a batch that fails is written again record by record, and a record
that fails on its own is stored bare with an error that says so. The writer against a real
SQLite file, and a real hostile function that forges its reply frames among 600 calls of
another container."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dockyard.app.store import db as dbmod
from dockyard.app.invoke.records import RecordWriter
from dockyard.app.store import invocations as store

# Hang detection only: the waits below end as soon as the records are there.
WAIT_S = 60

# Replies a function can forge: each field of the wrong type, out of range, or too large.
FORGERIES = [
    {"max_rss_kb": {"not": "an int"}},
    {"duration_ms": "12.5 ms"},
    {"cold": ["yes"]},
    {"stdout": "x" * (3 << 20), "stderr": ["not", "text"]},
    {"max_rss_kb": 2 ** 80, "duration_ms": float("inf")},
    {"duration_ms": -5, "max_rss_kb": 3.5, "cold": 7},
    {"stdout": "lone surrogate \ud800 here", "stderr": {"nested": [1, {"deep": True}]}},
    {"status": "pwned", "worker_id": {"id": 1}, "version": 12},
    {"status": "failed", "error": ["not", "an", "object"]},
    {"status": "failed", "error": {"type": {"t": 1}, "message": 42, "traceback": "t" * 200_000}},
]

# What the hostile function makes its reply frames carry (the frame's own fields).
REPLY_FORGERIES = [
    {"max_rss_kb": {"not": "an int"}},
    {"duration_ms": "12.5 ms"},
    {"cold": ["yes"]},
    {"stdout": "x" * (3 << 20), "stderr": ["not", "text"]},
    {"max_rss_kb": 2 ** 80, "cold": 7},
    {"duration_ms": -1, "max_rss_kb": 1.5},
    {"ok": False, "error": {"type": "Forged", "message": {"not": "text"}, "traceback": 7}},
]


def _record(container: str, **fields) -> dict:
    t = time.time()
    record = {"id": store.new_id(), "container": container, "version": "1.0",
              "function": "f", "trigger": "http", "status": "succeeded", "input": "1",
              "output": "1", "error": None, "stdout": "out", "stderr": "", "worker_id": "wrk_1",
              "created_at": t, "started_at": t, "finished_at": t, "duration_ms": 1.5,
              "max_rss_kb": 20480, "cold": False}
    record.update(fields)
    return record


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "dockyard.db"
    dbmod.migrate(path)
    return path


def _rows(path, container: str) -> list[dict]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(
            "SELECT * FROM invocations WHERE container = ?", [container])]


def _wait_rows(path, container: str, count: int) -> list[dict]:
    end = time.monotonic() + WAIT_S
    rows = _rows(path, container)
    while len(rows) < count and time.monotonic() < end:
        time.sleep(0.05)
        rows = _rows(path, container)
    return rows


def _assert_sane(row: dict) -> None:
    """What a reader of the record can rely on, whatever the reply said."""
    assert row["status"] in store.STATUSES
    assert row["duration_ms"] is None or (isinstance(row["duration_ms"], float)
                                          and math.isfinite(row["duration_ms"])
                                          and row["duration_ms"] >= 0)
    assert row["max_rss_kb"] is None or isinstance(row["max_rss_kb"], int)
    assert row["cold"] in (None, 0, 1)
    for key in ("stdout", "stderr", "output", "worker_id", "version"):
        assert row[key] is None or isinstance(row[key], str)
    for key in ("stdout", "stderr"):
        assert row[key] is None or len(row[key]) <= store.TEXT_CAP + 100
    assert row["error"] is None or len(row["error"]) <= store.ERROR_CAP
    public = store.public(row)      # what the API answers, from the stored row
    assert public["error"] is None or isinstance(public["error"]["type"], str)


def test_forged_fields_cost_no_other_record_and_are_noted_in_their_own(database):
    writer = RecordWriter(database)
    victims = []
    hostile = []
    for n in range(600):
        victim = _record("victim", output=json.dumps(n), cold=n % 2 == 0)
        victims.append(victim)
        writer.put(victim)
        if n % 10 == 5:
            forged = _record("hostile", **FORGERIES[(n // 10) % len(FORGERIES)])
            hostile.append(forged)
            writer.put(forged)
    rows = _wait_rows(database, "victim", 600)
    assert len(rows) == 600
    stored = {row["id"]: row for row in rows}
    for victim in victims:
        row = stored[victim["id"]]
        assert row["output"] == victim["output"] and row["max_rss_kb"] == 20480
        assert row["duration_ms"] == 1.5 and row["cold"] == int(victim["cold"])
        assert row["error"] is None
    rows = _wait_rows(database, "hostile", len(hostile))
    assert len(rows) == len(hostile) == 60
    by_id = {row["id"]: row for row in rows}
    for forged in hostile:
        row = by_id[forged["id"]]
        _assert_sane(row)
        error = json.loads(row["error"])
        assert store.NOTE_KEY in error, (forged, error)
    # The one from the issue: the bad field is dropped and named, the rest is kept.
    first = by_id[hostile[0]["id"]]
    note = json.loads(first["error"])[store.NOTE_KEY]
    assert first["max_rss_kb"] is None and "max_rss_kb (a dict" in note
    assert first["duration_ms"] == 1.5 and first["stdout"] == "out"
    assert first["status"] == "succeeded"


@pytest.mark.parametrize("fields,dropped", [
    ({"max_rss_kb": {"not": "an int"}}, ["max_rss_kb"]),
    ({"duration_ms": "12"}, ["duration_ms"]),
    ({"cold": [1]}, ["cold"]),
    ({"max_rss_kb": 2 ** 64}, ["max_rss_kb"]),
    ({"duration_ms": float("nan"), "cold": "yes"}, ["duration_ms", "cold"]),
    ({"stdout": 12, "output": {"a": 1}}, ["stdout", "output"]),
])
def test_each_bad_field_is_dropped_and_named(database, fields, dropped):
    record = _record("one", **fields)
    writer = RecordWriter(database)
    writer._write(dbmod.get_db(database), [record])
    (row,) = _rows(database, "one")
    _assert_sane(row)
    note = json.loads(row["error"])[store.NOTE_KEY]
    for key in dropped:
        assert row[key] is None and f"{key} (a" in note
    assert row["function"] == "f" and row["status"] == "succeeded"


def test_values_that_keep_their_meaning_are_coerced_not_dropped(database):
    RecordWriter(database)._write(dbmod.get_db(database), [_record(
        "coerced", max_rss_kb=2048.0, cold=1, stdout="a \udcff b", output="y" * 200_000)])
    (row,) = _rows(database, "coerced")
    assert row["max_rss_kb"] == 2048 and row["cold"] == 1
    assert row["stdout"] == "a ? b"
    assert row["output"].startswith("y" * 1000) and "more characters not kept" in row["output"]
    note = json.loads(row["error"])[store.NOTE_KEY]
    assert "stdout (not valid UTF-8 (replaced))" in note and "max_rss_kb" not in note


def test_a_batch_that_fails_is_written_record_by_record_and_a_bad_record_stored_bare(
        database, caplog):
    """A record can still fail once its fields are checked (here a trigger refuses it, as a
    constraint would): the batch it was in is written again one record at a time, and the
    record itself is stored without its report, with an error saying so. A record that cannot
    be stored even so (a second record with the same id) is one log line, and costs no
    other."""
    conn = sqlite3.connect(database)
    conn.execute("CREATE TRIGGER poison BEFORE INSERT ON invocations "
                 "WHEN NEW.stdout = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
    conn.commit()
    conn.close()
    batch = [_record("batch", output=json.dumps(n)) for n in range(200)]
    poisoned = _record("batch", stdout="poison", max_rss_kb=999)
    batch.insert(100, poisoned)
    duplicate = dict(batch[10], output="again")
    batch.insert(150, duplicate)
    with caplog.at_level(logging.WARNING, logger="dockyard.records"):
        RecordWriter(database)._write(dbmod.get_db(database), batch)
    rows = {row["id"]: row for row in _rows(database, "batch")}
    assert len(rows) == 201
    assert all(rows[r["id"]]["output"] == r["output"] for r in batch[:100])
    bare = rows[poisoned["id"]]
    assert bare["stdout"] is None and bare["max_rss_kb"] is None
    assert bare["status"] == "succeeded" and bare["function"] == "f"
    error = json.loads(bare["error"])
    assert error["type"] == "BadReport" and "poisoned" in error["message"]
    assert rows[batch[10]["id"]]["output"] == json.dumps(10)   # the first one stands
    messages = [r.getMessage() for r in caplog.records]
    assert any("storing them one by one" in m for m in messages)
    assert any(f"could not store invocation record {duplicate['id']}" in m for m in messages)


def test_a_forged_report_on_the_async_path_is_stored_without_its_bad_fields(database):
    db = dbmod.get_db(database)
    store.enqueue(db, "inv_async1", "asyncer", None, "f", "http", "1")
    (claimed,) = store.claim_queued(db, "disp_1", 10, 60)
    store.finish(db, claimed["id"], "disp_1", {
        "status": "succeeded", "version": "2.0", "output": "1", "stdout": ["x"],
        "stderr": "fine", "duration_ms": "soon", "max_rss_kb": {"not": "an int"},
        "cold": {"a": 1}, "worker_id": "wrk_1"})
    row = store.get(db, "inv_async1")
    assert row["status"] == "succeeded" and row["version"] == "2.0"
    assert row["stderr"] == "fine" and row["output"] == 1
    assert row["duration_ms"] is None and row["max_rss_kb"] is None and row["cold"] is None
    assert "max_rss_kb (a dict" in row["error"][store.NOTE_KEY]


# -- end to end: a real function forging its replies among another container's load ------

def test_a_function_forging_its_replies_loses_none_of_600_records_of_another(server, pkg):
    server.deploy(pkg("echo", name="gates-victim"))
    server.deploy(pkg("forger", name="gates-forger"))

    def victim(n: int) -> tuple[int, str]:
        response = server.invoke("gates-victim/echo", {"n": n})
        return response.status_code, response.headers.get("X-Dockyard-Invocation-Id", "")

    def forger(n: int) -> str:
        response = server.invoke("gates-forger/forge",
                                 REPLY_FORGERIES[n % len(REPLY_FORGERIES)])
        return response.headers.get("X-Dockyard-Invocation-Id", "")

    with ThreadPoolExecutor(8) as pool:
        # Interleaved, so that the forged records share batches with the victim's.
        forged = [pool.submit(forger, n) for n in range(60)]
        answers = list(pool.map(victim, range(600)))
        forged_ids = [f.result() for f in forged]
    assert all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:5]
    ids = {inv_id for _, inv_id in answers}
    assert len(ids) == 600

    end = time.monotonic() + WAIT_S
    found: dict = {}
    while time.monotonic() < end:
        listed = server.api("GET", "/api/invocations",
                            params={"container": "gates-victim", "limit": 1000}).json()
        found = {r["id"]: r for r in listed["invocations"]}
        if ids <= set(found):
            break
        time.sleep(0.1)
    missing = ids - set(found)
    assert not missing, f"{len(missing)} of 600 records lost"
    assert all(found[i]["status"] == "succeeded" and found[i]["error"] is None for i in ids)
    # The forger's own calls have their records too, each of sane types.
    for inv_id in filter(None, forged_ids):
        record = server.api("GET", f"/api/invocations/{inv_id}").json()
        assert record["status"] in store.STATUSES
        assert record["max_rss_kb"] is None or isinstance(record["max_rss_kb"], int)
        assert record["duration_ms"] is None or isinstance(record["duration_ms"], float)
        assert record["cold"] in (None, True, False)
        assert isinstance(record["stdout"], str) and len(record["stdout"]) <= store.TEXT_CAP + 100


@pytest.mark.parametrize("forged, status, error_type", [
    ({"duration_ms": "slow", "max_rss_kb": [1], "cold": "yes"}, 200, None),
    ({"duration_ms": -5, "max_rss_kb": 1 << 70}, 200, None),
    ({"ok": False, "error": ["not", "a", "dict"]}, 500, "BadReply"),
    ({"ok": False, "error": {"type": {"not": "a name"}, "message": 5}}, 500, "Error"),
    ({"ok": "yes"}, 500, "BadReply"),
])
def test_a_forged_reply_is_answered_and_recorded_with_checked_fields(server, pkg, forged,
                                                                      status, error_type):
    """The worker (and a web thread on the direct path) check every field of a reply before
    it reaches an HTTP header, a status or a record: a forged one never makes a 500 'internal
    error' and never loses the call's record."""
    name = "gates-forged-" + hashlib.sha256(json.dumps(forged).encode()).hexdigest()[:8]
    server.deploy(pkg("forger", name=name))
    response = server.invoke(f"{name}/forge", forged)
    assert response.status_code == status, response.text
    duration = response.headers.get("X-Dockyard-Duration-Ms")
    assert duration is None or float(duration) >= 0
    if error_type:
        assert response.json()["error"]["type"] == error_type, response.text
    inv_id = response.headers["X-Dockyard-Invocation-Id"]
    end = time.monotonic() + WAIT_S
    record = {}
    while time.monotonic() < end:
        record = server.api("GET", f"/api/invocations/{inv_id}").json()
        if record.get("status") and record["status"] != "running":
            break
        time.sleep(0.1)
    assert record["status"] == ("succeeded" if status == 200 else "failed"), record
    assert record["duration_ms"] is None or isinstance(record["duration_ms"], float)
    assert record["cold"] in (None, True, False)


# -- a call's `running` record ---------------------------------------------------------------

def _counting(monkeypatch, name: str) -> list:
    from dockyard.app.invoke import records
    calls: list = []
    real = getattr(records, name)

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)
    monkeypatch.setattr(records, name, spy)
    return calls


def _started(writer: RecordWriter, record: dict) -> None:
    running = {key: record[key] for key in ("id", "container", "version", "function",
                                            "trigger", "input", "worker_id", "created_at",
                                            "started_at")}
    writer.started(running, "web:test", time.time() + 60)


def test_a_call_over_before_its_start_is_due_is_written_once_finished(database, monkeypatch):
    from dockyard.app.invoke import records
    monkeypatch.setattr(records, "START_AFTER_S", 3600.0)
    starts = _counting(monkeypatch, "record_started")
    forgets = _counting(monkeypatch, "forget_started")
    writer = RecordWriter(database)
    quick = [_record("quick", output=json.dumps(n)) for n in range(50)]
    for record in quick:
        _started(writer, record)
        writer.finished(record)
    dropped = _record("quick")
    _started(writer, dropped)
    writer.forget(dropped["id"])     # every worker turned it away: it ran nothing
    rows = _wait_rows(database, "quick", 50)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in quick)
    assert all(r["status"] == "succeeded" for r in rows)
    writer.flush()
    assert len(_rows(database, "quick")) == 50
    assert starts == [] and forgets == []


def test_a_call_still_running_is_recorded_running_then_finished(database, monkeypatch):
    from dockyard.app.invoke import records
    monkeypatch.setattr(records, "START_AFTER_S", 0.3)
    writer = RecordWriter(database)
    record = _record("long")
    _started(writer, record)
    # Nothing else arrives: the writer wakes for the start when it is due.
    rows = _wait_rows(database, "long", 1)
    assert [r["status"] for r in rows] == ["running"]
    writer.finished(record)
    # Its start was written: the finish is written before its caller goes on.
    (row,) = _rows(database, "long")
    assert row["status"] == "succeeded" and row["output"] == "1"


def test_a_start_still_deferred_is_written_by_a_flush(database, monkeypatch):
    from dockyard.app.invoke import records
    monkeypatch.setattr(records, "START_AFTER_S", 3600.0)
    writer = RecordWriter(database)
    record = _record("stopping")
    _started(writer, record)
    wait_for = time.monotonic() + WAIT_S
    while record["id"] not in writer.deferred and time.monotonic() < wait_for:
        time.sleep(0.01)
    writer.flush()      # a graceful stop: the call still running is on record
    assert [r["status"] for r in _rows(database, "stopping")] == ["running"]

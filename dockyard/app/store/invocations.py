"""Invocation records: one row per call, whatever triggered it, and the async queue
(claim with a lease, recover what a dead dispatcher left running)."""

from __future__ import annotations

import json
import math
import random
import time

from .engine import POSTGRES, Database

from ...common.protocol import FAILED_STATUSES, FINISHED_STATUSES, RECORD_STATUSES
from ...errors import BadRequest, NotFound
from .db import now, transaction
from .leases import holding

STATUSES = RECORD_STATUSES
FINAL = FINISHED_STATUSES
MAX_ATTEMPTS = 2
TEXT_CAP = 64 * 1024


def new_id() -> str:
    # Time-ordered so ids sort like the calls happened; the time also tells a reader whether a
    # record may still be on its way (see get()).
    return f"inv_{int(time.time() * 1000):012x}{random.getrandbits(48):012x}"


def cap(text: str | None, limit: int = TEXT_CAP) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"\n… [{len(text) - limit} more characters not kept]"


# -- what a record may hold ----------------------------------------------------------------
#
# A record's report fields (duration, memory, cold start, output, error) come from a worker's
# reply, and a function can forge its reply frame: every field is checked against the type
# its column takes before it is bound, so that one bad value is dropped from its own record
# instead of failing the transaction that carries other calls' records too.

NAME_CAP = 1024                     # ids, names, versions, statuses
ERROR_CAP = TEXT_CAP                # an error as stored (JSON)
SQL_INT_MAX = (1 << 63) - 1
# The key of a record's error that says which fields were not stored as sent.
NOTE_KEY = "record_note"


def _name(value):
    if isinstance(value, str):
        return _utf8(value[:NAME_CAP])
    raise TypeError("not a string")


def _text(value):
    if isinstance(value, str):
        return _utf8(cap(value))
    raise TypeError("not a string")


def _utf8(text: str) -> str:
    """Text SQLite can store: a lone surrogate (which JSON can carry) is replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Coerced(text.encode("utf-8", "replace").decode("utf-8"),
                       "not valid UTF-8 (replaced)") from None
    return text


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("not a number")
    try:
        number = float(value)
    except OverflowError:
        raise TypeError("out of range") from None
    if not math.isfinite(number) or number < 0:
        raise TypeError("not a finite number of at least 0")
    return number


def _count(value):
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    if not 0 <= value <= SQL_INT_MAX:
        raise TypeError("out of range")
    return value


def _flag(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise TypeError("not true or false")


class _Coerced(Exception):
    """A value stored changed (the reason is noted in the record)."""

    def __init__(self, value, why: str):
        super().__init__(why)
        self.value = value


_ABSENT = object()
_NAME_KEYS = ("id", "container", "version", "function", "trigger", "worker_id")
_TEXT_KEYS = ("input", "output", "stdout", "stderr")
_NUMBER_KEYS = ("created_at", "started_at", "finished_at", "duration_ms")

# Each column a record may set, and the check that gives the value bound for it.
_CHECKS = {
    "id": _name, "container": _name, "version": _name, "function": _name, "trigger": _name,
    "worker_id": _name, "input": _text, "output": _text, "stdout": _text, "stderr": _text,
    "created_at": _number, "started_at": _number, "finished_at": _number,
    "duration_ms": _number, "max_rss_kb": _count, "cold": _flag,
}


def checked(row: dict) -> dict:
    """The columns of a record (or of a finished call's report) as they are bound: each field
    of the type its column takes, text capped, `error` as JSON, `status` one of STATUSES. A
    field that does not fit is dropped (NULL), or coerced where that keeps its meaning, and
    named in the error's `record_note`."""
    out: dict = {}
    notes: list[str] = []
    # The common case first, without a call per field: values already as their columns
    # store them. Anything else goes through its column's check below.
    others = []
    get = row.get
    for keys, limit in ((_NAME_KEYS, NAME_CAP), (_TEXT_KEYS, TEXT_CAP)):
        for key in keys:
            value = get(key, _ABSENT)
            if value.__class__ is str and len(value) <= limit and value.isascii():
                out[key] = value
            elif value is None:
                out[key] = None
            elif value is not _ABSENT:
                others.append(key)
    for key in _NUMBER_KEYS:
        value = get(key, _ABSENT)
        if value.__class__ is float and 0 <= value < math.inf:
            out[key] = value
        elif value is None:
            out[key] = None
        elif value is not _ABSENT:
            others.append(key)
    value = get("max_rss_kb", _ABSENT)
    if value.__class__ is int and 0 <= value <= SQL_INT_MAX or value is None:
        out["max_rss_kb"] = value
    elif value is not _ABSENT:
        others.append("max_rss_kb")
    value = get("cold", _ABSENT)
    if value.__class__ is bool:
        out["cold"] = int(value)
    elif value is None:
        out["cold"] = None
    elif value is not _ABSENT:
        others.append("cold")
    for key in others:
        value = row[key]
        try:
            out[key] = _CHECKS[key](value)
        except _Coerced as coerced:
            out[key] = coerced.value
            notes.append(f"{key} ({coerced})")
        except TypeError as exc:
            out[key] = None
            notes.append(f"{key} ({_a(value)}: {exc}; dropped)")
    if "status" in row:
        status = row["status"]
        if status not in STATUSES:
            notes.append(f"status (not a status: {_describe(status)}; stored as failed)")
            status = "failed"
        out["status"] = status
    if "error" in row:
        out["error"] = _error_json(row["error"], notes)
    elif notes:
        out["error"] = _error_json(None, notes)
    return out


def _a(value) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _describe(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:80] + "…"


def _error_json(error, notes: list[str]) -> str | None:
    """The error as stored: a JSON object with a string `type` and `message`, at most
    ERROR_CAP long; what had to change is noted under NOTE_KEY (a call that succeeded gets an
    error that says only that)."""
    if error is not None and not isinstance(error, dict):
        notes.append(f"error ({_a(error)}, not an object; kept as its message)")
        error = {"type": "Error", "message": _describe(error)}
    elif isinstance(error, dict):
        error = dict(error)
        for key in ("type", "message", "traceback"):
            if key in error and not isinstance(error[key], str):
                notes.append(f"error.{key} ({_a(error[key])}, not a string)")
                error[key] = _describe(error[key])
    text = _json(error) if error else None
    if error and (text is None or len(text) > ERROR_CAP):
        notes.append(f"error (over {ERROR_CAP} characters as JSON; cut to its type, message "
                     "and traceback)")
        # Each part small enough that even escaped (6 characters a character) all fit.
        error = {key: cap(str(error[key]), limit) for key, limit in _ERROR_PARTS
                 if error.get(key) is not None}
    if not notes:
        return text
    note = cap("not stored as sent: " + "; ".join(notes), 2048)
    error = dict(error or {"type": "BadReport", "message": note})
    error[NOTE_KEY] = note
    return _json(error)


_ERROR_PARTS = (("type", 200), ("message", 4096), ("traceback", 4096))


def _json(value) -> str | None:
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return None


def bare(row: dict, reason: str) -> dict:
    """What is stored of a record whose report could not be stored at all: the control
    plane's own fields, and an error that says why the rest is missing."""
    kept = {key: row.get(key) for key in ("id", "container", "version", "function", "trigger",
                                          "status", "worker_id", "created_at", "started_at",
                                          "finished_at")}
    kept["error"] = {"type": "BadReport", "message": f"the call's report could not be "
                     f"stored ({reason[:300]}); only its identity and status were kept",
                     NOTE_KEY: "report fields dropped"}
    return kept


# The owner of a synchronous call's record while it runs: the web process serving it.
WEB_OWNER = "web:"
_RECORD_KEYS = ("id", "container", "version", "function", "trigger", "status", "input",
                "output", "error", "stdout", "stderr", "worker_id", "created_at", "started_at",
                "finished_at", "duration_ms", "max_rss_kb", "cold")
# What a finish writes over a record started `running`; a call stopped from outside meanwhile
# (cancelled) keeps the status and the reason it was given, as finish() does.
_FINISH_SETS = ", ".join(
    f"{key} = excluded.{key}" for key in _RECORD_KEYS
    if key not in ("id", "status", "error", "created_at")) + (
    ", status = CASE WHEN invocations.status IN ('queued', 'running') THEN excluded.status "
    "ELSE invocations.status END, error = CASE WHEN invocations.status IN ('queued', "
    "'running') THEN excluded.error ELSE invocations.error END, owner = NULL, "
    "lease_until = NULL")
_FINISH_SQL = (f"INSERT INTO invocations ({', '.join(_RECORD_KEYS)}, attempt) VALUES "
               f"({', '.join('?' * len(_RECORD_KEYS))}, 1) ON CONFLICT (id) DO UPDATE SET "
               + _FINISH_SETS + " WHERE invocations.owner LIKE 'web:%'")


def record_started(db: Database, row: dict, owner: str, lease_until: float) -> None:
    """A synchronous call handed to a worker: its record, `running`, owned by the web process
    serving it until `lease_until` (its timeout and a margin: past that a record still running
    is one its web process left behind, see abandoned_web_calls). Written before its finish
    (or in its place, see RecordWriter), never after."""
    row = checked(dict(row, status="running"))
    db.execute(
        f"INSERT INTO invocations ({', '.join(_RECORD_KEYS)}, attempt, owner, lease_until) "
        f"VALUES ({', '.join('?' * len(_RECORD_KEYS))}, 1, ?, ?) ON CONFLICT (id) DO NOTHING",
        [*(row.get(key) for key in _RECORD_KEYS), owner, lease_until])


def record_finished(db: Database, row: dict) -> None:
    """Store a finished synchronous call in one write: a new record, or the one written when
    it started. Every field is checked first (see checked())."""
    row = checked(row)
    if db.execute(_FINISH_SQL, [row.get(key) for key in _RECORD_KEYS]).rowcount != 1:
        # Only a record a web process started is finished in place.
        raise ValueError(f"invocation {row.get('id')} is recorded already")


def forget_started(db: Database, invocation_id: str) -> None:
    """A call recorded as started that ran nothing after all (every worker turned it away):
    no record, as if it had not started."""
    db.execute("DELETE FROM invocations WHERE id = ? AND status = 'running' AND owner LIKE ?",
               [invocation_id, WEB_OWNER + "%"])


def abandoned_web_calls(db: Database, t: float) -> int:
    """Synchronous calls still `running` past their lease: the web process serving them is
    gone (killed, or its host is). They fail with the reason; returns how many."""
    error = json.dumps({"type": "Lost", "message": "the web process serving this call "
                        "stopped before it ended; whether it ran is unknown",
                        "may_have_run": True})
    # Almost always there is none: a read says so without taking the write lock (which the
    # web processes' record writers would wait for), as claim_queued does.
    if db.execute("SELECT 1 FROM invocations WHERE status = 'running' AND owner LIKE ? "
                  "AND lease_until < ? LIMIT 1", [WEB_OWNER + "%", t]).fetchone() is None:
        return 0
    cursor = db.execute("UPDATE invocations SET status = 'failed', error = ?, finished_at = ?, "
                        "owner = NULL, lease_until = NULL WHERE status = 'running' "
                        "AND owner LIKE ? AND lease_until < ?", [error, t, WEB_OWNER + "%", t])
    return cursor.rowcount


def enqueue(db: Database, invocation_id: str, container: str, version: str | None,
            function: str, trigger: str, event_text: str) -> None:
    db.execute(
        "INSERT INTO invocations (id, container, version, function, trigger, status, attempt, "
        "input, created_at) VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, ?)",
        [invocation_id, container, version, function, trigger, event_text, now()])


def claim_queued(db: Database, owner: str, limit: int, lease_s: float,
                 fencing: tuple[str, int] | None = None) -> list[dict]:
    """Claim up to `limit` queued calls for `owner`. With `fencing` (lease name, number), only
    while the owner still holds that lease with that number (leases.LeaseLost otherwise): a
    dispatcher that stalled past its lease claims nothing its successor may claim."""
    # Most polls find nothing: a read answers that without the write lock (which the web
    # processes' record writers wait for).
    if db.execute("SELECT 1 FROM invocations WHERE status = 'queued' AND (not_before IS NULL "
                  "OR not_before <= ?) LIMIT 1", [now()]).fetchone() is None:
        return []
    with (holding(db, fencing[0], owner, fencing[1]) if fencing else transaction(db)) as conn:
        t = now()
        rows = conn.execute(
            "SELECT id FROM invocations WHERE status = 'queued' "
            "AND (not_before IS NULL OR not_before <= ?) ORDER BY created_at LIMIT ?",
            [t, limit]).fetchall()
        claimed = []
        for (inv_id,) in rows:
            conn.execute("UPDATE invocations SET status = 'running', attempt = attempt + 1, "
                         "started_at = ?, owner = ?, lease_until = ? WHERE id = ?",
                         [t, owner, t + lease_s, inv_id])
            claimed.append(inv_id)
    return [db["invocations"].get(i) for i in claimed]


def handed_to(db: Database, invocation_id: str, owner: str, worker_id: str) -> None:
    """A claimed call on its way to `worker_id`: its record says where it runs (and so where
    `dockyard logs ID` finds its output so far), while this owner still holds it running."""
    db.execute("UPDATE invocations SET worker_id = ? WHERE id = ? AND owner = ? AND "
               "status = 'running'", [worker_id, invocation_id, owner])


def finish(db: Database, invocation_id: str, owner: str, result: dict) -> None:
    # A call stopped from outside (cancelled, or past its job's timeout) keeps the status and
    # the reason it was given; the rest of the worker's report is still stored. Every field
    # is checked first (see checked()): a forged one is dropped, never the whole report.
    result = checked({key: result.get(key) for key in (
        "status", "error", "version", "output", "stdout", "stderr", "worker_id",
        "duration_ms", "max_rss_kb", "cold")})
    db.execute(
        "UPDATE invocations SET "
        "status = CASE WHEN status IN ('queued', 'running') THEN ? ELSE status END, "
        "error = CASE WHEN status IN ('queued', 'running') THEN ? ELSE error END, "
        "version = coalesce(?, version), output = ?, stdout = ?, stderr = ?, worker_id = ?, "
        "finished_at = ?, duration_ms = ?, max_rss_kb = ?, cold = ?, lease_until = NULL "
        "WHERE id = ? AND owner = ?",
        [result["status"], result["error"], result["version"], result["output"],
         result["stdout"], result["stderr"], result["worker_id"], now(),
         result["duration_ms"], result["max_rss_kb"], result["cold"], invocation_id, owner])


def release(db: Database, invocation_id: str, owner: str) -> None:
    """Give back a claimed call that never reached a worker: queued again, its attempt not
    counted."""
    _requeue(db, invocation_id, owner)


def defer(db: Database, invocation_id: str, owner: str, not_before: float,
          unavailable_since: float) -> None:
    """release(), to be claimed again no sooner than `not_before`: no worker could take the
    call yet (nothing ran). Only while this owner still holds it running: a call cancelled
    or taken over meanwhile is left as it is."""
    _requeue(db, invocation_id, owner, not_before=not_before,
             unavailable_since=unavailable_since)


def _requeue(db: Database, invocation_id: str, owner: str, **also) -> None:
    sets = "".join(f", {column} = ?" for column in also)
    db.execute("UPDATE invocations SET status = 'queued', attempt = attempt - 1, owner = NULL, "
               f"lease_until = NULL, started_at = NULL, worker_id = NULL{sets} "
               "WHERE id = ? AND owner = ? AND status = 'running'",
               [*also.values(), invocation_id, owner])


def stop(db: Database, invocation_id: str, status: str, error: dict) -> str | None:
    """Mark a queued or running call as stopped from outside (`cancelled`, or `timed_out` by
    its job's timeout) with the reason. Returns the status it had (None: no such record); a
    finished call is left as it is."""
    with transaction(db) as conn:
        return stop_in_transaction(conn, invocation_id, status, error)


def stop_in_transaction(conn, invocation_id: str, status: str, error: dict) -> str | None:
    """stop() inside a transaction the caller holds."""
    row = conn.execute("SELECT status FROM invocations WHERE id = ?", [invocation_id]).fetchone()
    if row is None or row[0] not in ("queued", "running"):
        return row[0] if row else None
    conn.execute("UPDATE invocations SET status = ?, error = ?, finished_at = ?, "
                 "lease_until = NULL WHERE id = ?", [status, json.dumps(error), now(),
                                                      invocation_id])
    return row[0]


def recover(db: Database, owner: str, lease_expired_only: bool) -> int:
    """Calls left `running` by a dispatcher that is gone: retried once, then failed with the
    reason. With lease_expired_only=False (we just took over the dispatcher lease, so the
    previous holder is dead) every call not ours is recovered at once."""
    t = now()
    with transaction(db) as conn:
        # Never a synchronous call's record (owned by a web process, not by a dispatcher).
        if lease_expired_only:
            rows = conn.execute("SELECT id, attempt FROM invocations WHERE status = 'running' "
                                "AND lease_until < ? AND (owner IS NULL OR owner NOT LIKE ?)",
                                [t, WEB_OWNER + "%"]).fetchall()
        else:
            rows = conn.execute("SELECT id, attempt FROM invocations WHERE status = 'running' "
                                "AND (owner IS NULL OR (owner != ? AND owner NOT LIKE ?))",
                                [owner, WEB_OWNER + "%"]).fetchall()
        for inv_id, attempt in rows:
            if attempt < MAX_ATTEMPTS:
                conn.execute("UPDATE invocations SET status = 'queued', owner = NULL, "
                             "lease_until = NULL, worker_id = NULL WHERE id = ?", [inv_id])
            else:
                error = {"type": "Lost", "message": f"the process running this call stopped "
                         f"(attempt {attempt} of {MAX_ATTEMPTS}); not retried again"}
                conn.execute("UPDATE invocations SET status = 'failed', error = ?, "
                             "finished_at = ?, lease_until = NULL WHERE id = ?",
                             [json.dumps(error), t, inv_id])
    return len(rows)


def public(row: dict, full: bool = True) -> dict:
    out = {k: row[k] for k in ("id", "container", "version", "function", "trigger", "status",
                               "attempt", "worker_id", "created_at", "started_at", "finished_at",
                               "duration_ms", "max_rss_kb")}
    out["cold"] = None if row["cold"] is None else bool(row["cold"])
    out["error"] = json.loads(row["error"]) if row["error"] else None
    if full:
        for key in ("input", "output"):
            text = row[key]
            try:
                out[key] = json.loads(text) if text is not None else None
            except ValueError:
                out[key] = text  # capped, so no longer valid JSON: show the text
        out["stdout"] = row["stdout"] or ""
        out["stderr"] = row["stderr"] or ""
    return out


def get(db: Database, invocation_id: str) -> dict:
    rows = list(db.query("SELECT * FROM invocations WHERE id = ?", [invocation_id]))
    if not rows and _just_issued(invocation_id):
        # Synchronous records are written in batches just after the answer: a caller that
        # asks at once may be a millisecond early.
        deadline = time.monotonic() + 0.5
        while not rows and time.monotonic() < deadline:
            time.sleep(0.005)
            rows = list(db.query("SELECT * FROM invocations WHERE id = ?", [invocation_id]))
    if not rows:
        raise NotFound(f"no invocation '{invocation_id}'")
    return public(rows[0])


def _just_issued(invocation_id: str) -> bool:
    try:
        issued_ms = int(invocation_id[4:16], 16)
    except ValueError:
        return False
    return invocation_id.startswith("inv_") and abs(time.time() * 1000 - issued_ms) < 5000


def list_recent(db: Database, container: str | None, status: str | None,
                limit: int, since: float | None = None, full: bool = False
                ) -> tuple[list[dict], int]:
    """The newest records first; `since` (Unix time) keeps those created at or after it.
    Returns them with the finish cursor of the same moment: every call that finishes later
    has a finish number above it (see finished_after)."""
    if status and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    where, args = [], []
    if container:
        where.append("container = ?")
        args.append(container)
    if status:
        where.append("status = ?")
        args.append(status)
    if since is not None:
        where.append("created_at >= ?")
        args.append(since)
    sql = "SELECT * FROM invocations"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC LIMIT ?"
    args.append(_limit(limit))
    with transaction(db, "DEFERRED"):
        rows = [public(r, full=full) for r in db.query(sql, args)]
        cursor = _last_finish(db)
    return rows, cursor


def finished_after(db: Database, cursor: int, container: str | None,
                   status: str | None, limit: int, full: bool = False
                   ) -> tuple[list[dict], int]:
    """Calls that finished after finish number `cursor`, in the order they finished, each
    with its number (`seq`); and the cursor to ask from next. Nothing is missed or given
    twice, however many calls finish in one second: the numbers are handed out in the
    writing transactions (see db._m4_invocation_finishes)."""
    if status and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    limit = _limit(limit)
    sql = ("SELECT f.seq AS seq, i.* FROM invocation_finishes f "
           "JOIN invocations i ON i.id = f.invocation_id WHERE f.seq > ?")
    args: list = [cursor]
    if container:
        sql += " AND f.container = ?"
        args.append(container)
    if status:
        sql += " AND i.status = ?"
        args.append(status)
    sql += " ORDER BY f.seq LIMIT ?"
    args.append(limit)
    with transaction(db, "DEFERRED"):
        found = list(db.query(sql, args))
        # A full page: go on from its last row. Otherwise everything up to the newest finish
        # has been seen (also the other containers' finishes, not scanned again).
        last = found[-1]["seq"] if len(found) == limit else max(cursor, _last_finish(db))
    rows = []
    for row in found:
        record = public(row, full=full)
        record["seq"] = row["seq"]
        rows.append(record)
    return rows, last


def _limit(limit: int) -> int:
    return max(1, min(limit, 1000))


def _last_finish(db: Database) -> int:
    """The newest finish number given (SQLite: its AUTOINCREMENT counter, which retention
    never lowers; PostgreSQL: the newest one committed, in the reader's snapshot)."""
    if db.dialect is POSTGRES:
        return db.execute("SELECT coalesce(max(seq), 0) FROM invocation_finishes").fetchone()[0]
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = "
                     "'invocation_finishes'").fetchone()
    return row[0] if row else 0


def prune(db: Database, created_before: float, batch: int = 1000) -> int:
    """Retention: remove records created before `created_before`, in batches (one short
    write transaction each). Never a call still queued or running, nor one a job run still
    points at (the job's history shows it; job history retention removes the run first)."""
    deleted = 0
    while True:
        with transaction(db) as conn:
            ids = [row[0] for row in conn.execute(
                "SELECT i.id FROM invocations i WHERE i.created_at < ? "
                "AND i.status NOT IN ('queued', 'running') "
                "AND NOT EXISTS (SELECT 1 FROM job_runs r WHERE r.invocation_id = i.id) "
                "ORDER BY i.created_at LIMIT ?", [created_before, batch]).fetchall()]
            if ids:
                marks = ", ".join("?" * len(ids))
                conn.execute(f"DELETE FROM invocation_finishes WHERE invocation_id IN ({marks})",
                             ids)
                conn.execute(f"DELETE FROM invocations WHERE id IN ({marks})", ids)
        deleted += len(ids)
        if len(ids) < batch:
            return deleted


# -- reads for the dashboard ----------------------------------------------------------------
#
# Each one is bounded by an index: a time window on `created_at` (or `container,
# created_at`, `status, created_at`), and a page of rows at most.

TRIGGERS = ("http", "async", "cron", "manual", "lambda")   # what started a call
FAILURE_STATUSES = FAILED_STATUSES
_FAILURES_SQL = ", ".join(f"'{s}'" for s in FAILURE_STATUSES)


def page(db: Database, *, container: str | None = None, function: str | None = None,
         status: str | None = None, trigger: str | None = None, since: float | None = None,
         before: tuple[float, str] | None = None, limit: int = 50) -> tuple[list[dict], bool]:
    """One page of records, newest first, without their texts; `before` (created_at, id)
    of the last row of the page before (keyset paging: as fast on the thousandth page as on
    the first). Returns the rows and whether there are older ones."""
    if status and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    where, args = [], []
    for column, value in (("container", container), ("function", function),
                          ("status", status), ("trigger", trigger)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("created_at >= ?")
        args.append(since)
    if before is not None:
        where.append("created_at <= ? AND NOT (created_at = ? AND id >= ?)")
        args += [before[0], before[0], before[1]]
    limit = _limit(limit)
    sql = ("SELECT id, container, version, function, trigger, status, attempt, worker_id, "
           "created_at, started_at, finished_at, duration_ms, max_rss_kb, cold, error "
           "FROM invocations")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    rows = [public(r, full=False) for r in db.query(sql, [*args, limit + 1])]
    return rows[:limit], len(rows) > limit


# Percentiles and the split of a slice of time are read from the newest calls of the window
# (a sample, said on the page when it is one) rather than from every row: counting is done
# within an index, but reading a column of 100 000 rows is not.
DURATION_SAMPLE = 5000
SLICE_SAMPLE = 200


def window_figures(db: Database, since: float) -> dict:
    """Calls created since `since` (Unix time): how many, how many failed (failed, timed out
    or crashed), the success rate of those that finished (all counted within the indexes),
    and the p50/p99 duration of the newest DURATION_SAMPLE of them (`sampled`: fewer than
    all were read)."""
    calls = db.execute("SELECT count(*) FROM invocations WHERE created_at >= ?",
                       [since]).fetchone()[0]
    counts = {status: db.execute("SELECT count(*) FROM invocations WHERE status = ? "
                                 "AND created_at >= ?", [status, since]).fetchone()[0]
              for status in ("succeeded", *FAILURE_STATUSES)}
    errors = sum(counts[status] for status in FAILURE_STATUSES)
    finished = counts["succeeded"] + errors
    durations = sorted(row[0] for row in db.execute(
        "SELECT duration_ms FROM invocations WHERE created_at >= ? ORDER BY created_at DESC "
        "LIMIT ?", [since, DURATION_SAMPLE]).fetchall() if row[0] is not None)
    return {"calls": calls, "errors": errors,
            "success_rate": (finished - errors) / finished if finished else None,
            "p50_ms": _quantile(durations, 0.50), "p99_ms": _quantile(durations, 0.99),
            "sampled": calls > DURATION_SAMPLE}


def unfinished(db: Database, limit: int = 50) -> list[dict]:
    """Calls queued or running, the newest first."""
    rows = []
    for status in ("running", "queued"):
        rows += db.query(
            "SELECT id, container, version, function, trigger, status, attempt, worker_id, "
            "created_at, started_at, finished_at, duration_ms, max_rss_kb, cold, error "
            "FROM invocations WHERE status = ? ORDER BY created_at DESC LIMIT ?",
            [status, _limit(limit)])
    return [public(r, full=False) for r in rows][:limit]


def per_version(db: Database, container: str, since: float, buckets: int = 24
                ) -> tuple[dict[str, list[dict]], bool]:
    """A container's calls since `since`, per version, in `buckets` equal slices of time up
    to now: calls, errors, p50 and p99 duration of each slice. Each slice's calls are counted
    within the index; the split by version, the errors and the durations come from its newest
    SLICE_SAMPLE calls (scaled up to the count). Returns the series and whether any slice was
    sampled."""
    t = now()
    width = max(1.0, (t - since) / buckets)
    found: dict[str, list] = {}
    sampled = False
    for i in range(buckets):
        start, end = since + i * width, since + (i + 1) * width
        total = db.execute("SELECT count(*) FROM invocations WHERE container = ? AND "
                           "created_at >= ? AND created_at < ?",
                           [container, start, end]).fetchone()[0]
        if not total:
            continue
        rows = db.execute("SELECT version, status, duration_ms FROM invocations WHERE "
                          "container = ? AND created_at >= ? AND created_at < ? "
                          "ORDER BY created_at DESC LIMIT ?",
                          [container, start, end, SLICE_SAMPLE]).fetchall()
        sampled = sampled or total > len(rows)
        scale = total / max(1, len(rows))
        split: dict[str, list] = {}
        for version, status, duration in rows:
            split.setdefault(version or "?", []).append((status in FAILURE_STATUSES, duration))
        for version, calls in split.items():
            slots = found.setdefault(version, [None] * buckets)
            durations = sorted(d for _, d in calls if d is not None)
            slots[i] = {"calls": round(len(calls) * scale),
                        "errors": round(sum(1 for failed, _ in calls if failed) * scale),
                        "p50_ms": _quantile(durations, 0.50),
                        "p99_ms": _quantile(durations, 0.99)}
    series = {}
    for version, slots in found.items():
        series[version] = [dict(slot or {"calls": 0, "errors": 0, "p50_ms": None,
                                         "p99_ms": None}, start=since + i * width)
                           for i, slot in enumerate(slots)]
    return series, sampled


def _quantile(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None

"""The store's database: one connection per thread (reused across requests), transactions
that mean the same on SQLite and PostgreSQL, and the schema migrations (see engine.py)."""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time

import sqlite_utils

from .engine import (POSTGRES, WRITE_LOCK, Database, hint_path, is_postgres, open_postgres,
                     open_sqlite)
from .routing_hint import routing_hint

_local = threading.local()


def connect(target) -> Database:
    """A new connection to `target`: a SQLite file's path, or a PostgreSQL URL."""
    return open_postgres(target) if is_postgres(target) else open_sqlite(target)


def get_db(target) -> Database:
    """This thread's connection to `target`; opening one costs far more than a query, so it
    is kept for the life of the thread."""
    cache = getattr(_local, "dbs", None)
    if cache is None:
        cache = _local.dbs = {}
    key = str(target)
    db = cache.get(key)
    if db is None or not db.usable:
        db = cache[key] = connect(target)
    return db


class transaction:
    """`with transaction(db) as conn:` a write transaction (COMMIT, or ROLLBACK on error):
    one writer at a time in the database, so read-then-write sequences are atomic across
    processes and hosts (SQLite: BEGIN IMMEDIATE; PostgreSQL: the write lock of engine.py).
    `mode="DEFERRED"`: a read transaction, whose queries all see the database as of one
    moment (PostgreSQL: REPEATABLE READ, READ ONLY)."""

    def __init__(self, db: Database, mode: str = "IMMEDIATE"):
        self.db = db
        self.mode = mode
        self.generation: int | None = None

    def __enter__(self) -> Database:
        db = self.db
        if db.dialect is POSTGRES:
            if self.mode == "DEFERRED":
                db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            else:
                db.execute("BEGIN")
        else:
            db.execute(f"BEGIN {self.mode}")
        if self.mode != "DEFERRED":
            try:
                if db.dialect is POSTGRES:
                    db.execute("SELECT pg_advisory_xact_lock(?)", [WRITE_LOCK])
                self.generation = routing_generation(db)
            except BaseException:
                _rollback(db)   # never leave the write lock taken
                raise
        return db

    def __exit__(self, exc_type, exc, tb):
        db = self.db
        if exc_type:
            _rollback(db)
            return False
        try:
            after = routing_generation(db) if self.mode != "DEFERRED" else None
        except BaseException:
            _rollback(db)
            raise
        db.execute("COMMIT")
        if after is not None and after != self.generation:
            # A route changed: say so to every process of this host before anyone is told it
            # is done (other hosts hear it through the database: see route_listener.py).
            bump_hint(db.path)
        return False


def _rollback(db: Database) -> None:
    try:
        db.execute("ROLLBACK")
    except Exception:               # a connection that broke: the next use opens another
        db.broken = True


def bump_hint(target) -> None:
    try:
        routing_hint(target).bump()
    except OSError as error:
        # Committed all the same: kept routes then expire within a second.
        logging.getLogger("dockyard.db").warning(
            "could not raise the routing hint %s: %s", hint_path(target), error)


def routing_generation(db: Database) -> int | None:
    """The counter the routing triggers bump (None before the SQLite migration that made it;
    PostgreSQL's schema has it from the start)."""
    try:
        row = db.execute("SELECT n FROM routing_generation WHERE id = 1").fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


def now() -> float:
    return time.time()


def _m1_initial(db: sqlite_utils.Database) -> None:
    db["containers"].create(
        {"id": int, "name": str, "active_version_id": int, "serving_version_id": int,
         "created_at": float, "updated_at": float},
        pk="id",
    )
    db["containers"].create_index(["name"], unique=True)
    db["versions"].create(
        {"id": int, "container_id": int, "version": str, "content_sha256": str,
         "artifact_sha256": str, "artifact_size": int, "manifest": str, "created_at": float},
        pk="id", foreign_keys=[("container_id", "containers", "id")],
    )
    db["versions"].create_index(["container_id", "version"], unique=True)
    db["versions"].create_index(["container_id", "content_sha256"])
    db["deployments"].create(
        {"id": str, "container_id": int, "version_id": int, "status": str, "error": str,
         "created_at": float, "finished_at": float},
        pk="id",
    )
    db["workers"].create(
        {"id": str, "name": str, "address": str, "hostname": str, "pid": int,
         "isolation": str, "registered_at": float, "last_seen": float, "state": str},
        pk="id",
    )
    db["worker_versions"].create(
        {"worker_id": str, "version_id": int, "state": str, "error": str, "log": str,
         "updated_at": float},
        pk=("worker_id", "version_id"),
    )
    db["invocations"].create(
        {"id": str, "container": str, "version": str, "function": str, "trigger": str,
         "status": str, "attempt": int, "input": str, "output": str, "error": str,
         "stdout": str, "stderr": str, "worker_id": str, "created_at": float,
         "started_at": float, "finished_at": float, "duration_ms": float,
         "max_rss_kb": int, "cold": int, "lease_until": float, "owner": str},
        pk="id",
    )
    db["invocations"].create_index(["created_at"])
    db["invocations"].create_index(["container", "created_at"])
    db["invocations"].create_index(["status", "created_at"])
    db["settings"].create({"key": str, "value": str}, pk="key")
    db["leases"].create({"name": str, "holder": str, "fencing": int, "expires_at": float},
                        pk="name")


def _m2_instance_id(db: sqlite_utils.Database) -> None:
    """An id for this control plane, unique on every host: with a container's id and creation
    time it names the container for the host-wide uid registry of the workers."""
    db["settings"].insert({"key": "instance_id", "value": secrets.token_hex(8)}, replace=True)


def _m3_jobs(db: sqlite_utils.Database) -> None:
    """Cron jobs, their runs (one row per fire and attempt, unique on the job, the trigger,
    the scheduled time and the attempt: the row is written before the call is queued, so a
    scheduled time fires at most once) and the fire-lateness histogram."""
    db["jobs"].create(
        {"id": str, "name": str, "source": str, "definition": str, "container": str,
         "function": str, "version": str, "payload": str, "schedule": str, "timezone": str,
         "enabled": int, "concurrency": str, "retries": int, "retry_backoff_s": float,
         "timeout_s": float, "starting_deadline_s": float, "history_days": float, "anchor": float,
         "next_fire_at": float, "created_at": float, "updated_at": float,
         "fires": int, "failures": int, "skipped": int, "missed": int,
         "last_fire_at": float, "last_success_at": float},
        pk="id", defaults={"fires": 0, "failures": 0, "skipped": 0, "missed": 0},
    )
    db["jobs"].create_index(["name"], unique=True)
    db["jobs"].create_index(["enabled", "next_fire_at"])
    db["job_runs"].create(
        {"id": int, "job_id": str, "trigger": str, "scheduled_at": float, "attempt": int,
         "status": str, "reason": str, "invocation_id": str, "fired_at": float,
         "started_at": float, "finished_at": float, "duration_ms": float, "retry_at": float,
         "count": int, "fencing": int},
        pk="id", defaults={"count": 1},
    )
    db["job_runs"].create_index(["job_id", "trigger", "scheduled_at", "attempt"], unique=True)
    db["job_runs"].create_index(["status"])
    db["job_runs"].create_index(["job_id", "status"])
    db["job_runs"].create_index(["job_id", "scheduled_at"])
    db["job_runs"].create_index(["invocation_id"])
    db["job_lateness"].create({"le": float, "count": int, "total_s": float}, pk="le")


def _m4_invocation_finishes(db: sqlite_utils.Database) -> None:
    """The order in which calls finished, as a sequence number per finish (`?after=` of
    `GET /api/invocations`, what `dockyard logs NAME --follow` reads). Triggers number every
    record that is written finished or becomes finished, in the transaction that does it: a
    reader that has seen number N has seen every finish before it, however many share a
    second and whichever process wrote them. AUTOINCREMENT: a number is never given twice,
    not even after retention removed the newest rows."""
    db.conn.execute("CREATE TABLE invocation_finishes (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "invocation_id TEXT NOT NULL, container TEXT)")
    db["invocation_finishes"].create_index(["container", "seq"])
    db["invocation_finishes"].create_index(["invocation_id"])
    db.conn.execute(
        "CREATE TRIGGER invocation_written_finished AFTER INSERT ON invocations "
        "WHEN NEW.status NOT IN ('queued', 'running') BEGIN "
        "INSERT INTO invocation_finishes (invocation_id, container) "
        "VALUES (NEW.id, NEW.container); END")
    db.conn.execute(
        "CREATE TRIGGER invocation_finished AFTER UPDATE OF status ON invocations "
        "WHEN OLD.status IN ('queued', 'running') AND NEW.status NOT IN ('queued', 'running') "
        "BEGIN INSERT INTO invocation_finishes (invocation_id, container) "
        "VALUES (NEW.id, NEW.container); END")


def _m5_deployment_workers(db: sqlite_utils.Database) -> None:
    """What each worker did for one deployment. A worker keeps one build log per version and
    reports it whole, so a version deployed again (a rollback, a retry) would show its earlier
    deployments' lines as its own: `log_base` is that worker's log as it stood when the
    deployment began (its lines are not this deployment's), and `state`, `error` and `log`
    keep what the worker had reported once a newer deployment of the version began."""
    db["deployment_workers"].create(
        {"deployment_id": str, "worker_id": str, "log_base": str, "state": str, "error": str,
         "log": str},
        pk=("deployment_id", "worker_id"),
    )


# What a call's route is made of (see store/routing.py): a write that changes any of it bumps
# the routing generation, so a web process can keep routes in memory and still see a deploy,
# an activation or a worker's change of state on the very next call. A heartbeat that changes
# nothing (last_seen, the same state again) leaves the generation alone.
_ROUTING_TRIGGERS = {
    "containers_insert": "AFTER INSERT ON containers",
    "containers_delete": "AFTER DELETE ON containers",
    "containers_update": "AFTER UPDATE OF name, active_version_id, serving_version_id "
                         "ON containers",
    "versions_insert": "AFTER INSERT ON versions",
    "versions_delete": "AFTER DELETE ON versions",
    "versions_update": "AFTER UPDATE ON versions",
    "worker_versions_insert": "AFTER INSERT ON worker_versions",
    "worker_versions_delete": "AFTER DELETE ON worker_versions",
    "worker_versions_update": "AFTER UPDATE OF state, worker_id, version_id ON worker_versions "
                              "WHEN OLD.state IS NOT NEW.state "
                              "OR OLD.worker_id IS NOT NEW.worker_id "
                              "OR OLD.version_id IS NOT NEW.version_id",
    "workers_insert": "AFTER INSERT ON workers",
    "workers_delete": "AFTER DELETE ON workers",
    "workers_update": "AFTER UPDATE OF state, address ON workers "
                      "WHEN OLD.state IS NOT NEW.state OR OLD.address IS NOT NEW.address",
}


def _m6routing_generation(db: sqlite_utils.Database) -> None:
    """A counter every change to routing bumps (by triggers, so no write path can forget)."""
    db.execute("CREATE TABLE routing_generation (id INTEGER PRIMARY KEY CHECK (id = 1), "
               "n INTEGER NOT NULL)")
    db.execute("INSERT INTO routing_generation (id, n) VALUES (1, 0)")
    for name, when in _ROUTING_TRIGGERS.items():
        db.execute(f"CREATE TRIGGER routing_{name} {when} BEGIN "
                   "UPDATE routing_generation SET n = n + 1 WHERE id = 1; END")


def _m7_deferred_calls(db: sqlite_utils.Database) -> None:
    """A queued call no worker could take yet (every instance busy, no worker connected)
    goes back to the queue until `not_before`, without holding a dispatcher thread;
    `unavailable_since` is when it was first turned away (it fails after a while)."""
    db["invocations"].add_column("not_before", float)
    db["invocations"].add_column("unavailable_since", float)


def _m8_worker_in_flight(db: sqlite_utils.Database) -> None:
    """The calls in a worker's processes, as its last heartbeat said (a sync call has no
    record until it ends, so the records cannot tell); and workers looked up by name."""
    db["workers"].add_column("in_flight", int)
    db["workers"].create_index(["name"])


SQLITE_STEPS = [_m1_initial, _m2_instance_id, _m3_jobs, _m4_invocation_finishes,
                _m5_deployment_workers, _m6routing_generation, _m7_deferred_calls,
                _m8_worker_in_flight]


def _m9_artifact_chunks(db: Database) -> None:
    """Package files kept in the database (PostgreSQL: every control plane reads them from
    there), in chunks; SQLite keeps them as files in the data dir."""
    blob = "BYTEA" if db.dialect is POSTGRES else "BLOB"
    db.execute(f"CREATE TABLE artifact_chunks (sha256 TEXT NOT NULL, n INTEGER NOT NULL, "
               f"data {blob} NOT NULL, PRIMARY KEY (sha256, n))")


def _m10_aliases(db: Database) -> None:
    """Lambda-style aliases of a container: a name for a version (or $LATEST), optionally
    with one more version taking a share (0.0-1.0) of the calls; `revision` changes on
    every update (Lambda's RevisionId)."""
    db.execute("CREATE TABLE aliases (container TEXT NOT NULL, name TEXT NOT NULL, "
               "function_version TEXT NOT NULL, extra_version TEXT, "
               "extra_weight DOUBLE PRECISION, description TEXT NOT NULL DEFAULT '', "
               "revision TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
               "updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (container, name))")


def _m11_traffic_splits(db: Database) -> None:
    """A container's traffic split: versions other than the serving one taking a share
    (0.0-1.0) of its unpinned calls; the serving version takes the rest. Part of every call's
    route, so a change bumps the routing generation (triggers, as for the other route
    tables)."""
    db.execute("CREATE TABLE traffic_splits (container_id BIGINT NOT NULL, "
               "version_id BIGINT NOT NULL, weight DOUBLE PRECISION NOT NULL, "
               "PRIMARY KEY (container_id, version_id))")
    if db.dialect is POSTGRES:
        db.execute("CREATE TRIGGER routing_traffic_splits AFTER INSERT OR DELETE OR UPDATE "
                   "ON traffic_splits FOR EACH ROW EXECUTE FUNCTION dockyard_route_changed()")
        return
    for event in ("INSERT", "DELETE", "UPDATE"):
        db.execute(f"CREATE TRIGGER routing_traffic_splits_{event.lower()} AFTER {event} ON "
                   "traffic_splits BEGIN UPDATE routing_generation SET n = n + 1 WHERE id = 1; "
                   "END")


# Steps after the PostgreSQL baseline (schema_pg.py, the schema of SQLITE_STEPS): one text
# for both engines.
SHARED_STEPS = [_m9_artifact_chunks, _m10_aliases, _m11_traffic_splits]
VERSION = len(SQLITE_STEPS) + len(SHARED_STEPS)
MIGRATE_LOCK = WRITE_LOCK - 1


def migrate(target) -> None:
    """Bring the schema up to date, once, whichever process starts first (the others wait
    for the lock and find nothing left to do)."""
    db = connect(target)
    try:
        if db.dialect is POSTGRES:
            _migrate_postgres(db)
        else:
            _migrate_sqlite(db)
    finally:
        db.close()


def _migrate_sqlite(db: Database) -> None:
    with transaction(db):
        current = db.execute("PRAGMA user_version").fetchone()[0]
        if current < len(SQLITE_STEPS):
            old = sqlite_utils.Database(db.raw)
            for number, step in enumerate(SQLITE_STEPS[current:], start=current + 1):
                step(old)
                db.execute(f"PRAGMA user_version={number}")
            current = len(SQLITE_STEPS)
        for number, step in enumerate(SHARED_STEPS[current - len(SQLITE_STEPS):],
                                      start=current + 1):
            step(db)
            db.execute(f"PRAGMA user_version={number}")


def _migrate_postgres(db: Database) -> None:
    from .schema_pg import create_baseline

    db.execute("BEGIN")
    try:
        db.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATE_LOCK])
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        current = row[0] if row else 0
        if current == 0:
            create_baseline(db)
            _m2_instance_id_in(db)
            current = len(SQLITE_STEPS)
        for number, step in enumerate(SHARED_STEPS[current - len(SQLITE_STEPS):],
                                      start=current + 1):
            step(db)
            current = number
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version (version) VALUES (?)", [current])
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _m2_instance_id_in(db: Database) -> None:
    db.execute("INSERT INTO settings (key, value) VALUES ('instance_id', ?)",
               [secrets.token_hex(8)])

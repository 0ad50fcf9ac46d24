"""Workers, what each one reports about each version, and how that moves deployments on:
the first worker ready with a container's new version switches its traffic to it."""

from __future__ import annotations

import json
import secrets

import sqlite_utils

from ...common.protocol import ROUTABLE_STATES
from ...errors import NotFound
from ..db import now, transaction

WORKER_TTL_S = 15.0
ROUTABLE = ROUTABLE_STATES


def register(db: sqlite_utils.Database, info: dict) -> dict:
    worker_id = "wrk_" + secrets.token_hex(6)
    t = now()
    with transaction(db):   # a route may change: see routing_hint.py
        db["workers"].insert({
            "id": worker_id, "name": str(info.get("name") or worker_id),
            "address": str(info.get("address") or ""),
            "hostname": str(info.get("hostname") or ""), "pid": int(info.get("pid") or 0),
            "isolation": json.dumps(info.get("isolation") or {}),
            "registered_at": t, "last_seen": t, "state": "up"})
    return db["workers"].get(worker_id)


def live_worker_ids(db: sqlite_utils.Database) -> list[str]:
    return [r["id"] for r in db.query(
        "SELECT id FROM workers WHERE state = 'up' AND last_seen > ?", [now() - WORKER_TTL_S])]


def heartbeat(db: sqlite_utils.Database, worker_id: str, states: list[dict],
              stopping: bool = False) -> None:
    with transaction(db) as conn:
        if not db["workers"].count_where("id = ?", [worker_id]):
            raise NotFound(f"worker '{worker_id}' is not registered; restart it to register")
        t = now()
        conn.execute("UPDATE workers SET last_seen = ?, state = ? WHERE id = ?",
                     [t, "stopped" if stopping else "up", worker_id])
        reported = set()
        for s in states:
            vid = int(s["version_id"])
            reported.add(vid)
            if s.get("deployment") and s["deployment"] != _latest_deployment_id(conn, vid):
                # A report about an earlier attempt (this worker has not seen the version's new
                # deployment yet): it says nothing about the new one.
                continue
            conn.execute(
                "INSERT INTO worker_versions (worker_id, version_id, state, error, log, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (worker_id, version_id) DO UPDATE SET "
                "state = excluded.state, error = excluded.error, "
                "log = coalesce(excluded.log, worker_versions.log), updated_at = excluded.updated_at",
                [worker_id, vid, str(s.get("state")), s.get("error"), s.get("log"), t])
        # A version the worker no longer holds is not routable to it any more.
        for (vid,) in conn.execute("SELECT version_id FROM worker_versions WHERE worker_id = ?",
                                   [worker_id]).fetchall():
            if vid not in reported:
                conn.execute("DELETE FROM worker_versions WHERE worker_id = ? AND version_id = ?",
                             [worker_id, vid])
        advance_deployments(db)


def _latest_deployment_id(conn, version_id: int) -> str | None:
    row = conn.execute("SELECT id FROM deployments WHERE version_id = ? "
                       "ORDER BY created_at DESC LIMIT 1", [version_id]).fetchone()
    return row[0] if row else None


def advance_deployments(db: sqlite_utils.Database) -> None:
    """Move deployments on from the live workers' reports (app/store/containers.py owns a
    deployment's states). Runs inside the caller's transaction."""
    from .containers import advance_deployments as advance   # containers imports this module
    advance(db)


def mark_lost(db: sqlite_utils.Database, worker_id: str) -> None:
    """A worker we could not reach takes no more calls until its next heartbeat says it is
    up (instead of until its heartbeat goes stale)."""
    with transaction(db) as conn:   # a route changes: see routing_hint.py
        conn.execute("UPDATE workers SET state = 'lost' WHERE id = ? AND state = 'up'",
                     [worker_id])


def set_local_worker_state(db: sqlite_utils.Database, state: str, reason: str = "") -> None:
    """What `serve` knows of the worker it runs itself (running, restarting, stopped), so
    that a 503 can say why no worker is there."""
    db["settings"].insert({"key": "local_worker", "value": json.dumps(
        {"state": state, "reason": reason, "at": now()})}, replace=True)


def local_worker_state(db: sqlite_utils.Database) -> dict | None:
    rows = list(db.query("SELECT value FROM settings WHERE key = 'local_worker'"))
    try:
        return json.loads(rows[0]["value"]) if rows else None
    except ValueError:
        return None


def live_workers(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT id, address FROM workers WHERE state = 'up' AND last_seen > ?",
                         [now() - WORKER_TTL_S]))


def list_workers(db: sqlite_utils.Database) -> list[dict]:
    cutoff = now() - WORKER_TTL_S
    out = []
    for w in db.query("SELECT * FROM workers ORDER BY registered_at"):
        versions = [
            {"container": r["container"], "version": r["version"], "state": r["state"],
             "error": r["error"]}
            for r in db.query(
                "SELECT c.name AS container, v.version, wv.state, wv.error "
                "FROM worker_versions wv JOIN versions v ON v.id = wv.version_id "
                "JOIN containers c ON c.id = v.container_id WHERE wv.worker_id = ? "
                "ORDER BY c.name, v.id", [w["id"]])]
        healthy = w["state"] == "up" and w["last_seen"] > cutoff
        out.append({"id": w["id"], "name": w["name"], "hostname": w["hostname"],
                    "pid": w["pid"], "address": w["address"],
                    "state": w["state"] if w["state"] != "up" or healthy else "lost",
                    "ready": healthy, "last_seen": w["last_seen"],
                    "registered_at": w["registered_at"],
                    "isolation": json.loads(w["isolation"] or "{}"), "versions": versions})
    return out


def deployment_detail(db: sqlite_utils.Database, deployment_id: str) -> dict:
    """A deployment and what each live worker did for it: for the version's latest deployment
    the workers' reports as they come in (only the log lines written since it began), for an
    earlier one what they had reported when the next one began."""
    dep = db["deployments"].get(deployment_id) if db["deployments"].count_where(
        "id = ?", [deployment_id]) else None
    if dep is None:
        raise NotFound(f"no deployment '{deployment_id}'")
    version = db["versions"].get(dep["version_id"])
    container = db["containers"].get(dep["container_id"])
    live = set(live_worker_ids(db))
    workers = []
    seen = set()
    latest = _latest_deployment_id(db.conn, dep["version_id"]) == deployment_id
    if latest:
        rows = db.query(
            "SELECT wv.worker_id, wv.state, wv.error, wv.log, dw.log_base, w.name "
            "FROM worker_versions wv JOIN workers w ON w.id = wv.worker_id "
            "LEFT JOIN deployment_workers dw ON dw.deployment_id = ? "
            "AND dw.worker_id = wv.worker_id WHERE wv.version_id = ?",
            [deployment_id, dep["version_id"]])
    else:
        rows = db.query(
            "SELECT dw.worker_id, dw.state, dw.error, dw.log, '' AS log_base, w.name "
            "FROM deployment_workers dw JOIN workers w ON w.id = dw.worker_id "
            "WHERE dw.deployment_id = ? AND dw.state IS NOT NULL", [deployment_id])
    for r in rows:
        seen.add(r["worker_id"])
        if r["worker_id"] in live or not latest:
            workers.append({"worker": r["worker_id"], "name": r["name"], "state": r["state"],
                            "error": r["error"],
                            "log": own_log(r["log"], r["log_base"] or "")})
    for wid in sorted(live - seen if latest else ()):
        workers.append({"worker": wid, "state": "pending", "error": None, "log": ""})
    return {"id": dep["id"], "container": container["name"], "version": version["version"],
            "status": dep["status"], "error": dep["error"], "created_at": dep["created_at"],
            "finished_at": dep["finished_at"], "workers": workers}


def deployment_log_base(db: sqlite_utils.Database, deployment_id: str,
                        worker_id: str) -> str:
    row = db.conn.execute("SELECT log_base FROM deployment_workers WHERE deployment_id = ? "
                          "AND worker_id = ?", [deployment_id, worker_id]).fetchone()
    return (row[0] or "") if row else ""


def own_log(log: str | None, base: str) -> str:
    """The lines of a worker's version log written after `base` (its log when a deployment
    began). The worker caps its log from the front, so `base` may have lost its first lines
    since: then the new lines are those after base's last line."""
    log = log or ""
    if not base:
        return log
    # The log is what is left of base (its first lines perhaps cut), then the new lines:
    # find the longest tail of base, from a line's start, that the log begins with.
    start = 0
    while start < len(base):
        tail = base[start:]
        if log.startswith(tail):
            return log[len(tail):].lstrip("\n")
        newline = base.find("\n", start)
        if newline < 0:
            break
        start = newline + 1
    return log

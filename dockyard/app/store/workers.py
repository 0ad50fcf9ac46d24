"""Workers, what each one reports about each version, and how that moves deployments on:
the first worker ready with a container's new version switches its traffic to it."""

from __future__ import annotations

import json
import secrets

from .engine import Database

from ...common.protocol import ROUTABLE_STATES
from ...errors import Conflict, NotFound
from .db import now, transaction

WORKER_TTL_S = 15.0
ROUTABLE = ROUTABLE_STATES


# States of a worker that is certainly not serving: its row may be taken over or forgotten.
GONE_STATES = ("stopped", "lost")


def register(db: Database, info: dict) -> dict:
    """A worker's row: the one it had before (`previous_id`, which it keeps in its worker
    folder), else the one of its name when that worker is gone, else a new one. A name a
    live worker holds is refused. A row taken over starts with no versions: the worker's
    heartbeat says what it holds now."""
    name = str(info.get("name") or "").strip()
    previous = str(info.get("previous_id") or "")
    t = now()
    with transaction(db) as conn:   # a route may change: see routing_hint.py
        own = _row(conn, "id = ?", previous) if previous else None
        named = _row(conn, "name = ?", name) if name else None
        if named is not None and (own is None or named["id"] != own["id"]):
            if _live(named, t):
                raise Conflict(
                    f"the worker name '{name}' is held by a live worker ({named['id']}, pid "
                    f"{named['pid']} on {named['hostname'] or 'an unknown host'}, seen "
                    f"{t - named['last_seen']:.0f}s ago): give this worker another --name, "
                    f"or stop that one first")
            if own is None:
                own = named
            else:
                _delete(conn, named["id"])   # a gone worker's name, now this one's
        fields = {"name": name or None, "address": str(info.get("address") or ""),
                  "hostname": str(info.get("hostname") or ""),
                  "pid": int(info.get("pid") or 0),
                  "isolation": json.dumps(info.get("isolation") or {}),
                  "registered_at": t, "last_seen": t, "state": "up"}
        if own is not None:
            worker_id = own["id"]
            fields["name"] = fields["name"] or own["name"]
            conn.execute("UPDATE workers SET name = ?, address = ?, hostname = ?, pid = ?, "
                         "isolation = ?, registered_at = ?, last_seen = ?, state = ? "
                         "WHERE id = ?", [*fields.values(), worker_id])
            conn.execute("DELETE FROM worker_versions WHERE worker_id = ?", [worker_id])
        else:
            worker_id = "wrk_" + secrets.token_hex(6)
            fields["name"] = fields["name"] or worker_id
            db["workers"].insert({"id": worker_id, **fields})
    return db["workers"].get(worker_id)


def _row(conn, where: str, value: str) -> dict | None:
    cursor = conn.execute(f"SELECT * FROM workers WHERE {where} "   # noqa: S608 - fixed text
                          "ORDER BY last_seen DESC LIMIT 1", [value])
    row = cursor.fetchone()
    return dict(zip([c[0] for c in cursor.description], row)) if row else None


def _live(row: dict, t: float) -> bool:
    return row["state"] not in GONE_STATES and row["last_seen"] > t - WORKER_TTL_S


def _delete(conn, worker_id: str) -> None:
    conn.execute("DELETE FROM worker_versions WHERE worker_id = ?", [worker_id])
    conn.execute("DELETE FROM workers WHERE id = ?", [worker_id])


def remove(db: Database, name: str) -> dict:
    """`dockyard workers rm NAME` (or id): forget a worker that is gone. A live one is
    refused (it would register again on its next heartbeat)."""
    t = now()
    with transaction(db) as conn:
        row = _row(conn, "name = ?", name) or _row(conn, "id = ?", name)
        if row is None:
            raise NotFound(f"no worker '{name}'; `dockyard workers` lists them")
        if _live(row, t):
            raise Conflict(f"worker '{row['name']}' is live (seen {t - row['last_seen']:.0f}s "
                           "ago); stop it first, then remove it")
        _delete(conn, row["id"])
    return {"id": row["id"], "name": row["name"], "removed": True}


def forget_gone(db: Database, after_s: float, t: float) -> int:
    """Forget workers not seen for `after_s`: stopped or lost ones, and any silent for that
    long and past the heartbeat's time to live. Returns how many."""
    stale = t - after_s
    with transaction(db) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM workers WHERE (state IN (?, ?) AND last_seen < ?) "
            "OR last_seen < ?", [*GONE_STATES, stale, min(stale, t - WORKER_TTL_S)])]
        for worker_id in ids:
            _delete(conn, worker_id)
    return len(ids)


def live_worker_ids(db: Database) -> list[str]:
    return [r["id"] for r in db.query(
        "SELECT id FROM workers WHERE state = 'up' AND last_seen > ?", [now() - WORKER_TTL_S])]


def heartbeat(db: Database, worker_id: str, states: list[dict],
              stopping: bool = False, in_flight: int | None = None) -> None:
    with transaction(db) as conn:
        if not db["workers"].count_where("id = ?", [worker_id]):
            raise NotFound(f"worker '{worker_id}' is not registered; restart it to register")
        t = now()
        conn.execute("UPDATE workers SET last_seen = ?, state = ?, in_flight = ? WHERE id = ?",
                     [t, "stopped" if stopping else "up", in_flight, worker_id])
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


def advance_deployments(db: Database) -> None:
    """Move deployments on from the live workers' reports (app/store/deployments.py owns a
    deployment's states). Runs inside the caller's transaction."""
    from .deployments import advance_deployments as advance   # which imports this module
    advance(db)


def mark_lost(db: Database, worker_id: str) -> None:
    """A worker we could not reach takes no more calls until its next heartbeat says it is
    up (instead of until its heartbeat goes stale)."""
    with transaction(db) as conn:   # a route changes: see routing_hint.py
        conn.execute("UPDATE workers SET state = 'lost' WHERE id = ? AND state = 'up'",
                     [worker_id])


def mark_unreachable(db: Database, worker_id: str, state: str) -> None:
    """A control-plane process found a worker `suspect` (it stopped answering its pings or
    left a call frame unacknowledged) or `lost` (its connection closed): out of routing for
    everyone at once, until its own heartbeat says `up` again (see app/liveness.py)."""
    if state not in ("suspect", "lost"):
        raise ValueError(f"not a state of an unreachable worker: {state}")
    with transaction(db) as conn:   # a route changes: see routing_hint.py
        conn.execute("UPDATE workers SET state = ? WHERE id = ? AND state IN ('up', 'suspect')"
                     " AND state != ?", [state, worker_id, state])


def mark_answering(db: Database, worker_id: str) -> None:
    """A worker marked `suspect` answers its pings again: back in routing (a `lost` one comes
    back through its heartbeat only)."""
    with transaction(db) as conn:   # a route changes: see routing_hint.py
        conn.execute("UPDATE workers SET state = 'up' WHERE id = ? AND state = 'suspect'",
                     [worker_id])


def recently_seen(db: Database) -> list[dict]:
    """Workers heard from within the heartbeat's lifetime, whatever their state: those the
    control plane's processes keep pinging ({"id", "address", "state"})."""
    return [dict(r) for r in db.query(
        "SELECT id, address, state FROM workers WHERE last_seen > ? AND address != '' "
        "AND state != 'stopped'", [now() - WORKER_TTL_S])]


def set_local_worker_state(db: Database, state: str, reason: str = "") -> None:
    """What `serve` knows of the worker it runs itself (running, restarting, stopped), so
    that a 503 can say why no worker is there."""
    db["settings"].insert({"key": "local_worker", "value": json.dumps(
        {"state": state, "reason": reason, "at": now()})}, replace=True)


def local_worker_state(db: Database) -> dict | None:
    rows = list(db.query("SELECT value FROM settings WHERE key = 'local_worker'"))
    try:
        return json.loads(rows[0]["value"]) if rows else None
    except ValueError:
        return None


def address_of(db: Database, worker_id: str) -> str | None:
    """Where a live worker answers (None for one unknown, gone or stopped)."""
    row = db.execute("SELECT address FROM workers WHERE id = ? AND state = 'up' "
                     "AND last_seen > ?", [worker_id, now() - WORKER_TTL_S]).fetchone()
    return row[0] if row and row[0] else None


def live_workers(db: Database) -> list[dict]:
    return list(db.query("SELECT id, address FROM workers WHERE state = 'up' AND last_seen > ?",
                         [now() - WORKER_TTL_S]))


def list_workers(db: Database) -> list[dict]:
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
                    "calls_in_flight": (w["in_flight"] or 0) if healthy else 0,
                    "isolation": json.loads(w["isolation"] or "{}"), "versions": versions})
    return out


def deployment_detail(db: Database, deployment_id: str) -> dict:
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
    latest = _latest_deployment_id(db, dep["version_id"]) == deployment_id
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
    waiting = sorted(live - seen if latest else ())
    names = {r["id"]: r["name"] for r in db.query(
        f"SELECT id, name FROM workers WHERE id IN ({', '.join('?' for _ in waiting)})",
        waiting)} if waiting else {}
    for wid in waiting:
        workers.append({"worker": wid, "name": names.get(wid), "state": "pending",
                        "error": None, "log": ""})
    return {"id": dep["id"], "container": container["name"], "version": version["version"],
            "status": dep["status"], "error": dep["error"], "created_at": dep["created_at"],
            "finished_at": dep["finished_at"], "workers": workers}


def deployment_log_base(db: Database, deployment_id: str,
                        worker_id: str) -> str:
    row = db.execute("SELECT log_base FROM deployment_workers WHERE deployment_id = ? "
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

"""Cron jobs: their definitions (from the API or from the active version's manifest), their
next fire time and their counters. Runs live in job_runs.py."""

from __future__ import annotations

import json
import secrets

from .engine import Database

from ...common import jobs as job_rules
from ...common import schedule as schedules
from ...common.manifest import Manifest, clipped
from ...errors import Conflict, NotFound
from .db import now, transaction

SOURCE_API = "api"
SOURCE_MANIFEST = "manifest"
# What a job is, as stored: a change to any of these is a change of definition.
DEFINITION = ("container", "function", "schedule", *job_rules.SETTINGS)


def _row_definition(row: dict) -> dict:
    out = {key: row[key] for key in DEFINITION if key not in ("payload", "enabled")}
    out["payload"] = json.loads(row["payload"]) if row["payload"] is not None else None
    out["enabled"] = bool(row["enabled"])
    return out


def schedule_of(row: dict) -> schedules.Schedule:
    return schedules.parse(row["schedule"], row["timezone"])


def _next_fire(definition: dict, t: float, anchor: float) -> float | None:
    if not definition["enabled"]:
        return None
    return schedules.parse(definition["schedule"], definition["timezone"]).next_after(t, anchor)


def get(db: Database, name: str) -> dict:
    rows = list(db.query("SELECT * FROM jobs WHERE name = ?", [name]))
    if not rows:
        raise NotFound(f"no job named '{clipped(name)}'; `dockyard jobs ls` lists them")
    return rows[0]


def list_all(db: Database) -> list[dict]:
    return list(db.query(
        "SELECT j.*, (SELECT r.status FROM job_runs r WHERE r.job_id = j.id "
        "ORDER BY r.id DESC LIMIT 1) AS last_status FROM jobs j ORDER BY j.name"))


def with_last_status(db: Database, row: dict) -> dict:
    last = db.execute("SELECT status FROM job_runs WHERE job_id = ? ORDER BY id DESC "
                           "LIMIT 1", [row["id"]]).fetchone()
    return dict(row, last_status=last[0] if last else None)


def _insert(db: Database, name: str, source: str, definition: dict,
            version: str | None, t: float) -> None:
    anchor = round(t, 3)
    db["jobs"].insert({
        "id": "job_" + secrets.token_hex(8), "name": name, "source": source,
        "definition": _definition_text(definition) if source == SOURCE_MANIFEST else None,
        "version": version, **_stored(definition), "anchor": anchor,
        "next_fire_at": _next_fire(definition, t, anchor), "created_at": t, "updated_at": t,
        "fires": 0, "failures": 0, "skipped": 0, "missed": 0})


def _definition_text(definition: dict) -> str:
    return json.dumps(definition, sort_keys=True)


def _stored(definition: dict) -> dict:
    out = {key: definition[key] for key in DEFINITION}
    out["payload"] = json.dumps(definition["payload"])
    out["enabled"] = int(bool(definition["enabled"]))
    return out


def create(db: Database, name: str, definition: dict) -> dict:
    with transaction(db):
        if db["jobs"].count_where("name = ?", [name]):
            raise Conflict(f"a job named '{name}' exists already; change it with `dockyard "
                           f"jobs edit {name}` (PATCH /api/jobs/{name}) or remove it first")
        _insert(db, name, SOURCE_API, definition, None, now())
    return get(db, name)


def check_editable(row: dict) -> None:
    if row["source"] == SOURCE_MANIFEST:
        raise Conflict(f"job '{row['name']}' comes from the dockyard.toml of container "
                       f"'{row['container']}'; change it there and redeploy")


def update(db: Database, name: str, changes: dict) -> dict:
    """Apply changed settings (already checked); a new schedule or timezone starts counting
    from now, as does an @every interval."""
    with transaction(db):
        row = get(db, name)
        check_editable(row)
        definition = dict(_row_definition(row), **changes)
        _rewrite(db, row, definition, now())
    return get(db, name)


def _rewrite(db: Database, row: dict, definition: dict, t: float,
             version: str | None = None) -> None:
    values = _stored(definition)
    timing_changed = (definition["schedule"], definition["timezone"]) != (
        row["schedule"], row["timezone"])
    anchor = round(t, 3) if timing_changed else row["anchor"]
    values["anchor"] = anchor
    if timing_changed or bool(row["enabled"]) != bool(definition["enabled"]):
        values["next_fire_at"] = _next_fire(definition, t, anchor)
    values["updated_at"] = t
    if row["source"] == SOURCE_MANIFEST:
        values["definition"] = _definition_text(definition)
        values["version"] = version
    db["jobs"].update(row["id"], values)


def delete(db: Database, name: str) -> None:
    with transaction(db) as conn:
        row = get(db, name)
        check_editable(row)
        _delete(conn, row["id"])


def _delete(conn, job_id: str) -> None:
    conn.execute("DELETE FROM job_runs WHERE job_id = ?", [job_id])
    conn.execute("DELETE FROM jobs WHERE id = ?", [job_id])


def set_enabled(db: Database, name: str, enabled: bool) -> dict:
    """Pause or resume. Resuming counts from now: the fires a paused job did not make are not
    replayed."""
    with transaction(db):
        row = get(db, name)
        t = now()
        next_fire = None
        if enabled:
            next_fire = schedule_of(row).next_after(t, row["anchor"])
            if next_fire is None:
                raise Conflict(f"job '{name}' has no fire time left ({row['schedule']}); "
                               "give it a new schedule")
        db["jobs"].update(row["id"], {"enabled": int(enabled), "next_fire_at": next_fire,
                                      "updated_at": t})
    return get(db, name)


def active_manifest(db: Database, container: str) -> Manifest | None:
    """The manifest of a container's active version (None: no such container, or none
    active)."""
    rows = list(db.query("SELECT v.manifest FROM containers c JOIN versions v "
                         "ON v.id = c.active_version_id WHERE c.name = ?", [container]))
    return Manifest.from_dict(json.loads(rows[0]["manifest"])) if rows else None


def container_exists(db: Database, container: str) -> bool:
    return bool(db["containers"].count_where("name = ?", [container]))


# -- jobs from manifests --------------------------------------------------------------------

def manifest_job_name(container: str, job: str) -> str:
    return f"{container}.{job}"


def _desired_manifest_jobs(db: Database) -> dict[str, tuple[str, str, dict]]:
    desired = {}
    for row in db.query("SELECT c.name AS container, v.version, v.manifest FROM containers c "
                        "JOIN versions v ON v.id = c.active_version_id"):
        manifest = json.loads(row["manifest"])
        for job in manifest.get("jobs") or []:
            definition = {key: job.get(key, spec[0]) for key, spec in job_rules.SETTINGS.items()}
            definition.update(container=row["container"], function=job["function"],
                              schedule=job["schedule"])
            desired[manifest_job_name(row["container"], job["name"])] = (
                row["container"], row["version"], definition)
    return desired


def sync_manifest_jobs(db: Database) -> tuple[int, int, int]:
    """Make the manifest jobs those of each container's active version: add the new ones,
    rewrite the changed ones (keeping their history and counters), remove those gone with
    their version or container. A job whose definition did not change keeps its state (a
    pause survives a redeploy). Returns (added, changed, removed)."""
    added = changed = removed = 0
    with transaction(db) as conn:
        desired = _desired_manifest_jobs(db)
        existing = {r["name"]: r for r in db.query("SELECT * FROM jobs WHERE source = ?",
                                                   [SOURCE_MANIFEST])}
        t = now()
        for name, (container, version, definition) in desired.items():
            row = existing.get(name)
            if row is None:
                try:
                    _insert(db, name, SOURCE_MANIFEST, definition, version, t)
                except schedules.ScheduleError:
                    continue  # (checked on upload; a manifest stored before that is skipped)
                added += 1
            elif row["definition"] != _definition_text(definition):
                _rewrite(db, row, definition, t, version)
                changed += 1
            elif row["version"] != version:
                db["jobs"].update(row["id"], {"version": version})
        for name, row in existing.items():
            if name not in desired:
                _delete(conn, row["id"])
                removed += 1
    return added, changed, removed


def containers_signature(db: Database) -> tuple:
    """Changes whenever a container's active version changes (the scheduler then syncs the
    manifest jobs)."""
    return tuple(db.execute("SELECT id, active_version_id FROM containers ORDER BY id"
                                 ).fetchall())


# -- the scheduler's reads ------------------------------------------------------------------

def due(db: Database, t: float) -> list[dict]:
    return list(db.query("SELECT * FROM jobs WHERE enabled = 1 AND next_fire_at <= ? "
                         "ORDER BY next_fire_at", [t]))


def set_next_fire(conn, job_id: str, next_fire_at: float | None, disable: bool) -> None:
    if disable:
        conn.execute("UPDATE jobs SET next_fire_at = NULL, enabled = 0 WHERE id = ?", [job_id])
    else:
        conn.execute("UPDATE jobs SET next_fire_at = ? WHERE id = ?", [next_fire_at, job_id])


def count(conn, job_id: str, **increments: int) -> None:
    """Add to a job's counters (fires, failures, skipped, missed)."""
    sets = ", ".join(f"{key} = {key} + ?" for key in increments)
    conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*increments.values(), job_id])


def mark(conn, job_id: str, **values: float) -> None:
    """Set last_fire_at / last_success_at."""
    sets = ", ".join(f"{key} = {conn.dialect.greatest(f'coalesce({key}, 0)', '?')}"
                     for key in values)
    conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*values.values(), job_id])


def earliest_wake(db: Database) -> float | None:
    """The next time the scheduler has something to do: a fire or a retry."""
    row = db.execute(
        "SELECT min(t) FROM (SELECT min(next_fire_at) AS t FROM jobs WHERE enabled = 1 "
        "UNION ALL SELECT min(retry_at) FROM job_runs WHERE status = 'waiting') AS wakes"
    ).fetchone()
    return row[0]


# -- metrics --------------------------------------------------------------------------------

def counters(db: Database) -> list[dict]:
    return list(db.query("SELECT name, fires, failures, skipped, missed, last_success_at, "
                         "next_fire_at, enabled FROM jobs ORDER BY name"))

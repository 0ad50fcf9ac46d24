"""Jobs as the API sees them: a request body checked into a definition (each problem a 400
that says what is wrong), and a stored job shown with its next fire times and its schedule in
words."""

from __future__ import annotations

import json

from ..store.engine import Database

from ...common import jobs as job_rules
from ...common import schedule as schedules
from ...common.manifest import clipped
from ...errors import BadRequest, NotFound
from ..store.db import now
from ..store import jobs as store

FIELDS = {"name", "target", "container", "function", "schedule", *job_rules.SETTINGS}
EDITABLE = FIELDS - {"name"}
NEXT_FIRES = 5


def _bad(exc: Exception) -> BadRequest:
    return BadRequest(str(exc))


def _target(body: dict) -> tuple[str, str]:
    """(container, function) from `container` + `function`, or a `target` written
    `container#module:function` (as PowerJob names a processor) or `container/function`."""
    target = body.get("target")
    if target is not None:
        if "container" in body or "function" in body:
            raise BadRequest("give either target or container and function, not both")
        if not isinstance(target, str):
            raise BadRequest("target must be a string such as 'hello/greet' or "
                             "'hello#main:greet'")
        sep = "#" if "#" in target else "/"
        container, _, function = target.partition(sep)
        if not container or not function:
            raise BadRequest(f"target '{clipped(target)}' is not 'container/function' or "
                             "'container#module:function'")
        return container, function
    container, function = body.get("container"), body.get("function")
    if not isinstance(container, str) or not container:
        raise BadRequest("a job needs a target: 'container' and 'function', or 'target' "
                         "such as 'hello/greet'")
    if not isinstance(function, str) or not function:
        raise BadRequest("a job needs 'function' (a name in the container's [functions] or "
                         "'module:callable')")
    return container, function


def check_target(db: Database, container: str, function: str) -> None:
    manifest = store.active_manifest(db, container)
    if manifest is None:
        if not store.container_exists(db, container):
            raise BadRequest(f"no container named '{clipped(container)}'; `dockyard ls` "
                             "lists them")
        raise BadRequest(f"container '{clipped(container)}' has no active version; deploy one")
    try:
        manifest.resolve_function(function)
    except NotFound as exc:
        raise BadRequest(exc.message) from None


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("send the job as a JSON object, e.g. {\"name\": \"tick\", "
                         "\"target\": \"hello/greet\", \"schedule\": \"@every 1m\"}")
    return body


def _only(body: dict, allowed, refusal: str, label: str) -> dict:
    """`body` if it has no field outside `allowed`; else a 400 naming one and the allowed."""
    unknown = set(body) - set(allowed)
    if unknown:
        raise BadRequest(f"{refusal} '{clipped(sorted(unknown)[0])}'; {label}: "
                         f"{', '.join(sorted(allowed))}")
    return body


def definition_from(db: Database, body) -> tuple[str, dict]:
    """(name, definition) from a POST /api/jobs body."""
    body = _only(_object(body), FIELDS, "unknown field", "known")
    try:
        name = job_rules.check_name(body.get("name"))
        settings = job_rules.check_settings(body)
        job_rules.check_schedule(body.get("schedule"), settings["timezone"], now())
    except job_rules.JobError as exc:
        raise _bad(exc) from None
    container, function = _target(body)
    check_target(db, container, function)
    return name, dict(settings, container=container, function=function,
                      schedule=" ".join(body["schedule"].split()))


def changes_from(db: Database, row: dict, body) -> dict:
    """The checked changes of a PATCH /api/jobs/<name> body."""
    body = _only(_object(body), EDITABLE, "cannot change", "changeable")
    try:
        changes = job_rules.check_settings(body, partial=True)
        if "schedule" in body or "timezone" in body:
            schedule = body.get("schedule", row["schedule"])
            job_rules.check_schedule(schedule, changes.get("timezone", row["timezone"]), now())
            changes["schedule"] = " ".join(schedule.split())
    except job_rules.JobError as exc:
        raise _bad(exc) from None
    if {"target", "container", "function"} & set(body):
        merged = {"container": row["container"], "function": row["function"]}
        if "target" not in body:
            merged.update({k: body[k] for k in ("container", "function") if k in body})
            container, function = _target(merged)
        else:
            container, function = _target(body)
        check_target(db, container, function)
        changes.update(container=container, function=function)
    return changes


def record(row: dict, full: bool = True) -> dict:
    """A stored job for the API: its definition, state, counters and, in full, the next
    fire times (in the job's timezone) with the schedule in words."""
    out = {key: row[key] for key in ("name", "source", "container", "function", "version",
                                     "schedule", "timezone", "concurrency", "retries",
                                     "retry_backoff_s", "timeout_s", "starting_deadline_s",
                                     "history_days", "created_at", "updated_at",
                                     "next_fire_at", "last_fire_at", "last_success_at")}
    out["target"] = f"{row['container']}/{row['function']}"
    out["payload"] = json.loads(row["payload"]) if row["payload"] is not None else None
    out["enabled"] = bool(row["enabled"])
    out["last_status"] = row.get("last_status")
    out["next_fire"] = schedules.iso(row["next_fire_at"], row["timezone"])
    out["counts"] = {key: row[key] for key in ("fires", "failures", "skipped", "missed")}
    if full:
        try:
            schedule = store.schedule_of(row)
        except schedules.ScheduleError as exc:
            out["explain"], out["next_fires"] = f"cannot be used: {exc}", []
            return out
        out["explain"] = schedule.explain()
        first = row["next_fire_at"]
        times = [] if first is None else [first, *schedule.next_times(first, NEXT_FIRES - 1,
                                                                      row["anchor"])]
        out["next_fires"] = [schedules.iso(t, row["timezone"]) for t in times]
    return out

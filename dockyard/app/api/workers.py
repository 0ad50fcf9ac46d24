"""Worker registration (a restarted worker takes its row over; a live worker's name is
refused), heartbeats (the reply carries the desired set), the list, and forgetting one."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ...common.protocol import VersionState
from ...errors import BadRequest
from . import MAX_INTEGER
from ..auth import require
from ..datadir import WORKER_NAME_RE, WORKER_NAME_RULE
from ..state import database
from ..store import containers as container_store
from ..store import workers as store

bp = Blueprint("workers", __name__)


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    return body


@bp.post("/api/workers/register")
@require("worker")
def register():
    body = _body()
    name = body.get("name")
    if name is not None and not (isinstance(name, str) and WORKER_NAME_RE.fullmatch(name)):
        raise BadRequest(WORKER_NAME_RULE)
    for key in ("previous_id", "address", "hostname"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"'{key}' must be a string")
    pid = body.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)
                            or not 0 <= pid <= MAX_INTEGER):
        raise BadRequest("'pid' must be a process id (a whole number, 0 or more)")
    if body.get("isolation") is not None and not isinstance(body["isolation"], dict):
        raise BadRequest("'isolation' must be an object")
    worker = store.register(database(), body)
    return jsonify({"id": worker["id"],
                    "heartbeat_interval": current_app.config["HEARTBEAT_INTERVAL_S"]}), 201


@bp.post("/api/workers/<worker_id>/heartbeat")
@require("worker")
def heartbeat(worker_id: str):
    body = _body()
    states = _version_reports(body.get("versions") or [])
    in_flight = body.get("in_flight")
    if in_flight is not None and (not isinstance(in_flight, int) or isinstance(in_flight, bool)
                                  or not 0 <= in_flight <= MAX_INTEGER):
        raise BadRequest("'in_flight' must be a whole number of calls")
    db = database()
    store.heartbeat(db, worker_id, states, stopping=bool(body.get("stopping")),
                    in_flight=in_flight)
    return jsonify({"desired": container_store.desired_versions(db),
                    "heartbeat_interval": current_app.config["HEARTBEAT_INTERVAL_S"]})


REPORT_STATES = {value for key, value in vars(VersionState).items() if key.isupper()}


def _version_reports(states) -> list[dict]:
    """A heartbeat's `versions`: one {"version_id", "state", "error", "log", "deployment"}
    per version the worker holds, each checked before the store reads it."""
    if not isinstance(states, list):
        raise BadRequest("'versions' must be a list")
    for report in states:
        if not isinstance(report, dict):
            raise BadRequest("each of 'versions' must be an object with 'version_id' and "
                             "'state'")
        version_id = report.get("version_id")
        if isinstance(version_id, bool) or not isinstance(version_id, int) or \
                not 0 < version_id <= MAX_INTEGER:
            raise BadRequest("'version_id' must be a version's id (a whole number above 0)")
        if report.get("state") not in REPORT_STATES:
            raise BadRequest(f"'state' must be one of {', '.join(sorted(REPORT_STATES))}")
        for key in ("error", "log", "deployment"):
            if report.get(key) is not None and not isinstance(report[key], str):
                raise BadRequest(f"'{key}' must be a string or null")
    return states


@bp.get("/api/workers")
@require()
def list_workers():
    return jsonify({"workers": store.list_workers(database())})


@bp.delete("/api/workers/<name>")
@require()
def remove_worker(name: str):
    """Forget a worker that is gone (by name or id); a live one is a 409."""
    return jsonify(store.remove(database(), name))

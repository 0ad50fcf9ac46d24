"""Worker registration (a restarted worker takes its row over; a live worker's name is
refused), heartbeats (the reply carries the desired set), the list, and forgetting one."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ...errors import BadRequest
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
    worker = store.register(database(), body)
    return jsonify({"id": worker["id"],
                    "heartbeat_interval": current_app.config["HEARTBEAT_INTERVAL_S"]}), 201


@bp.post("/api/workers/<worker_id>/heartbeat")
@require("worker")
def heartbeat(worker_id: str):
    body = _body()
    states = body.get("versions") or []
    if not isinstance(states, list):
        raise BadRequest("'versions' must be a list")
    in_flight = body.get("in_flight")
    if in_flight is not None and (not isinstance(in_flight, int) or isinstance(in_flight, bool)
                                  or in_flight < 0):
        raise BadRequest("'in_flight' must be a whole number of calls")
    db = database()
    store.heartbeat(db, worker_id, states, stopping=bool(body.get("stopping")),
                    in_flight=in_flight)
    return jsonify({"desired": container_store.desired_versions(db),
                    "heartbeat_interval": current_app.config["HEARTBEAT_INTERVAL_S"]})


@bp.get("/api/workers")
@require()
def list_workers():
    return jsonify({"workers": store.list_workers(database())})


@bp.delete("/api/workers/<name>")
@require()
def remove_worker(name: str):
    """Forget a worker that is gone (by name or id); a live one is a 409."""
    return jsonify(store.remove(database(), name))

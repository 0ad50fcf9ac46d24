"""Worker registration and heartbeats; the heartbeat reply carries the desired set."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ...errors import BadRequest
from ..auth import require
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
    worker = store.register(database(), _body())
    return jsonify({"id": worker["id"],
                    "heartbeat_interval": current_app.config["HEARTBEAT_INTERVAL_S"]}), 201


@bp.post("/api/workers/<worker_id>/heartbeat")
@require("worker")
def heartbeat(worker_id: str):
    body = _body()
    states = body.get("versions") or []
    if not isinstance(states, list):
        raise BadRequest("'versions' must be a list")
    db = database()
    store.heartbeat(db, worker_id, states, stopping=bool(body.get("stopping")))
    return jsonify({"desired": container_store.desired_versions(db),
                    "heartbeat_interval": current_app.config["HEARTBEAT_INTERVAL_S"]})


@bp.get("/api/workers")
@require()
def list_workers():
    return jsonify({"workers": store.list_workers(database())})

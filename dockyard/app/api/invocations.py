"""Invocation records."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from ...errors import BadRequest
from ..auth import require
from ..cancel import cancel
from ..state import connections, database
from ..store import invocations as store

bp = Blueprint("invocations", __name__)


@bp.get("/api/invocations")
@require()
def list_invocations():
    try:
        limit = int(request.args.get("limit", 50))
    except ValueError:
        raise BadRequest("limit must be a number") from None
    rows = store.list_recent(database(), request.args.get("container"),
                             request.args.get("status"), limit)
    return jsonify({"invocations": rows})


@bp.get("/api/invocations/<invocation_id>")
@require()
def get_invocation(invocation_id: str):
    return jsonify(store.get(database(), invocation_id))


@bp.post("/api/invocations/<invocation_id>/cancel")
@require()
def cancel_invocation(invocation_id: str):
    return jsonify(cancel(database(), connections(), invocation_id))

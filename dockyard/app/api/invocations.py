"""Invocation records."""

from __future__ import annotations

import re

from flask import Blueprint, jsonify, request

from ...errors import BadRequest
from ..auth import require
from ..cancel import cancel
from ..db import now
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
    since = request.args.get("since")
    rows = store.list_recent(database(), request.args.get("container"),
                             request.args.get("status"), limit,
                             now() - since_seconds(since) if since else None)
    return jsonify({"invocations": rows})


SINCE_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def since_seconds(text: str) -> float:
    """`?since=` as a duration back from now: 90, 90s, 10m, 2h, 7d."""
    match = SINCE_RE.fullmatch(text.strip())
    if not match:
        raise BadRequest("since must be a duration such as 90s, 10m, 2h or 7d")
    return float(match.group(1)) * UNIT_S[match.group(2)]


@bp.get("/api/invocations/<invocation_id>")
@require()
def get_invocation(invocation_id: str):
    return jsonify(store.get(database(), invocation_id))


@bp.post("/api/invocations/<invocation_id>/cancel")
@require()
def cancel_invocation(invocation_id: str):
    return jsonify(cancel(database(), connections(), invocation_id))

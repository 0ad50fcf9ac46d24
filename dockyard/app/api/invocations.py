"""Invocation records."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from ...common.durations import parse_duration
from ...errors import BadRequest
from . import MAX_INTEGER, page_limit
from ..auth import check_record_read, require
from ..invoke.cancel import cancel
from ..invoke.running_output import with_output_so_far
from ..store.db import now
from ..state import connections, database
from ..store import invocations as store

bp = Blueprint("invocations", __name__)


@bp.get("/api/invocations")
@require()
def list_invocations():
    args = request.args
    limit = page_limit(args)
    full = args.get("full", "0") not in ("0", "false", "no", "")
    if "after" in args:
        rows, cursor = store.finished_after(database(), _number("after", 0),
                                            args.get("container"), args.get("status"), limit,
                                            full)
    else:
        since = args.get("since")
        rows, cursor = store.list_recent(database(), args.get("container"), args.get("status"),
                                         limit, now() - since_seconds(since) if since else None,
                                         full)
    return jsonify({"invocations": rows, "cursor": cursor})


def _number(name: str, default: int) -> int:
    try:
        number = int(request.args.get(name, default))
    except ValueError:
        raise BadRequest(f"{name} must be a whole number") from None
    if not -MAX_INTEGER <= number <= MAX_INTEGER:
        raise BadRequest(f"{name} is out of range")
    return number


def since_seconds(text: str) -> float:
    """`?since=` as a duration back from now: 90, 90s, 10m, 2h, 7d."""
    try:
        return parse_duration(text)
    except ValueError:
        raise BadRequest("since must be a duration such as 90s, 10m, 2h or 7d") from None


@bp.get("/api/invocations/<invocation_id>")
def get_invocation(invocation_id: str):
    check_record_read(invocation_id)
    db = database()
    # A running call's output so far comes from the worker that has it.
    return jsonify(with_output_so_far(db, connections(), store.get(db, invocation_id)))


@bp.post("/api/invocations/<invocation_id>/cancel")
@require()
def cancel_invocation(invocation_id: str):
    return jsonify(cancel(database(), connections(), invocation_id))

"""A container's traffic split: `GET/POST /api/containers/<name>/traffic`."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from ...errors import BadRequest
from ..auth import require
from ..state import database
from ..store import traffic as store
from .containers import poke_workers

bp = Blueprint("traffic", __name__)


@bp.get("/api/containers/<name>/traffic")
@require()
def show(name: str):
    """The serving version and each version's share of the calls that name no version."""
    return jsonify(store.describe(database(), name))


@bp.post("/api/containers/<name>/traffic")
@require()
def split(name: str):
    """`{"weights": {"v2": 0.1}}`: v2 takes a tenth of the container's unpinned calls, the
    serving version the rest; `{"weights": {}}` ends the split."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or set(body) != {"weights"}:
        raise BadRequest('send {"weights": {"<version>": <share 0..1>, ...}}, e.g. '
                         '{"weights": {"v2": 0.1}}; {"weights": {}} ends the split')
    db = database()
    answer = store.set_split(db, name, body["weights"])
    poke_workers(db)    # they start the split's versions at once
    return jsonify(answer)

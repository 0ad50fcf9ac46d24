"""`POST /invoke/<container>[@<version or alias>]/<function>` with `Prefer: respond-async` or
`?async=1`: the call is recorded as queued before the 202, and the dispatcher runs it.
Synchronous calls never reach Flask: app/invoke/sync.py serves them in front of it."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ...common.protocol import Status
from ...errors import NotFound
from ..auth import check_invoke, record_location
from ..invoke.execute import route
from ..invoke.qualifiers import resolve
from ..state import database
from ..store import invocations as store
from ..invoke.sync import read_event, wants_async

bp = Blueprint("invoke", __name__)


@bp.post("/invoke/<target>/<function>")
def invoke(target: str, function: str):
    if not wants_async(request.environ):
        # Only reachable without the synchronous route in front (it takes every sync call).
        raise NotFound("synchronous calls are served in front of this app")
    check_invoke()
    container, _, version = target.partition("@")
    event, event_text = read_event(request.environ, current_app.config["MAX_EVENT_BYTES"])
    db = database()
    invocation_id = store.new_id()
    # A version, else an alias: its version is drawn now, and the record names it.
    version = resolve(db, container, version or None)
    route(db, container, version)[0].manifest.resolve_function(function)
    store.enqueue(db, invocation_id, container, version, function, "async", event_text)
    response = jsonify({"invocation_id": invocation_id, "status": Status.QUEUED})
    response.status_code = 202
    response.headers["Location"] = record_location(invocation_id)
    response.headers["X-Dockyard-Invocation-Id"] = invocation_id
    return response

"""`POST /invoke/<container>[@<version>]/<function>`: synchronous calls, or queued ones with
`Prefer: respond-async` / `?async=1`."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, jsonify, request

from ...errors import BadRequest, DockyardError, TooLarge
from ..auth import check_invoke
from ..db import now
from ..errors import error_response
from ..invoke import execute, http_status, route
from ..state import connections, database, records
from ..store import invocations as store

bp = Blueprint("invoke", __name__)


def _split_target(target: str) -> tuple[str, str | None]:
    container, _, version = target.partition("@")
    return container, (version or None)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"event is larger than {limit // (1 << 20)} MB; pass a reference "
                    "(a URL or a path) instead of the data")


def _read_event() -> tuple[object, str | None]:
    # The hot path: read the WSGI input directly rather than through request.stream and
    # request.headers, which build objects this view never needs.
    limit = current_app.config["MAX_EVENT_BYTES"]
    environ = request.environ
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if length == 0:
        return None, None
    # Without a length (chunked), werkzeug's stream knows whether the server ends the input.
    stream = environ["wsgi.input"] if length is not None else request.stream
    raw = stream.read(length if length is not None else limit + 1)
    if len(raw) > limit:
        raise _too_large(limit)
    if not raw or raw.isspace():
        return None, None
    try:
        text = raw.decode("utf-8")
        return json.loads(text), text
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _wants_async() -> bool:
    environ = request.environ
    if "respond-async" in environ.get("HTTP_PREFER", ""):
        return True
    return "async" in environ.get("QUERY_STRING", "") and \
        request.args.get("async") in ("1", "true")


@bp.post("/invoke/<target>/<function>")
def invoke(target: str, function: str):
    check_invoke()
    container, version = _split_target(target)
    event, event_text = _read_event()
    db = database()
    invocation_id = store.new_id()
    if _wants_async():
        route(db, container, version)[0].manifest.resolve_function(function)
        store.enqueue(db, invocation_id, container, version, function, "async", event_text)
        response = jsonify({"invocation_id": invocation_id, "status": "queued"})
        response.status_code = 202
        response.headers["Location"] = f"/api/invocations/{invocation_id}"
        response.headers["X-Dockyard-Invocation-Id"] = invocation_id
        return response
    started = now()
    try:
        result = execute(db, connections(), invocation_id, container, version, function, event,
                         "http")
    except DockyardError as exc:
        return error_response(exc, invocation_id)
    finished = now()
    ok = result["status"] == "succeeded"
    output = json.dumps(result.get("result")) if ok else None
    record = {
        "id": invocation_id, "container": container, "version": result.get("version"),
        "function": function, "trigger": "http", "status": result["status"],
        "input": event_text, "output": output, "error": result.get("error"),
        "stdout": result.get("stdout"), "stderr": result.get("stderr"),
        "worker_id": result.get("worker_id"), "created_at": started, "started_at": started,
        "finished_at": finished, "duration_ms": result.get("duration_ms"),
        "max_rss_kb": result.get("max_rss_kb"), "cold": result.get("cold")}
    headers = {"X-Dockyard-Invocation-Id": invocation_id,
               "X-Dockyard-Version": result.get("version") or ""}
    if result.get("duration_ms") is not None:
        headers["X-Dockyard-Duration-Ms"] = f"{result['duration_ms']:.3f}"
    if ok:
        response = Response(output, status=200, headers=headers, mimetype="application/json")
    else:
        response = jsonify({"error": result.get("error") or {"type": result["status"]},
                            "invocation_id": invocation_id})
        response.status_code = http_status(result)
        response.headers.extend(headers)
        if response.status_code == 503:
            response.headers["Retry-After"] = "1"
    records().put(record)
    return response

"""One JSON error shape for every failure: {"error": {"type", "message", …}}."""

from __future__ import annotations

import logging

from flask import jsonify
from werkzeug.exceptions import HTTPException

from ..errors import DockyardError, Unavailable

log = logging.getLogger("dockyard.api")


def error_body(exc: DockyardError) -> dict:
    """The one JSON error shape (an error raised before anything ran names no invocation)."""
    return {"error": exc.to_dict()}


def error_response(exc: DockyardError):
    response = jsonify(error_body(exc))
    response.status_code = exc.status
    if isinstance(exc, Unavailable):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def init_app(app) -> None:
    @app.errorhandler(DockyardError)
    def handle_dockyard_error(exc: DockyardError):
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def handle_http_error(exc: HTTPException):
        name = "".join(exc.name.split()) if exc.name else "HTTPError"
        message = exc.description or exc.name
        if exc.code == 413:
            message = "request body too large"
        response = jsonify({"error": {"type": name, "message": message}})
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception):
        log.exception("unhandled error")
        response = jsonify({"error": {"type": "InternalError",
                                      "message": f"internal error: {type(exc).__name__}: {exc}"}})
        response.status_code = 500
        return response

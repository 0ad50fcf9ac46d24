"""`POST /invoke/<container>[@<version or alias>]/<function>`, synchronous: the hot path,
served as a plain WSGI route in front of the Flask app. A profile of a web process under load
put half of its Python time in Flask's request and response machinery (request context, URL
matching, sessions, response objects) around a view that needs none of it; this route reads
the WSGI environ and writes the answer itself, with the same contract: the same errors,
headers and records. Everything else (async calls included) goes on to Flask.

The web processes are shared by every container, so the route bounds what one container can
take of them: the result of a call goes out as the bytes the function process encoded
(never parsed here: a 15 MB result parsed is hundreds of MB), and one container's calls never
hold the last threads of a process (WebThreads)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from http import HTTPStatus

from ...common.protocol import Status
from ...common.frames import dumps, loads_strict, result_bytes
from ...errors import BadRequest, DockyardError, NotFound, TooLarge, Unavailable
from ..auth import INVOKE_KINDS, check_header, is_local
from ..errors import error_body
from ..store.db import get_db, now
from . import qualifiers
from .execute import execute, http_status
from .lambda_api import PREFIX as LAMBDA_PREFIX, LambdaApi
from ..store import invocations as store

log = logging.getLogger("dockyard.invoke")

PREFIX = "/invoke/"
JSON = ("Content-Type", "application/json")
# What a call refused for its container's share of the threads is told to wait.
BUSY_RETRY_AFTER_S = 1


class TooManyRequests(Unavailable):
    """The container holds its share of this web process's threads: nothing ran; retry
    after `retry_after` seconds."""

    status = 429
    type = "TooManyRequests"


class WebThreads:
    """How many of this web process's threads each container holds in synchronous calls (a
    call holds its thread until it is answered, relayed calls waiting for a busy instance
    included). Any container may take a thread while more than `reserve` are free; the last
    `reserve` are kept for the other containers: one with no call in flight takes one of
    them, never the very last (which answers 429s, health checks and the API at once). So a
    container flooded with slow calls cannot make another container's call wait for a thread:
    past its share, its calls get a 429 at once. `reserve` 0: no bound."""

    def __init__(self, threads: int, reserve: int):
        self.threads = max(1, threads)
        self.reserve = max(0, min(reserve, self.threads - 1))
        self.held: dict[str, int] = {}
        self.total = 0
        self.lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # A forked web process starts with its own threads, none of them in a call.
        self.held, self.total, self.lock = {}, 0, threading.Lock()

    def take(self, container: str) -> None:
        """A thread for a call to `container`, or TooManyRequests."""
        with self.lock:
            mine = self.held.get(container, 0)
            if self.total < self.threads - self.reserve or \
                    (not mine and self.total < self.threads - 1):
                self.held[container] = mine + 1
                self.total += 1
                return
        raise TooManyRequests(
            f"too many calls to '{container}' at once: it holds {mine} of this web process's "
            f"{self.threads} threads, and the last {self.reserve} are kept for other "
            f"containers; retry after {BUSY_RETRY_AFTER_S}s", retry_after=BUSY_RETRY_AFTER_S)

    def give_back(self, container: str) -> None:
        with self.lock:
            left = self.held.get(container, 0) - 1
            if left > 0:
                self.held[container] = left
            else:
                self.held.pop(container, None)
            self.total -= 1


class SyncInvoke:
    def __init__(self, app):
        self.flask_wsgi = app.wsgi_app
        ext = app.extensions["dockyard"]
        self.db_target = ext["data"].db_target
        self.data_root = ext["data"].root
        self.connections = ext["connections"]
        self.direct = ext["direct"]
        self.records = ext["records"]
        self.tokens = ext["tokens"]
        self.invoke_auth = bool(app.config["INVOKE_AUTH"])
        self.max_event = int(app.config["MAX_EVENT_BYTES"])
        self.threads = WebThreads(int(app.config["WEB_THREADS"]), int(app.config["WEB_RESERVE"]))
        self.lambda_api = LambdaApi(self)   # the Lambda-compatible routes (lambda_api.py)

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if (environ.get("REQUEST_METHOD") != "POST" or not path.startswith(PREFIX)
                or wants_async(environ)):
            if path.startswith(LAMBDA_PREFIX):
                return self.lambda_api(environ, start_response)
            return self.flask_wsgi(environ, start_response)
        target, slash, function = path[len(PREFIX):].partition("/")
        if not slash or not target or not function or "/" in function:
            return self.flask_wsgi(environ, start_response)  # Flask's 404 for a bad path
        # WSGI hands the path over as latin-1; names are UTF-8.
        target = target.encode("latin-1").decode("utf-8", "replace")
        function = function.encode("latin-1").decode("utf-8", "replace")
        invocation_id = None
        try:
            self._check_token(environ)
            container, _, version = target.partition("@")
            self.threads.take(container)
            try:
                event, event_text = read_event(environ, self.max_event)
                invocation_id = store.new_id()
                status, headers, body = self._call(invocation_id, container, version or None,
                                                   function, event, event_text)
            finally:
                self.threads.give_back(container)
        # An error raised here ran nothing and left no record (a bad token or event, an
        # unknown container or function, no worker to take the call, its container holding
        # its share of the threads), so its answer names no invocation id: only an answer
        # built from a worker's reply, recorded, carries one.
        except DockyardError as exc:
            status, headers, body = error_answer(exc)
        except Exception as exc:  # noqa: BLE001 - one JSON error shape, whatever happened
            log.exception("%s unhandled error", invocation_id or "invoke")
            status, headers, body = error_answer(DockyardError(
                f"internal error: {type(exc).__name__}: {exc}"))
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    def _check_token(self, environ) -> None:
        if self.invoke_auth:
            check_header(environ.get("HTTP_AUTHORIZATION", ""), self.tokens, INVOKE_KINDS,
                         self.data_root if is_local(environ.get("REMOTE_ADDR")) else None)

    def _call(self, invocation_id, container, version, function, event, event_text):
        started = now()
        begun = False

        def on_start(target, worker):
            nonlocal begun
            begun = True
            self.records.started({
                "id": invocation_id, "container": container, "version": target.version,
                "function": function, "trigger": "http", "input": event_text,
                "worker_id": worker["id"], "created_at": started, "started_at": started},
                web_owner(), started + target.manifest.limits.timeout_s + START_LEASE_MARGIN_S)
        db = get_db(self.db_target)
        # After `@`: a version, else an alias (qualifiers.py); a known alias draws its version
        # here, and any other name goes to execute() as a version first.
        asked = version
        if version is not None:
            version = qualifiers.for_call(db, container, version)
        try:
            try:
                result = execute(db, self.connections, invocation_id, container, version,
                                 function, event, "http", direct=self.direct,
                                 on_start=on_start)
            except NotFound as missing:
                if begun or asked is None or version != asked:
                    raise
                version = qualifiers.after_miss(db, container, asked, missing)
                result = execute(db, self.connections, invocation_id, container, version,
                                 function, event, "http", direct=self.direct,
                                 on_start=on_start)
        except BaseException:
            if begun:   # it ran nothing after all (an error here means that): no record
                self.records.forget(invocation_id)
            raise
        finished = now()
        output, text = answer(result)
        ok = output is not None
        self.records.finished({
            "id": invocation_id, "container": container, "version": result.get("version"),
            "function": function, "trigger": "http", "status": result["status"],
            "input": event_text, "output": text,
            "error": result.get("error"),
            "stdout": result.get("stdout"), "stderr": result.get("stderr"),
            "worker_id": result.get("worker_id"), "created_at": started,
            "started_at": started, "finished_at": finished,
            "duration_ms": result.get("duration_ms"), "max_rss_kb": result.get("max_rss_kb"),
            "cold": result.get("cold")})
        headers = [JSON, ("X-Dockyard-Invocation-Id", invocation_id),
                   ("X-Dockyard-Version", result.get("version") or "")]
        if result.get("duration_ms") is not None:
            headers.append(("X-Dockyard-Duration-Ms", f"{result['duration_ms']:.3f}"))
        if ok:
            return "200 OK", headers, output
        code = http_status(result)
        if code in (429, 503):
            headers.append(("Retry-After", "1"))
        body = dumps({"error": result.get("error") or {"type": result["status"]},
                      "invocation_id": invocation_id})
        return status_line(code), headers, body


# How long past its timeout a call's `running` record is kept before it counts as left behind
# by a web process that is gone (store.invocations.abandoned_web_calls).
START_LEASE_MARGIN_S = 120.0
_owner: tuple[int, str] = (0, "")


def web_owner() -> str:
    """This web process, as the owner of the records of the calls it serves."""
    global _owner
    pid = os.getpid()
    if _owner[0] != pid:
        _owner = (pid, f"{store.WEB_OWNER}{socket.gethostname()}:{pid}")
    return _owner[1]


def answer(result: dict) -> tuple[bytes | None, str | None]:
    """A successful call's answer, the result as the function process encoded it (checked in
    the process to be strict JSON within the reply cap, and passed on as is), and its text for
    the record; (None, None) for a call that did not succeed. A result that is not UTF-8 (only
    a process that broke its bootstrap sends one) fails the call here."""
    if result["status"] != Status.SUCCEEDED:
        return None, None
    output = result_bytes(result.get("result"))
    try:
        return output, output.decode("utf-8")
    except UnicodeDecodeError:
        result["status"] = Status.FAILED
        result["error"] = {"type": "ResultNotSerializable",
                           "message": "the function's reply carries a result that is not "
                                      "UTF-8 JSON text"}
        return None, None


def read_event(environ, limit: int) -> tuple[object, str | None]:
    """The JSON event of a call, straight from the WSGI input (None for an empty body), and
    its text for the record."""
    length = environ.get("CONTENT_LENGTH")
    length = int(length) if length else None
    if length is not None and length > limit:
        raise too_large(limit)
    if length == 0:
        return None, None
    # Without a length the server ends the input (gunicorn reads a chunked body to its end).
    raw = environ["wsgi.input"].read(length if length is not None else limit + 1)
    if len(raw) > limit:
        raise too_large(limit)
    if not raw or raw.isspace():
        return None, None
    try:
        text = raw.decode("utf-8")
        return loads_strict(raw), text
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def wants_async(environ) -> bool:
    if "respond-async" in environ.get("HTTP_PREFER", ""):
        return True
    query = environ.get("QUERY_STRING", "")
    return "async" in query and any(
        part in ("async=1", "async=true") for part in query.split("&"))


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"event is larger than {limit // (1 << 20)} MB; pass a reference "
                    "(a URL or a path) instead of the data")


def error_answer(exc: DockyardError):
    body = error_body(exc)
    headers = [JSON]
    if isinstance(exc, Unavailable):
        headers.append(("Retry-After", str(exc.retry_after)))
    return status_line(exc.status), headers, dumps(body)


def status_line(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Error"

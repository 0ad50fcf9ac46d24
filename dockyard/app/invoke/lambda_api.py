"""The Lambda-compatible API on dockyard's own port, for boto3 and the AWS CLI unchanged:
`POST /2015-03-31/functions/{FunctionName}/invocations` (Invoke), and the reads of
lambda_catalog.py (ListFunctions, GetFunction, GetFunctionConfiguration) and the aliases
of lambda_aliases.py.

Served in front of Flask by the synchronous route's WSGI wrapper (SyncInvoke hands every path
under PREFIX here), and a synchronous Invoke is that route's own call: the same thread bound
(WebThreads), the same gates (a declared function), the same records (trigger `lambda`); an
Event call is queued through the durable async path as `/invoke`'s are. What differs is only
the shape: names (CONTAINER.FUNCTION, an ARN, NAME:QUALIFIER; a qualifier is a version,
an alias or $LATEST), headers and errors as botocore reads them (see lambda_errors.py), and
SigV4 signatures checked with a token as the secret (see sigv4.py)."""

from __future__ import annotations

import base64
import copy
import logging
import math
import re
from urllib.parse import parse_qs

from ...common.frames import dumps, loads_strict
from ...errors import DockyardError
from ..auth import INVOKE_KINDS, invocation_key, with_article
from ..store import invocations as store
from ..store.db import get_db
from . import lambda_aliases, lambda_catalog
from .qualifiers import resolve
from .execute import route
from .lambda_catalog import only_function
from .lambda_errors import LambdaError, answer_error, from_dockyard
from .sigv4 import SignatureError, verify

log = logging.getLogger("dockyard.lambda")

PREFIX = "/2015-03-31/functions"
SERVICE = "lambda"
TRIGGER = "lambda"
LATEST = "$LATEST"
JSON = ("Content-Type", "application/json")
TAIL_BYTES = 4096
_ARN_RE = re.compile(r"arn:[^:]+:lambda:[^:]*:[^:]*:function:(?P<name>[^:]+)(?::(?P<q>[^:]+))?")
_NAME_RE = re.compile(r"(?P<name>[^:]+)(?::(?P<q>[^:]+))?")
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
READ_KINDS = INVOKE_KINDS   # the tokens that may list and describe functions


def parse_name(name: str, qualifier: str | None) -> tuple[str, str | None, str | None]:
    """(container, function or None, qualifier or None) of a FunctionName: CONTAINER.FUNCTION
    or CONTAINER, bare, as NAME:QUALIFIER or inside an ARN; `qualifier` is the Qualifier
    parameter, which must agree with one in the name."""
    match = _ARN_RE.fullmatch(name) or _NAME_RE.fullmatch(name)
    if not match:
        raise LambdaError(400, "InvalidParameterValueException",
                          f"'{name[:140]}' is not a function name: use CONTAINER.FUNCTION, "
                          "CONTAINER (one function), NAME:QUALIFIER or a function ARN")
    in_name = match["q"]
    if in_name and qualifier and in_name != qualifier:
        raise LambdaError(400, "InvalidParameterValueException",
                          f"the qualifier in the function name ('{in_name[:64]}') is not the "
                          f"Qualifier parameter ('{qualifier[:64]}')")
    container, _, function = match["name"].partition(".")
    return container, function or None, in_name or qualifier or None


def version_of(qualifier: str | None) -> str | None:
    """The dockyard version a qualifier names: None (the serving one) for $LATEST."""
    return None if qualifier in (None, "", LATEST) else qualifier


class _LambdaRecords:
    """The synchronous route's record writer as this API's calls use it: the same writer,
    trigger `lambda`, and each call's finished record kept for its answer (its logs, its
    error, its report) until that answer takes it."""

    def __init__(self, writer):
        self.writer = writer
        self.kept: dict[str, dict] = {}

    def started(self, record: dict, *args) -> None:
        record["trigger"] = TRIGGER
        self.writer.started(record, *args)

    def finished(self, record: dict) -> None:
        record["trigger"] = TRIGGER
        self.kept[record["id"]] = record
        self.writer.finished(record)

    def take(self, invocation_id: str) -> dict | None:
        return self.kept.pop(invocation_id, None)

    def __getattr__(self, name):
        return getattr(self.writer, name)


class LambdaApi:
    def __init__(self, sync):
        self.sync = sync
        self._calls = None

    @property
    def calls(self):
        """The synchronous route with this API's records (made on first use, once the route
        is complete)."""
        if self._calls is None:
            calls = copy.copy(self.sync)
            calls.records = _LambdaRecords(self.sync.records)
            self._calls = calls
        return self._calls

    def __call__(self, environ, start_response):
        try:
            status, headers, body = self._route(environ)
        except LambdaError as exc:
            status, headers, body = answer_error(exc)
        except DockyardError as exc:
            status, headers, body = answer_error(from_dockyard(exc))
        except Exception as exc:  # noqa: BLE001 - botocore's shape, whatever happened
            log.exception("lambda api: unhandled error")
            status, headers, body = answer_error(LambdaError(
                500, "ServiceException", f"internal error: {type(exc).__name__}: {exc}"))
        if not any(h[0] == "x-amzn-RequestId" for h in headers):
            headers.append(("x-amzn-RequestId", store.new_id()))
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    # -- routing ---------------------------------------------------------------------------

    def _route(self, environ):
        method = environ.get("REQUEST_METHOD", "GET")
        # WSGI hands the path over as latin-1; names are UTF-8.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        parts = [p for p in path[len(PREFIX):].split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if method == "POST" and len(parts) == 2 and parts[1] == "invocations":
            return self.invoke(environ, parts[0], query.get("Qualifier"))
        if method == "GET" and not parts:
            self._authorize(environ, self._body(environ), required=True, kinds=READ_KINDS)
            return lambda_catalog.list_functions(self._db(), query)
        if len(parts) in (2, 3) and parts[1] == "aliases":
            return self.aliases(environ, method, parts, query)
        if method == "GET" and len(parts) in (1, 2) and parts[1:] in ([], ["configuration"]):
            self._authorize(environ, self._body(environ), required=True, kinds=READ_KINDS)
            container, function, qualifier = parse_name(parts[0], query.get("Qualifier"))
            db = self._db()
            return lambda_catalog.get_function(db, container, function,
                                               resolve(db, container, version_of(qualifier),
                                                       draw=False),
                                               configuration_only=len(parts) == 2)
        raise LambdaError(404, "UnknownOperationException",
                          f"dockyard does not serve {method} {path[:200]} of the Lambda API "
                          "(see 'Lambda-compatible API' in the README)")

    def aliases(self, environ, method: str, parts: list[str], query: dict):
        """CreateAlias, ListAliases, GetAlias, UpdateAlias, DeleteAlias: reading takes the
        invoke or the admin token's signature, changing the admin token's."""
        body = self._body(environ)
        writes = method in ("POST", "PUT", "DELETE")
        self._authorize(environ, body, required=True, kinds={"admin"} if writes else READ_KINDS)
        container, function, _ = parse_name(parts[0], None)
        shown, db = f"{container}.{function}" if function else container, self._db()
        if len(parts) == 2 and method == "POST":
            return lambda_aliases.create(db, container, shown, body)
        if len(parts) == 2 and method == "GET":
            return lambda_aliases.list_aliases(db, container, shown, query)
        if len(parts) == 3 and method == "GET":
            return lambda_aliases.get(db, container, shown, parts[2])
        if len(parts) == 3 and method == "PUT":
            return lambda_aliases.update(db, container, shown, parts[2], body)
        if len(parts) == 3 and method == "DELETE":
            return lambda_aliases.delete(db, container, parts[2])
        raise LambdaError(405, "UnknownOperationException",
                          f"{method} is not an operation on aliases")

    def _db(self):
        return get_db(self.sync.db_target)

    def _body(self, environ) -> bytes:
        limit = self.sync.max_event
        length = environ.get("CONTENT_LENGTH")
        try:
            length = int(length) if length else None
        except ValueError:
            raise LambdaError(400, "InvalidRequestContentException",
                              "Content-Length is not a number") from None
        if length is not None and length > limit:
            raise too_large(limit)
        if length == 0:
            return b""
        raw = environ["wsgi.input"].read(length if length is not None else limit + 1)
        if len(raw) > limit:
            raise too_large(limit)
        return raw

    def _authorize(self, environ, body: bytes, required: bool, kinds: set[str]) -> None:
        """With `required`, the request must be signed with SigV4 by a token of one of
        `kinds`: its kind as the access key id, the token as the secret key."""
        if not required:
            return
        try:
            kind = verify(environ, body, self.sync.tokens, SERVICE)
        except SignatureError as exc:
            raise LambdaError(exc.status, exc.code, exc.message) from None
        if kind not in kinds:
            allowed = " or the ".join(sorted(kinds, key=lambda k: k != "invoke"))
            raise LambdaError(403, "AccessDeniedException",
                              f"{with_article(kind)} token cannot use this route: sign with "
                              f"the {allowed} token")

    # -- Invoke ------------------------------------------------------------------------------

    def invoke(self, environ, name: str, qualifier: str | None):
        kind = environ.get("HTTP_X_AMZ_INVOCATION_TYPE") or "RequestResponse"
        if kind not in INVOCATION_TYPES:
            raise LambdaError(400, "InvalidParameterValueException",
                              f"X-Amz-Invocation-Type '{kind[:40]}' is none of "
                              f"{', '.join(INVOCATION_TYPES)}")
        body = self._body(environ)
        self._authorize(environ, body, required=self.sync.invoke_auth or False,
                        kinds=INVOKE_KINDS)
        container, function, qualifier = parse_name(name, qualifier)
        # A version, else an alias (qualifiers.py): a synchronous call's route resolves it.
        version = version_of(qualifier)
        if function is None or kind != "RequestResponse":
            # The gates a synchronous call passes in execute(), passed here first.
            version = resolve(self._db(), container, version)
            target = route(self._db(), container, version)[0]
            function = function or only_function(target.manifest.functions, container)
            target.manifest.resolve_function(function)
        event, text = parse_payload(body)
        if kind == "DryRun":
            return "204 No Content", [], b""
        invocation_id = store.new_id()
        if kind == "Event":
            store.enqueue(self._db(), invocation_id, container, version, function, TRIGGER,
                          text)
            key = invocation_key(self.sync.tokens, invocation_id)
            return "202 Accepted", [
                JSON, ("x-amzn-RequestId", invocation_id),
                ("X-Dockyard-Invocation-Id", invocation_id),
                ("Location", f"/api/invocations/{invocation_id}?key={key}")], b""
        return self._call(environ, invocation_id, container, version, function, event, text)

    def _call(self, environ, invocation_id, container, version, function, event, text):
        calls = self.calls
        self.sync.threads.take(container)
        try:
            status, _, output = calls._call(invocation_id, container, version, function,
                                            event, text)
        finally:
            self.sync.threads.give_back(container)
            record = calls.records.take(invocation_id) or {}
        code = int(status[:3])
        headers = [JSON, ("x-amzn-RequestId", invocation_id),
                   ("X-Dockyard-Invocation-Id", invocation_id),
                   ("X-Amz-Executed-Version", record.get("version") or "")]
        error = record.get("error") or {}
        if code not in (200, 500, 502, 504, 409) or error.get("type") == "FunctionNotFound":
            # Not the function's failure: nothing ran, or nothing could (busy, not ready).
            raise from_dockyard(DockyardError(error.get("message") or status),
                                status=code, type=error.get("type"))
        if code != 200:
            headers.append(("X-Amz-Function-Error", "Unhandled"))
            output = dumps(function_error(record))
        if environ.get("HTTP_X_AMZ_LOG_TYPE") == "Tail":
            headers.append(("X-Amz-Log-Result", log_tail(self._db(), record, container,
                                                        invocation_id)))
        return "200 OK", headers, output


def parse_payload(body: bytes) -> tuple[object, str | None]:
    if not body or body.isspace():
        return None, None
    try:
        return loads_strict(body), body.decode("utf-8")
    except (UnicodeDecodeError, ValueError):
        raise LambdaError(400, "InvalidRequestContentException",
                          "Could not parse request body into json: the payload must be JSON "
                          "text") from None


def too_large(limit: int) -> LambdaError:
    return LambdaError(413, "RequestTooLargeException",
                       f"Request must be smaller than {limit} bytes for the InvokeFunction "
                       "operation; pass a reference (a URL or a path) instead of the data")


# Lambda's errorType for a call dockyard stopped, by the record's status.
_ERROR_TYPES = {"timed_out": "Sandbox.Timedout", "crashed": "Runtime.ExitError",
                "cancelled": "Cancelled"}


def function_error(record: dict) -> dict:
    """The body of a call that failed in the function, as Lambda's runtimes write it."""
    error = record.get("error") or {}
    kind = _ERROR_TYPES.get(record.get("status"), error.get("type") or "Error")
    if error.get("type") == "OutOfMemory":
        kind = "Runtime.OutOfMemory"
    trace = error.get("traceback") or ""
    return {"errorMessage": error.get("message") or record.get("status") or "failed",
            "errorType": kind,
            "stackTrace": [line for line in trace.splitlines() if line.strip()]}


def log_tail(db, record: dict, container: str, invocation_id: str) -> str:
    """X-Amz-Log-Result: base64 of the last 4 KB of the call's log as Lambda writes it (its
    stdout and stderr between START and END, then the REPORT line)."""
    version = record.get("version") or ""
    memory = ""
    try:
        memory = f"\tMemory Size: {route(db, container, version)[0].manifest.limits.memory_mb} MB"
    except DockyardError:
        pass   # the version is gone by now: the report says less
    duration = float(record.get("duration_ms") or 0.0)
    rss = record.get("max_rss_kb")
    report = (f"REPORT RequestId: {invocation_id}\tDuration: {duration:.2f} ms\t"
              f"Billed Duration: {math.ceil(duration)} ms{memory}")
    if rss is not None:
        report += f"\tMax Memory Used: {math.ceil(int(rss) / 1024)} MB"
    if record.get("cold"):
        report += "\tCold Start: true"
    text = (f"START RequestId: {invocation_id} Version: {version}\n"
            f"{record.get('stdout') or ''}{record.get('stderr') or ''}"
            f"END RequestId: {invocation_id}\n{report}\n")
    return base64.b64encode(text.encode("utf-8", "replace")[-TAIL_BYTES:]).decode("ascii")

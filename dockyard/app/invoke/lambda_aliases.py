"""Aliases through the Lambda-compatible API: CreateAlias, ListAliases, GetAlias,
UpdateAlias and DeleteAlias under `/2015-03-31/functions/{FunctionName}/aliases`. An alias
belongs to the container (`FunctionName` may name the container or any of its functions) and
is a qualifier wherever a version is (see store/aliases.py for how a call picks its
version)."""

from __future__ import annotations

import json

from ...common.frames import dumps
from ...errors import BadRequest
from ..store import aliases as store
from .lambda_catalog import function_arn
from .lambda_errors import LambdaError

JSON = ("Content-Type", "application/json")
MAX_ITEMS = 50


def configuration(row: dict, function_name: str) -> dict:
    routing = {}
    if row["extra_version"]:
        routing = {"AdditionalVersionWeights": {row["extra_version"]: row["extra_weight"]}}
    answer = {"AliasArn": function_arn(function_name, row["name"]), "Name": row["name"],
              "FunctionVersion": row["function_version"], "Description": row["description"],
              "RevisionId": row["revision"]}
    if routing:
        answer["RoutingConfig"] = routing
    return answer


def _body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise LambdaError(400, "InvalidRequestContentException",
                          "the request body must be a JSON object")
    return body


def _invalid(message: str) -> LambdaError:
    return LambdaError(400, "InvalidParameterValueException", message)


def _name(name) -> str:
    return _parameter_errors(lambda: store.check_name(name))


def _extra(body: dict) -> dict | None:
    """RoutingConfig.AdditionalVersionWeights: {} or one {version: weight 0.0-1.0}."""
    routing = body.get("RoutingConfig")
    if routing is None:
        return None
    weights = routing.get("AdditionalVersionWeights") if isinstance(routing, dict) else None
    if weights is None:
        return {}
    return _parameter_errors(lambda: store.check_extra(
        weights, "RoutingConfig.AdditionalVersionWeights"))


def _version(body: dict, required: bool) -> str | None:
    version = body.get("FunctionVersion")
    if version is None and not required:
        return None
    if not isinstance(version, str) or not version:
        raise _invalid("FunctionVersion must name a version of the container or $LATEST")
    return version


def _parameter_errors(call):
    try:
        return call()
    except BadRequest as exc:
        raise _invalid(exc.message) from None


def create(db, container: str, function_name: str, raw: bytes):
    body = _body(raw)
    name = _name(body.get("Name"))
    version = _version(body, required=True)
    extra = _extra(body) or None
    row = _parameter_errors(lambda: store.create(db, container, name, version, extra,
                                                 str(body.get("Description") or "")))
    return "201 Created", [JSON], dumps(configuration(row, function_name))


def list_aliases(db, container: str, function_name: str, query: dict):
    rows = store.list_for(db, container)
    if query.get("FunctionVersion"):
        rows = [r for r in rows if query["FunctionVersion"] in (r["function_version"],
                                                                 r["extra_version"])]
    try:
        start = int(query.get("Marker") or 0)
        count = max(1, min(int(query.get("MaxItems") or MAX_ITEMS), 10_000))
    except ValueError:
        raise _invalid("Marker and MaxItems must be numbers") from None
    page = {"Aliases": [configuration(r, function_name) for r in rows[start:start + count]]}
    if start + count < len(rows):
        page["NextMarker"] = str(start + count)
    return "200 OK", [JSON], dumps(page)


def get(db, container: str, function_name: str, name: str):
    row = store.get(db, container, name)
    if row is None:
        raise LambdaError(404, "ResourceNotFoundException",
                          f"Alias not found: {function_arn(function_name, name)}")
    return "200 OK", [JSON], dumps(configuration(row, function_name))


def update(db, container: str, function_name: str, name: str, raw: bytes):
    body = _body(raw)
    changes = {}
    version = _version(body, required=False)
    if version is not None:
        changes["function_version"] = version
    extra = _extra(body)
    if extra is not None:
        changes["extra"] = extra
    if body.get("Description") is not None:
        changes["description"] = str(body["Description"])
    row = _parameter_errors(lambda: store.update(db, container, name, changes,
                                                 body.get("RevisionId")))
    return "200 OK", [JSON], dumps(configuration(row, function_name))


def delete(db, container: str, name: str):
    store.delete(db, container, name)
    return "204 No Content", [], b""

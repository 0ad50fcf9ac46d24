"""GET /openapi.json describes the whole HTTP API: every route of the app and of the
Lambda-compatible API, with every method, and every status the code of each route can answer
(found by walking the code, not from a list); the document is valid OpenAPI 3.1; and
schemathesis, run over it against a real `dockyard serve` with containers, jobs, a worker and
aliases to aim at, gets no 5xx and only answers the document describes."""

from __future__ import annotations

import ast
import builtins
import inspect
import os
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode

from conftest import ROOT, Server, zip_folder
from dockyard.app import create_app
from dockyard.app.api.openapi import document

# -- the document covers every route, method and status -------------------------------------

DOC = document()
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
OPERATIONS = {(method.upper(), path): op for path, item in DOC["paths"].items()
              for method, op in item.items() if method in HTTP_METHODS}
LAMBDA = "/2015-03-31/functions"


def spec_path(rule: str) -> str:
    """`/api/jobs/<name>` (or `<path:name>`) as OpenAPI writes it: `/api/jobs/{name}`."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


def matching_operation(method: str, path: str) -> tuple[str, str] | None:
    """The document's (method, template) that a concrete request path falls under."""
    for key in OPERATIONS:
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(key[1]))
        if key[0] == method and re.fullmatch(pattern, path):
            return key
    return None


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app({"DATA_DIR": str(tmp_path_factory.mktemp("openapi-app"))})


def app_routes(app) -> dict[tuple[str, str], str]:
    """(method, template) -> endpoint of every route of the Flask app but the dashboard's
    (/ui/, out of the document's scope: HTML for people, signed in with a cookie) and static
    files."""
    return {(method, spec_path(rule.rule)): rule.endpoint for rule in app.url_map.iter_rules()
            if rule.endpoint != "static" and not rule.rule.startswith("/ui/")
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def lambda_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every request shape the Lambda-compatible router (served in front of
    Flask, so not in its url_map) takes as an operation: each method on each path shape made
    of names and the literal segments its code compares path parts with; whatever is not
    answered UnknownOperationException is an operation."""
    from dockyard.app.invoke import lambda_api
    source = inspect.getsource(lambda_api)
    literals = set(re.findall(r'parts\[\d\] == "(\w+)"', source))
    literals |= set(re.findall(r'parts\[\d:\] in \(\[\], \["(\w+)"\]\)', source))
    assert literals, "no literal path segments found in lambda_api.py"
    shapes = [[], ["fn"], ["fn", "other"], ["fn", "other", "al"]]
    shapes += [["fn", lit] for lit in literals] + [["fn", lit, "al"] for lit in literals]
    found = set()
    client = app.test_client()
    admin = Credentials("admin", app.extensions["dockyard"]["tokens"]["admin"])
    for parts in shapes:
        path = "/".join([LAMBDA, *parts]) + ("/" if not parts else "")
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            # Signed with the admin token: past the signature check, the router says
            # whether the request is an operation.
            signed = AWSRequest(method=method, url="http://localhost" + path, data=b"")
            SigV4Auth(admin, "lambda", "local").add_auth(signed)
            answer = client.open(path, method=method, headers=dict(signed.headers.items()))
            if answer.headers.get("x-amzn-errortype") != "UnknownOperationException":
                found.add((method, path))
    return found


def test_the_document_is_valid_openapi_3_1():
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator
    validate(DOC, cls=OpenAPIV31SpecValidator)
    assert DOC["openapi"].startswith("3.1")
    ids = [op["operationId"] for op in OPERATIONS.values()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    assert "/ui/" in DOC["info"]["description"]   # says what it leaves out


def test_every_route_and_method_is_in_the_document(app):
    routes = app_routes(app)
    missing = sorted(set(routes) - set(OPERATIONS))
    assert not missing, f"routes missing from openapi.yaml: {missing}"
    # The operationId of a Flask route is its endpoint (what the status check looks up).
    wrong = {key: (OPERATIONS[key].get("operationId"), endpoint)
             for key, endpoint in routes.items() if OPERATIONS[key].get("operationId") != endpoint}
    assert not wrong, f"operationId is not the route's endpoint: {wrong}"
    lambda_found = lambda_routes(app)
    unmatched = sorted(r for r in lambda_found if matching_operation(*r) is None)
    assert not unmatched, f"Lambda-compatible routes missing from openapi.yaml: {unmatched}"
    # Nothing described that the server does not answer.
    served = set(routes) | {matching_operation(*r) for r in lambda_found}
    phantom = sorted(set(OPERATIONS) - served)
    assert not phantom, f"openapi.yaml describes operations no route serves: {phantom}"


def test_it_is_served_without_a_token_and_with_any(app):
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        answer = client.get("/openapi.json", headers=headers)
        assert answer.status_code == 200 and answer.mimetype == "application/json"
        assert answer.get_json() == DOC
    assert client.get("/").get_json()["links"]["openapi"] == "/openapi.json"


# What the code of a route can answer: the error classes it (or anything of dockyard's it calls,
# transitively) constructs, the statuses written in it (`return …, 201`, `status_code = 202`,
# `abort(404)`, a status line "204 No Content"), and the outcomes of a call for the invoke
# routes. Calls are resolved through each function's module, its closure and its class; a
# method called on an object of unknown class is looked up in the classes of the same module.

def _dockyard_callable(obj) -> Callable | None:
    obj = getattr(obj, "__func__", obj)
    try:
        obj = inspect.unwrap(obj)
    except ValueError:
        return None
    if inspect.isfunction(obj) and obj.__module__.startswith("dockyard."):
        return obj
    return None


def _owner_class(func):
    parts = func.__qualname__.split(".")
    owner = sys.modules[func.__module__]
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None or part == "<locals>":
            return None
    return owner if inspect.isclass(owner) else None


def _resolve(node, func, scope: dict):
    if isinstance(node, ast.Name):
        if node.id in ("self", "cls"):
            return _owner_class(func)
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, func, scope)
        try:
            return getattr(base, node.attr, None) if base is not None else None
        except RuntimeError:   # a proxy of Flask's (request, current_app) outside a request
            return None
    return None


def _same_module_methods(func, name: str) -> list:
    module = sys.modules[func.__module__]
    return [getattr(cls, name) for cls in vars(module).values()
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and name in vars(cls)]


def _int_constants(node) -> set[int]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and type(n.value) is int and 100 <= n.value <= 599}


def code_statuses(entries, follow: bool = True) -> tuple[set[int], set[int]]:
    """(statuses of dockyard's error classes constructed, statuses written out) by the
    functions in `entries` and, with `follow`, everything of dockyard's they call."""
    from dockyard.app.invoke.lambda_errors import LambdaError
    from dockyard.app.invoke.sigv4 import SignatureError
    from dockyard.errors import DockyardError
    errors, written = set(), set()
    views = {f for f in map(_dockyard_callable, entries) if f}
    todo, seen = list(views), set()
    while todo:
        func = todo.pop()
        if func in seen:
            continue
        seen.add(func)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        except (OSError, TypeError, SyntaxError):
            continue
        closure = inspect.getclosurevars(func)
        scope = {**vars(builtins), **func.__globals__, **closure.nonlocals}
        for node in ast.walk(tree):
            # A view's own answer: `return body, 201`, `response.status_code = 202`.
            if func in views and isinstance(node, ast.Return) and \
                    isinstance(node.value, ast.Tuple):
                written |= _int_constants(node.value.elts[-1])
            elif func in views and isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "status_code"
                    for t in node.targets):
                written |= _int_constants(node.value)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = re.fullmatch(r"([1-5]\d\d) [A-Z][A-Za-z -]+", node.value)
                if match:
                    written.add(int(match.group(1)))
            if not isinstance(node, ast.Call):
                continue
            target = _resolve(node.func, func, scope)
            if inspect.isclass(target) and issubclass(target, DockyardError):
                errors.add(target.status)
            elif target in (LambdaError, SignatureError) and node.args:
                written |= _int_constants(node.args[0])
            elif getattr(target, "__name__", None) == "abort" and node.args:
                written |= _int_constants(node.args[0])
            elif follow:
                candidates = [target] if target is not None else []
                if target is None and isinstance(node.func, ast.Attribute):
                    candidates = _same_module_methods(func, node.func.attr)
                for candidate in candidates:
                    if inspect.isclass(candidate):
                        candidate = vars(candidate).get("__init__")
                    found = _dockyard_callable(candidate)
                    if found:
                        todo.append(found)
        for decorator in getattr(tree.body[0], "decorator_list", []):
            call = decorator.func if isinstance(decorator, ast.Call) else decorator
            found = _dockyard_callable(_resolve(call, func, scope))
            if found and follow:
                todo.append(found)
    return errors, written


def call_outcomes() -> set[int]:
    """Every status a call's outcome maps to (execute.http_status over each status and error
    type it knows)."""
    from dockyard.app.invoke import execute
    from dockyard.common.protocol import Status
    statuses = [v for k, v in vars(Status).items() if k.isupper()]
    types = [None, *execute.ERROR_STATUS, execute.BUSY_TYPE]
    return {execute.http_status({"status": s, "error": {"type": t}})
            for s in statuses for t in types}


def lambda_handlers() -> dict[str, list]:
    """What serves each operation of the Lambda-compatible API (its router dispatches by
    hand, see LambdaApi._route)."""
    from dockyard.app.invoke import lambda_aliases, lambda_api, lambda_catalog
    from dockyard.app.invoke.lambda_api import LambdaApi, parse_name
    reads = [LambdaApi._authorize, LambdaApi._body, parse_name]
    return {"Invoke": [LambdaApi.invoke],
            "ListFunctions": [*reads, lambda_catalog.list_functions],
            "GetFunction": [*reads, lambda_api.resolve, lambda_catalog.get_function],
            "GetFunctionConfiguration": [*reads, lambda_api.resolve,
                                         lambda_catalog.get_function],
            "ListAliases": [*reads, lambda_aliases.list_aliases],
            "CreateAlias": [*reads, lambda_aliases.create],
            "GetAlias": [*reads, lambda_aliases.get],
            "UpdateAlias": [*reads, lambda_aliases.update],
            "DeleteAlias": [*reads, lambda_aliases.delete]}


def required_statuses(app, key: tuple[str, str]) -> set[int]:
    """The statuses the operation `key` must document."""
    from dockyard.app.invoke.lambda_api import LambdaApi
    from dockyard.app.invoke.lambda_errors import _BY_STATUS
    from dockyard.app.invoke.sync import SyncInvoke
    method, path = key
    op = OPERATIONS[key]
    needed = set()
    if "{" in path:
        needed.add(404)      # a path parameter names something that may not exist
    if "requestBody" in op:
        needed.add(400)      # a body that is not what the route takes
    secured = any(requirement for requirement in op.get("security", DOC["security"]))
    if path.startswith(LAMBDA):
        handlers = lambda_handlers()
        assert op["operationId"] in handlers, f"no handler known for {op['operationId']}"
        errors, written = code_statuses(handlers[op["operationId"]])
        shallow = code_statuses([LambdaApi.__call__], follow=False)[1]  # its catch-all
        if op["operationId"] == "Invoke":
            errors |= {c for c in call_outcomes() if c >= 400}
        lambda_status = {code: mapped for code, (mapped, _) in _BY_STATUS.items()}
        needed |= {lambda_status.get(code, 500) for code in errors} | written | shallow
        if secured:
            needed.add(403)
    else:
        view = app.view_functions[op["operationId"]]
        entries = [view]
        if op["operationId"] == "invoke.invoke":
            entries.append(SyncInvoke.__call__)   # synchronous calls are served in front
        errors, written = code_statuses(entries)
        needed |= errors | written
        if op["operationId"] == "invoke.invoke":
            needed |= call_outcomes()
        if secured:
            needed |= {401, 403}
    return needed


# Statuses the walk finds in code a route calls but which that route cannot reach, because
# of an argument the walk does not follow. Each one is checked to be still found (so that a
# stale entry is removed), and the reason says why the route cannot answer it.
UNREACHABLE = {
    ("POST", "/api/containers"): {
        503: "store.containers._activate raises Unavailable only with require_worker=True, "
             "which only the activate route passes (an upload is stored without a worker)"},
    ("POST", "/api/jobs"): {
        404: "store.jobs.create reads the job back with get() right after inserting it"},
    ("POST", "/api/jobs/{name}/pause"): {
        409: "store.jobs.set_enabled refuses only a resume (enabled=True) of a job with no "
             "fire time left"},
}


def test_every_status_the_code_can_answer_is_documented(app):
    missing, stale, phantom = {}, {}, {}
    for key, op in sorted(OPERATIONS.items()):
        documented = {int(code) for code in op["responses"]}
        assert any(200 <= code < 300 for code in documented), f"{key}: no success answer"
        required = required_statuses(app, key)
        unreachable = set(UNREACHABLE.get(key, {}))
        if unreachable - required:
            stale[f"{key[0]} {key[1]}"] = sorted(unreachable - required)
        lacking = required - unreachable - documented
        if lacking:
            missing[f"{key[0]} {key[1]}"] = sorted(lacking)
        never = {code for code in documented - required if code >= 400}
        if never:
            phantom[f"{key[0]} {key[1]}"] = sorted(never)
    assert not missing, f"statuses the code can answer, missing from openapi.yaml: {missing}"
    assert not phantom, f"error statuses in openapi.yaml that no code answers: {phantom}"
    assert not stale, f"UNREACHABLE entries the code no longer finds (remove them): {stale}"


# -- fuzzing a real serve with schemathesis -------------------------------------------------

# Hypothesis keeps caches in a folder of its own; not in the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "dockyard-tests-hypothesis")

# Examples per operation: this many valid requests, and as many invalid ones where the
# operation takes any input; the same ones every run (Hypothesis derandomized), so that the
# suite is repeatable. DOCKYARD_FUZZ_EXAMPLES=500 DOCKYARD_FUZZ_SEED=random (or a number)
# fuzzes deeper and elsewhere, e.g. before a release.
MAX_EXAMPLES = int(os.environ.get("DOCKYARD_FUZZ_EXAMPLES", "10"))
SEED = os.environ.get("DOCKYARD_FUZZ_SEED")
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance")


class SigV4(requests.auth.AuthBase):
    """Sign a request as boto3 does for Lambda: the kind of token as the access key id, the
    token as the secret key."""

    def __init__(self, kind: str, token: str):
        self.credentials = Credentials(kind, token)

    def __call__(self, prepared: requests.PreparedRequest) -> requests.PreparedRequest:
        body = prepared.body or b""
        if isinstance(body, str):
            body = body.encode()
        # Signed as botocore signs: the host, the date and the content type (not the
        # connection headers requests adds, which a proxy may change).
        headers = {k: v for k, v in prepared.headers.items() if k.lower() == "content-type"}
        aws = AWSRequest(method=prepared.method, url=prepared.url, data=body, headers=headers)
        SigV4Auth(self.credentials, "lambda", "local").add_auth(aws)
        prepared.headers.update(dict(aws.headers.items()))
        return prepared


# (method or "*", path, parameter) -> names that exist on the fuzzed server, which the fuzzer
# mixes into the path parameters it generates (for a path and the paths below it), so that
# operations reach real containers, jobs and records as well as missing ones.
KNOWN: dict[tuple[str, str, str], list[str]] = {}
SENT: dict[str, int] = {}   # requests sent per operation


@pytest.fixture(scope="module")
def fuzzed_server(private_tmp, tmp_path_factory):
    """A serve of this module's own (the fuzzer deletes, registers and cancels: no other test's
    server is touched), serving the document this module loaded, with what to aim at: the
    example container `hello` (serving, for calls), a container `scratch` that the
    destructive operations may delete, jobs, a finished invocation, a registered worker that
    is no agent (its heartbeats are fuzzed, never the real worker's) and aliases."""
    data = private_tmp / "openapi" / "data"
    data.parent.mkdir()
    srv = Server(data, ["--offline"])
    try:
        served = requests.get(srv.url + "/openapi.json", timeout=30)
        assert served.status_code == 200 and served.json() == DOC
        KNOWN.update(_things_to_aim_at(srv, tmp_path_factory.mktemp("scratch")))
        yield srv
    finally:
        code = srv.stop()
        print(f"\nschemathesis: {sum(SENT.values())} requests over {len(SENT)} operations")
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert not srv.leftovers, srv.leftovers


def _things_to_aim_at(srv: Server, tmp: Path) -> dict:
    hello = srv.deploy(ROOT / "deploy" / "hello")
    scratch = tmp / "scratch"
    shutil.copytree(ROOT / "deploy" / "hello", scratch,
                    ignore=shutil.ignore_patterns("__pycache__"))
    manifest = scratch / "dockyard.toml"
    manifest.write_text(manifest.read_text().replace('name = "hello"', 'name = "scratch"'))
    stored = srv.api("POST", "/api/containers", params={"activate": "0"},
                     data=zip_folder(scratch))
    assert stored.status_code == 201, stored.text
    for job in ("fuzz-job", "doomed-job"):
        made = srv.api("POST", "/api/jobs", json={"name": job, "target": "hello/echo",
                                                   "schedule": "@every 1h"})
        assert made.status_code == 201, made.text
    queued = srv.invoke("hello/echo", {"n": 1}, params={"async": "1"})
    assert queued.status_code == 202, queued.text
    invocation = queued.json()["invocation_id"]
    srv.wait_invocation(invocation)
    fake = srv.api("POST", "/api/workers/register",
                   json={"name": "not-an-agent", "address": NOWHERE})
    assert fake.status_code == 201, fake.text
    for alias in ("live", "doomed"):
        made = requests.post(srv.url + "/2015-03-31/functions/hello/aliases", timeout=60,
                             json={"Name": alias, "FunctionVersion": "$LATEST"},
                             auth=SigV4("admin", srv.admin))
        assert made.status_code == 201, made.text
    version = hello["version"]
    return {
        ("*", "/api/containers/{name}", "name"): ["hello", "scratch"],
        ("DELETE", "/api/containers/{name}", "name"): ["scratch"],
        ("*", "/api/deployments/{deployment_id}", "deployment_id"): [hello["deployment"]],
        ("*", "/api/artifacts/{sha256}", "sha256"): [hello["artifact_sha256"]],
        ("*", "/api/invocations/{invocation_id}", "invocation_id"): [invocation],
        ("*", "/api/jobs/{name}", "name"): ["fuzz-job"],
        ("DELETE", "/api/jobs/{name}", "name"): ["doomed-job"],
        ("*", "/api/workers/{worker_id}/heartbeat", "worker_id"): [fake.json()["id"]],
        ("*", "/api/workers/{name}", "name"): ["not-an-agent"],
        ("*", "/invoke/{target}/{function}", "target"): ["hello", f"hello@{version}",
                                                          "hello@live"],
        ("*", "/invoke/{target}/{function}", "function"): ["echo"],
        ("*", "/2015-03-31/functions/{FunctionName}", "FunctionName"): [
            "hello.echo", "hello", f"hello.echo:{version}", "hello.echo:live",
            "arn:aws:lambda:local:000000000000:function:hello.echo"],
        ("*", "/2015-03-31/functions/{FunctionName}/aliases/{Name}", "Name"): ["live"],
        ("DELETE", "/2015-03-31/functions/{FunctionName}/aliases/{Name}", "Name"): ["doomed"],
    }


REQUEST_LINE_MAX = 4094   # gunicorn's --limit-request-line, which serve leaves as it is
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "te",
           "upgrade", "trailer", "keep-alive"}
# Where a worker registered by the fuzzer takes calls: nowhere (a fuzzed address could name
# any host, and the control plane connects to the workers' addresses).
NOWHERE = "unix:/nonexistent/invoke.sock"


def known_values(method: str, path: str, name: str) -> list[str]:
    """The names in KNOWN for this parameter of this operation (or of a path above it)."""
    for (m, p, n), values in sorted(KNOWN.items(), key=lambda item: (-len(item[0][1]),
                                                                       item[0][0] == "*")):
        if n == name and m in (method, "*") and (path == p or path.startswith(p + "/")):
            return values
    return []


# The document the server serves (fuzzed_server checks that it serves this one).
schema = schemathesis.openapi.from_dict(document(), config=schemathesis.Config.from_dict({
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
}))


@schema.hook
def flatmap_path_parameters(context, parameters):
    """Now and then a name that exists, in place of each generated one."""
    operation = context.operation
    if not parameters:
        return st.just(parameters)
    choices = [st.sampled_from([value, *known_values(operation.method.upper(), operation.path,
                                                     name)])
               for name, value in parameters.items()]
    return st.tuples(*choices).map(lambda picked: dict(zip(parameters, picked)))


def send(case, srv: Server) -> None:
    """One generated request, as the admin token sends it, checked against the document."""
    SENT[case.operation.label] = SENT.get(case.operation.label, 0) + 1
    if case.path == "/api/workers/register" and isinstance(case.body, dict):
        case.body = {**case.body, "address": NOWHERE}
    # The admin token's credentials, never a generated Authorization; and none of the headers
    # that frame the HTTP message itself (a Content-Length that is not a number gets
    # gunicorn's own 400 before any route sees the request): requests sets those.
    case.headers = {k: v for k, v in (case.headers or {}).items()
                    if k.lower() not in FRAMING and k.lower() != "authorization"}
    # A request line past gunicorn's limit is refused by gunicorn itself (414, before any
    # route): not a request the API sees.
    sent = case.as_transport_kwargs(base_url=srv.url)
    url = requests.Request("GET", sent["url"], params=sent.get("params")).prepare().url
    assume(len(case.method) + len(url) - len(srv.url) + len(" HTTP/1.1") <= REQUEST_LINE_MAX)
    if case.path.startswith(LAMBDA):
        case.call_and_validate(base_url=srv.url, auth=SigV4("admin", srv.admin), timeout=60)
    else:
        case.call_and_validate(base_url=srv.url, timeout=60,
                               headers={"Authorization": f"Bearer {srv.admin}"})


def has_inputs(key: tuple[str, str]) -> bool:
    item = DOC["paths"][key[1]]
    return bool(item.get("parameters") or OPERATIONS[key].get("parameters")
                or "requestBody" in OPERATIONS[key])


# One test per operation, in the document's order. (schemathesis's own schema.parametrize()
# would do this, but its items share one node id under pytest 9.2, and pytest-xdist then
# runs only one of them.)
@pytest.mark.parametrize("key", list(OPERATIONS), ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_api_answers_as_documented(key, fuzzed_server):
    operation = schema.find_operation_by_label(f"{key[0]} {key[1]}")
    modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * has_inputs(key)
    cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))
    fuzz = settings(max_examples=MAX_EXAMPLES * len(modes), deadline=None, database=None,
                    derandomize=SEED is None,
                    suppress_health_check=list(HealthCheck))(given(case=cases)(send))
    if SEED not in (None, "random"):
        fuzz = hypothesis.seed(int(SEED))(fuzz)
    fuzz(srv=fuzzed_server)

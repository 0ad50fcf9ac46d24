"""The Lambda-compatible API through the real boto3 client against a real `dockyard serve`:
Invoke (RequestResponse, Event, DryRun; function errors, timeouts, Tail logs, service errors
as botocore raises them), ListFunctions and GetFunction, and SigV4 signatures checked under
`serve --invoke-auth` (and any or none taken without it)."""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import time
from unittest import mock

import boto3
import botocore
import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conftest import FUNCTIONS, Server, make_package


def client(url: str, key: str = "invoke", secret: str = "anything", unsigned: bool = False):
    config = Config(retries={"max_attempts": 0}, read_timeout=120, connect_timeout=10,
                    signature_version=botocore.UNSIGNED if unsigned else None)
    return boto3.client("lambda", endpoint_url=url, region_name="local",
                        aws_access_key_id=key, aws_secret_access_key=secret, config=config)


def token(srv: Server, kind: str) -> str:
    return (srv.data / "tokens" / kind).read_text().strip()


def one_function_package(tmp_path, name: str):
    """A container declaring one function (`sleepy`, the echo package's sleep) with a 1 s
    timeout."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FUNCTIONS / "echo" / "main.py", folder / "main.py")
    (folder / "dockyard.toml").write_text(
        f'name = "{name}"\n\n[functions]\nsleepy = "main:sleep"\n\n[limits]\ntimeout_s = 1\n')
    return folder


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lambda")
    echo = server.deploy(make_package(tmp, "echo", name="lam"))
    one = server.deploy(one_function_package(tmp, "lam-one"))
    return {"server": server, "version": echo["version"], "one_version": one["version"],
            "lam": client(server.url, "invoke", token(server, "invoke"))}


def record(srv: Server, invocation_id: str, timeout: float = 60) -> dict:
    """The finished record of a call (it lands a moment after its answer)."""
    end = time.monotonic() + timeout
    while True:
        response = srv.api("GET", f"/api/invocations/{invocation_id}")
        if response.status_code == 200 and response.json()["status"] not in ("queued",
                                                                               "running"):
            return response.json()
        assert time.monotonic() < end, response.text
        time.sleep(0.05)


def headers(answer: dict) -> dict:
    return answer["ResponseMetadata"]["HTTPHeaders"]


def error_code(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


def test_invoke_request_response_is_a_recorded_call(deployed):
    srv, lam = deployed["server"], deployed["lam"]
    answer = lam.invoke(FunctionName="lam.echo", Payload=json.dumps({"who": "boto3"}))
    assert answer["StatusCode"] == 200
    assert "FunctionError" not in answer
    assert json.loads(answer["Payload"].read()) == {"who": "boto3"}
    assert answer["ExecutedVersion"] == deployed["version"]
    invocation_id = headers(answer)["x-dockyard-invocation-id"]
    assert answer["ResponseMetadata"]["RequestId"] == invocation_id
    inv = record(srv, invocation_id)
    assert inv["status"] == "succeeded" and inv["trigger"] == "lambda"
    assert inv["container"] == "lam" and inv["function"] == "echo"
    assert inv["input"] == {"who": "boto3"}
    # No payload: the event is None.
    assert json.loads(lam.invoke(FunctionName="lam.echo")["Payload"].read()) is None


def test_function_names_and_qualifiers(deployed):
    lam, version = deployed["lam"], deployed["version"]
    arn = "arn:aws:lambda:us-east-1:123456789012:function:lam.echo"
    for name, qualifier in [(arn, None), (f"{arn}:{version}", None), ("lam.echo:$LATEST", None),
                            ("lam.echo", version), ("lam.echo", "$LATEST"),
                            (f"lam.echo:{version}", version)]:
        kwargs = {"Qualifier": qualifier} if qualifier else {}
        answer = lam.invoke(FunctionName=name, Payload=b"[1]", **kwargs)
        assert json.loads(answer["Payload"].read()) == [1], (name, qualifier)
        assert answer["ExecutedVersion"] == version
    # A container with one function is named by its name alone.
    answer = lam.invoke(FunctionName="lam-one", Payload=b'{"s": 0}')
    assert json.loads(answer["Payload"].read()) == "slept"
    assert answer["ExecutedVersion"] == deployed["one_version"]
    # One with several is not, and says which names to use.
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.invoke(FunctionName="lam")
    assert "lam.echo" in str(exc.value)
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.invoke(FunctionName=f"lam.echo:{version}", Qualifier="$LATEST")
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.invoke(FunctionName="lam.echo", Qualifier="no-such-version")
    assert "neither a version nor an alias named 'no-such-version'" in str(exc.value)


def test_event_is_queued_on_the_durable_path(deployed):
    srv, lam = deployed["server"], deployed["lam"]
    answer = lam.invoke(FunctionName="lam.echo", InvocationType="Event", Payload=b'{"a": 1}')
    assert answer["StatusCode"] == 202
    assert answer["Payload"].read() == b""
    invocation_id = headers(answer)["x-dockyard-invocation-id"]
    location = headers(answer)["location"]
    assert location.startswith(f"/api/invocations/{invocation_id}?key=")
    inv = record(srv, invocation_id)
    assert inv["status"] == "succeeded" and inv["trigger"] == "lambda"
    assert inv["output"] == {"a": 1}
    # Its caller reads its record at the Location (no token needed without --invoke-auth).
    assert requests.get(srv.url + location, timeout=30).json()["id"] == invocation_id
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="lam.nope", InvocationType="Event")


def test_dry_run_checks_the_function_and_runs_nothing(deployed):
    srv, lam = deployed["server"], deployed["lam"]
    before = len(srv.api("GET", "/api/invocations?container=lam-one&limit=500").json())
    answer = lam.invoke(FunctionName="lam-one.sleepy", InvocationType="DryRun")
    assert answer["StatusCode"] == 204
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="lam-one.missing", InvocationType="DryRun")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="no-such-container", InvocationType="DryRun")
    assert len(srv.api("GET", "/api/invocations?container=lam-one&limit=500").json()) == before


def test_function_error_and_timeout_are_unhandled_function_errors(deployed):
    lam = deployed["lam"]
    answer = lam.invoke(FunctionName="lam.boom", Payload=b"{}")
    assert answer["StatusCode"] == 200
    assert answer["FunctionError"] == "Unhandled"
    body = json.loads(answer["Payload"].read())
    assert body["errorType"] == "ValueError" and body["errorMessage"] == "boom"
    assert isinstance(body["stackTrace"], list)
    assert any("raise ValueError" in line for line in body["stackTrace"])
    slow = lam.invoke(FunctionName="lam-one", Payload=b'{"s": 5}')
    assert slow["StatusCode"] == 200 and slow["FunctionError"] == "Unhandled"
    body = json.loads(slow["Payload"].read())
    assert body["errorType"] == "Sandbox.Timedout", body
    assert body["errorMessage"]


def test_tail_returns_the_calls_log_and_report(deployed):
    lam = deployed["lam"]
    answer = lam.invoke(FunctionName="lam.printer", LogType="Tail", Payload=b'{"text": "hi"}')
    assert json.loads(answer["Payload"].read()) == "printed"
    text = base64.b64decode(answer["LogResult"]).decode()
    invocation_id = headers(answer)["x-dockyard-invocation-id"]
    assert "to stdout hi" in text and "to stderr" in text
    assert f"START RequestId: {invocation_id}" in text
    report = text.strip().splitlines()[-1]
    assert report.startswith(f"REPORT RequestId: {invocation_id}\tDuration: ")
    assert "Memory Size: 512 MB" in report and "Max Memory Used:" in report
    # The last 4 KB of a long log.
    big = lam.invoke(FunctionName="lam.big_print", LogType="Tail")
    text = base64.b64decode(big["LogResult"])
    assert len(text) == 4096 and text.rstrip().splitlines()[-1].startswith(b"REPORT")
    # Without Tail, no log.
    assert "LogResult" not in lam.invoke(FunctionName="lam.printer")


def test_service_errors_as_botocore_raises_them(deployed):
    srv, lam = deployed["server"], deployed["lam"]
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.invoke(FunctionName="no-such-container.fn")
    assert "no container named 'no-such-container'" in str(exc.value)
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.invoke(FunctionName="lam.no_such_function")
    assert "no function 'no_such_function'" in str(exc.value)
    with pytest.raises(lam.exceptions.RequestTooLargeException):
        lam.invoke(FunctionName="lam.echo", Payload=b'"' + b"x" * (6 * 1024 * 1024) + b'"')
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName="lam.echo", Payload=b"{not json")
    # The raw answer: botocore's error shape.
    raw = requests.post(f"{srv.url}/2015-03-31/functions/nope.fn/invocations", timeout=30)
    assert raw.status_code == 404
    assert raw.headers["x-amzn-errortype"] == "ResourceNotFoundException"
    assert raw.json()["Type"] == "User" and raw.json()["Message"]


def test_without_invoke_auth_any_or_no_signature_invokes(deployed):
    srv = deployed["server"]
    for lam in (client(srv.url, unsigned=True), client(srv.url, "someone", "wrong-secret")):
        answer = lam.invoke(FunctionName="lam.echo", Payload=b"7")
        assert json.loads(answer["Payload"].read()) == 7


def test_list_and_get_functions(deployed):
    srv, lam, version = deployed["server"], deployed["lam"], deployed["version"]
    # Every page: the session's server holds the other tests' containers too.
    functions = {f["FunctionName"]: f for page in lam.get_paginator("list_functions").paginate()
                 for f in page["Functions"]}
    echo = functions["lam.echo"]
    assert echo["FunctionArn"] == "arn:aws:lambda:local:000000000000:function:lam.echo"
    assert echo["Version"] == "$LATEST" and echo["Runtime"].startswith("python3.")
    assert echo["Handler"] == "main.echo" and echo["Timeout"] == 30
    assert echo["MemorySize"] == 512 and echo["LastModified"]
    assert functions["lam-one.sleepy"]["Timeout"] == 1
    assert "lam.boom" in functions
    every = [f for page in lam.get_paginator("list_functions").paginate(FunctionVersion="ALL")
             for f in page["Functions"]]
    assert {"$LATEST", version} <= {f["Version"] for f in every
                                    if f["FunctionName"] == "lam.echo"}
    # Paged as boto3's paginator pages.
    paged = [f["FunctionName"] for page in lam.get_paginator("list_functions").paginate(
        PaginationConfig={"PageSize": 2}) for f in page["Functions"]]
    assert sorted(paged) == sorted(functions)
    got = lam.get_function(FunctionName="lam.echo")["Configuration"]
    assert got["FunctionName"] == "lam.echo" and got["Version"] == "$LATEST"
    pinned = lam.get_function(FunctionName="lam.echo", Qualifier=version)["Configuration"]
    assert pinned["Version"] == version and pinned["FunctionArn"].endswith(f":{version}")
    assert lam.get_function_configuration(FunctionName="lam-one")["FunctionName"] == \
        "lam-one.sleepy"
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="lam.nope")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="no-such-container")
    # Listing and describing need a token's signature even without --invoke-auth.
    with pytest.raises(ClientError) as exc:
        client(srv.url, unsigned=True).list_functions()
    assert error_code(exc) == "MissingAuthenticationTokenException"
    with pytest.raises(ClientError) as exc:
        client(srv.url, "invoke", "wrong").get_function(FunctionName="lam.echo")
    assert error_code(exc) == "InvalidSignatureException"


def test_a_function_whose_version_failed_to_deploy_says_so_in_its_configuration(
        deployed, tmp_path):
    srv, lam = deployed["server"], deployed["lam"]
    # Its only version cannot load: nothing serves, and the configuration says why.
    srv.deploy(make_package(tmp_path, "broken_import", name="lam-broken"), expect="failed")
    config = lam.get_function_configuration(FunctionName="lam-broken.echo")
    assert (config["State"], config["LastUpdateStatus"]) == ("Failed", "Failed"), config
    assert "ModuleNotFoundError" in config["StateReason"], config
    assert config["StateReasonCode"] == "FunctionError"
    with pytest.raises(ClientError) as exc:
        lam.invoke(FunctionName="lam-broken.echo", Payload=b"{}")
    assert error_code(exc) == "ResourceNotReadyException"
    # A container that declares no function: its name alone names none, and it says so.
    bare = tmp_path / "lam-bare"
    bare.mkdir()
    (bare / "main.py").write_text("def f(event):\n    return event\n")
    (bare / "dockyard.toml").write_text('name = "lam-bare"\n')
    srv.deploy(bare)
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.invoke(FunctionName="lam-bare", Payload=b"{}")
    assert exc.value.response["Error"]["Message"] == (
        "container 'lam-bare' declares no functions: name one in [functions] of its "
        "dockyard.toml, then call CONTAINER.FUNCTION"), exc.value.response
    # One that serves is Active, and so is a version of it that never failed.
    for qualifier in ({}, {"Qualifier": deployed["version"]}):
        ok = lam.get_function_configuration(FunctionName="lam.echo", **qualifier)
        assert (ok["State"], ok["LastUpdateStatus"]) == ("Active", "Successful"), ok
        assert "StateReason" not in ok


# -- signatures under --invoke-auth ---------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(private_tmp, wheelhouse, tmp_path_factory):
    data = private_tmp / "lambda-auth" / "data"
    data.parent.mkdir()
    srv = Server(data, ["--find-links", str(wheelhouse), "--offline", "--invoke-auth"])
    try:
        srv.deploy(make_package(tmp_path_factory.mktemp("lambda-auth"), "echo", name="lam"))
        yield srv
    finally:
        assert srv.stop() == 0, srv.log_path.read_text()[-3000:]
    assert not srv.leftovers, srv.leftovers


def test_invoke_auth_verifies_the_signature(auth_server):
    srv = auth_server
    arn = "arn:aws:lambda:us-east-1:000000000000:function:lam.echo"
    for kind in ("invoke", "admin"):
        lam = client(srv.url, kind, token(srv, kind))
        answer = lam.invoke(FunctionName=arn, Qualifier="$LATEST", Payload=b'{"k": 1}')
        assert json.loads(answer["Payload"].read()) == {"k": 1}, kind
        assert lam.invoke(FunctionName="lam.echo", InvocationType="Event")["StatusCode"] == 202
    refusals = [
        (client(srv.url, "invoke", "not-the-token"), "InvalidSignatureException", 403),
        (client(srv.url, "admin", token(srv, "invoke")), "InvalidSignatureException", 403),
        (client(srv.url, unsigned=True), "MissingAuthenticationTokenException", 403),
        (client(srv.url, "AKIAEXAMPLE", "x"), "UnrecognizedClientException", 403),
        (client(srv.url, "worker", token(srv, "worker")), "AccessDeniedException", 403),
    ]
    for lam, code, status in refusals:
        for kind in ("RequestResponse", "Event", "DryRun"):
            with pytest.raises(ClientError) as exc:
                lam.invoke(FunctionName="lam.echo", InvocationType=kind, Payload=b"1")
            assert error_code(exc) == code, (code, kind)
            assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
            assert exc.value.response["Error"]["Message"]
            if code == "AccessDeniedException":
                assert exc.value.response["Error"]["Message"] == (
                    "a worker token cannot use this route: sign with the invoke or the admin "
                    "token")


def test_a_stale_or_altered_signature_is_refused(auth_server):
    srv = auth_server
    url = f"{srv.url}/2015-03-31/functions/lam.echo/invocations"
    credentials = Credentials("invoke", token(srv, "invoke"))

    def signed(body: bytes, at: datetime.datetime | None = None) -> AWSRequest:
        request = AWSRequest(method="POST", url=url, data=body)
        if at is None:
            SigV4Auth(credentials, "lambda", "local").add_auth(request)
        else:
            with mock.patch("botocore.auth.get_current_datetime", return_value=at):
                SigV4Auth(credentials, "lambda", "local").add_auth(request)
        return request

    def send(request: AWSRequest, body: bytes) -> requests.Response:
        return requests.post(url, data=body, headers=dict(request.headers), timeout=60)

    fresh = signed(b'"ok"')
    assert send(fresh, b'"ok"').json() == "ok"
    # The same signature on another body.
    altered = send(fresh, b'"other"')
    assert altered.status_code == 403
    assert altered.headers["x-amzn-errortype"] == "InvalidSignatureException"
    # Signed ten minutes ago.
    ago = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - \
        datetime.timedelta(minutes=10)
    stale = send(signed(b'"ok"', ago), b'"ok"')
    assert stale.status_code == 403
    assert stale.headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert "Signature expired" in stale.json()["Message"]
    # A bearer token is not a signature here.
    bearer = requests.post(url, data=b'"ok"', timeout=60,
                           headers={"Authorization": f"Bearer {token(srv, 'invoke')}"})
    assert bearer.status_code == 400
    assert bearer.headers["x-amzn-errortype"] == "IncompleteSignatureException"

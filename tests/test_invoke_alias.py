"""Aliases on dockyard's own route, `/invoke/NAME@ALIAS/FUNCTION`, against a real `dockyard
serve`: a weighted alias draws per call (the answer's X-Dockyard-Version and the record name
the version that ran), an async call through an alias queues the version it drew, an unknown
name is a one-line 404 saying neither a version nor an alias has it, the CLI calls through an
alias, a version deployed later under an alias's name wins, and the dashboard's invoke form
takes an alias too (in-process)."""

from __future__ import annotations

import io
import json
import math
import re
import zipfile

import boto3
import pytest
import requests
from botocore.config import Config

from conftest import container_processes, make_package, one_line_error, poll_until, zip_folder

CALLS = 300
WEIGHT = 0.3


def lambda_admin(server):
    """boto3's Lambda client signed with the admin token: aliases are made through it."""
    config = Config(retries={"max_attempts": 0}, read_timeout=120, connect_timeout=10)
    return boto3.client("lambda", endpoint_url=server.url, region_name="local",
                        aws_access_key_id="admin", aws_secret_access_key=server.admin,
                        config=config)


@pytest.fixture(scope="module")
def ial(server, tmp_path_factory):
    """Container `ial` with versions v1 and v2 (v2 serving), and aliases `canary` (v1, v2 at
    0.3), `old` (v1), `flip` (v1, v2 at 1.0: always v2) and `latest` ($LATEST)."""
    tmp = tmp_path_factory.mktemp("invoke-alias")
    server.deploy(make_package(tmp, "echo", name="ial", version="v1"))
    server.deploy(make_package(tmp, "echo", name="ial", version="v2",
                               files={"extra.py": "X = 2\n"}))
    lam = lambda_admin(server)
    lam.create_alias(FunctionName="ial", Name="canary", FunctionVersion="v1",
                     RoutingConfig={"AdditionalVersionWeights": {"v2": WEIGHT}})
    lam.create_alias(FunctionName="ial", Name="old", FunctionVersion="v1")
    lam.create_alias(FunctionName="ial", Name="flip", FunctionVersion="v1",
                     RoutingConfig={"AdditionalVersionWeights": {"v2": 1.0}})
    lam.create_alias(FunctionName="ial", Name="latest", FunctionVersion="$LATEST")
    return {"server": server, "lam": lam, "tmp": tmp}


def test_a_weighted_alias_draws_each_call(ial):
    srv = ial["server"]
    http = requests.Session()
    ran = {"v1": 0, "v2": 0}
    ids = {}
    for n in range(CALLS):
        answer = http.post(f"{srv.url}/invoke/ial@canary/echo", data=str(n), timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json() == n
        version = answer.headers["X-Dockyard-Version"]
        ran[version] += 1
        ids.setdefault(version, answer.headers["X-Dockyard-Invocation-Id"])
    # Binomial(300, 0.3): mean 90, sd 7.9; five sd either way fails once in ~3 million runs.
    mean, sd = CALLS * WEIGHT, math.sqrt(CALLS * WEIGHT * (1 - WEIGHT))
    assert mean - 5 * sd <= ran["v2"] <= mean + 5 * sd, ran
    assert ran["v1"] + ran["v2"] == CALLS
    # The records name the version that ran.
    for version, invocation_id in ids.items():
        record = poll_until(lambda: _finished(srv, invocation_id), 30,
                            f"the record of {invocation_id}")
        assert record["version"] == version and record["status"] == "succeeded"
    # A version still names itself; an alias of one version, $LATEST and a full weight too.
    for target, expected in [("ial@v1", "v1"), ("ial@v2", "v2"), ("ial@old", "v1"),
                             ("ial@flip", "v2"), ("ial@latest", "v2"), ("ial", "v2")]:
        answer = http.post(f"{srv.url}/invoke/{target}/echo", json={"t": target}, timeout=120)
        assert answer.status_code == 200, (target, answer.text)
        assert answer.json() == {"t": target}
        assert answer.headers["X-Dockyard-Version"] == expected, target


def test_the_versions_an_alias_names_are_kept_warm(ial):
    """v1 is no longer the container's own, but aliases name it: its processes stay up (not
    started on demand and stopped when idle), and a call through the alias finds one."""
    srv = ial["server"]

    def v1_ready():
        return any(v["container"] == "ial" and v["version"] == "v1" and v["state"] == "ready"
                   for w in srv.api("GET", "/api/workers").json()["workers"]
                   for v in w["versions"])
    poll_until(v1_ready, 60, "the version the aliases name was never started")
    running = set(container_processes(srv.data, "ial"))
    answer = requests.post(f"{srv.url}/invoke/ial@old/echo", data="1", timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Dockyard-Version"] == "v1"
    assert set(container_processes(srv.data, "ial")) == running    # none started for it


def _finished(srv, invocation_id):
    record = srv.api("GET", f"/api/invocations/{invocation_id}")
    if record.status_code == 200 and record.json()["status"] not in ("queued", "running"):
        return record.json()
    return None


def test_an_async_call_through_an_alias_queues_the_version_it_drew(ial):
    srv = ial["server"]
    answer = requests.post(f"{srv.url}/invoke/ial@flip/echo?async=1", json={"a": 1},
                           timeout=60)
    assert answer.status_code == 202, answer.text
    invocation_id = answer.json()["invocation_id"]
    # Drawn when queued: the queued record already names v2 (flip's own version is v1).
    assert srv.api("GET", f"/api/invocations/{invocation_id}").json()["version"] == "v2"
    done = srv.wait_invocation(invocation_id)
    assert done["status"] == "succeeded" and done["version"] == "v2"
    assert done["output"] == {"a": 1}
    answer = requests.post(f"{srv.url}/invoke/ial@old/echo", json=2, timeout=60,
                           headers={"Prefer": "respond-async"})
    assert answer.status_code == 202, answer.text
    assert srv.wait_invocation(answer.json()["invocation_id"])["version"] == "v1"


def test_an_unknown_name_is_one_404(ial):
    srv = ial["server"]
    for query in ("", "?async=1"):
        answer = requests.post(f"{srv.url}/invoke/ial@nope/echo{query}", json=1, timeout=60)
        assert answer.status_code == 404, (query, answer.text)
        message = answer.json()["error"]["message"]
        assert "container 'ial' has neither a version nor an alias named 'nope'" in message
        assert "\n" not in message and "invocation_id" not in answer.json()
    # Other 404s say what they said before.
    answer = requests.post(f"{srv.url}/invoke/ial@canary/nope", json=1, timeout=60)
    assert answer.status_code == 404 and "no function 'nope'" in answer.text
    answer = requests.post(f"{srv.url}/invoke/ial@v1/nope", json=1, timeout=60)
    assert answer.status_code == 404 and "no function 'nope'" in answer.text
    answer = requests.post(f"{srv.url}/invoke/ial-none@canary/echo", json=1, timeout=60)
    assert answer.status_code == 404 and "no container named 'ial-none'" in answer.text
    error = one_line_error(srv.cli("invoke", "ial@nope/echo", "1", check=False))
    assert "neither a version nor an alias named 'nope'" in error


def test_the_cli_calls_through_an_alias(ial):
    srv = ial["server"]
    done = srv.cli("invoke", "ial@old/echo", '{"via": "cli"}', "-v")
    assert json.loads(done.stdout) == {"via": "cli"}
    assert re.search(r"version v1\b", done.stderr), done.stderr
    done = srv.cli("invoke", "--async", "ial@flip/echo", "3")
    assert srv.wait_invocation(done.stdout.strip())["version"] == "v2"


def test_a_version_deployed_under_an_aliases_name_wins(ial):
    srv, lam = ial["server"], ial["lam"]
    # An alias cannot take a version's name, but a version may come later under an alias's.
    lam.create_alias(FunctionName="ial", Name="later", FunctionVersion="v1")
    assert srv.invoke("ial@later/echo", 1).headers["X-Dockyard-Version"] == "v1"
    package = make_package(ial["tmp"], "echo", name="ial", version="later",
                           files={"extra.py": "X = 3\n"})
    stored = srv.api("POST", "/api/containers?activate=0", data=zip_folder(package))
    assert stored.status_code in (200, 201), stored.text
    # A pinned call starts the stored version on demand; until it is up a call may get a 503.
    answer = poll_until(lambda: (lambda a: a if a.status_code != 503 else None)(
        srv.invoke("ial@later/echo", 2)), 180, "a call to version 'later'", every=0.5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Dockyard-Version"] == "later"


# -- the dashboard's invoke form (in-process: no worker needed to queue a call) --------------

def _package(version: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dockyard.toml", f'name = "dash"\nversion = "{version}"\n\n[functions]\n'
                                     'greet = "main:greet"\n')
        zf.writestr("main.py", "def greet(event):\n    return event\n")
    return buf.getvalue()


def test_the_dashboards_invoke_form_takes_an_alias(tmp_path):
    from dockyard.app import create_app
    from dockyard.app.store import aliases
    from dockyard.app.store.db import get_db

    app = create_app({"DATA_DIR": str(tmp_path / "data")})
    token = (tmp_path / "data" / "tokens" / "admin").read_text().strip()
    api, browser = app.test_client(), app.test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    for version in ("1.0", "2.0"):
        assert api.post("/api/containers", data=_package(version)).status_code in (200, 201)
    db = get_db(app.extensions["dockyard"]["data"].db_target)
    aliases.create(db, "dash", "stable", "1.0", {"2.0": 1.0}, "")

    def csrf(path: str) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', browser.get(path).text).group(1)

    assert browser.post("/ui/sign-in", data={"csrf": csrf("/ui/sign-in"),
                                             "token": token}).status_code == 302
    sent = browser.post("/ui/containers/dash/invoke", data={
        "csrf": csrf("/ui/"), "function": "greet", "version": "stable", "event": "{}"})
    assert sent.status_code == 302
    invocation_id = sent.headers["Location"].rsplit("/", 1)[-1]
    assert api.get(f"/api/invocations/{invocation_id}").get_json()["version"] == "2.0"
    refused = browser.post("/ui/containers/dash/invoke", data={
        "csrf": csrf("/ui/"), "function": "greet", "version": "nope", "event": "{}"})
    assert refused.status_code == 302
    assert "neither a version nor an alias named &#39;nope&#39;" in browser.get(
        refused.headers["Location"]).text

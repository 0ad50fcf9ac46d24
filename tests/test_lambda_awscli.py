"""The Lambda-compatible API through the real AWS CLI (v1, PyPI's awscli: the `aws` script of
this test's own environment, never one of the host's) against a real `dockyard serve`: invoke
(a result, a function error, an unknown function), list-functions, create-alias and get-alias,
and a wrong secret refused under `serve --invoke-auth`. Its profile lives in temp files (HOME,
AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE), with no instance metadata lookups and one
attempt per command, as the README tells a user to set it up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Server, make_package

AWS = Path(sys.executable).parent / "aws"


class Cli:
    """`aws` with a profile of its own: `default` signs with the invoke token, `admin` with
    the admin token."""

    def __init__(self, home: Path, url: str, tokens: Path, invoke_secret: str | None = None):
        assert AWS.exists(), f"no {AWS}: install the test extra (pip install -e '.[test]')"
        self.url = url
        home.mkdir(parents=True, exist_ok=True)
        credentials, config = home / "credentials", home / "config"
        invoke = invoke_secret or (tokens / "invoke").read_text().strip()
        admin = (tokens / "admin").read_text().strip()
        credentials.write_text(
            f"[default]\naws_access_key_id = invoke\naws_secret_access_key = {invoke}\n\n"
            f"[admin]\naws_access_key_id = admin\naws_secret_access_key = {admin}\n")
        config.write_text("[default]\nregion = local\n\n[profile admin]\nregion = local\n")
        credentials.chmod(0o600)
        # Nothing of the host's: no AWS_* variable, no proxy, no ~/.aws.
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("AWS_") and "proxy" not in k.lower()}
        self.env.update(HOME=str(home), AWS_CONFIG_FILE=str(config),
                        AWS_SHARED_CREDENTIALS_FILE=str(credentials),
                        AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1")
        self.cwd = home

    def __call__(self, *args: str, profile: str | None = None) -> subprocess.CompletedProcess:
        cmd = [str(AWS), "lambda", *args, "--endpoint-url", self.url, "--cli-read-timeout",
               "0", "--cli-connect-timeout", "10"]
        if profile:
            cmd += ["--profile", profile]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                              cwd=self.cwd, timeout=120)


def ok(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.fixture(scope="module")
def aws(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("awscli")
    record = server.deploy(make_package(tmp, "echo", name="awsc"))
    return {"server": server, "version": record["version"], "home": tmp / "home",
            "cli": Cli(tmp / "home", server.url, server.data / "tokens")}


def test_invoke_a_function(aws):
    cli, home = aws["cli"], aws["home"]
    answer = ok(cli("invoke", "--function-name", "awsc.echo", "--payload", '{"who": "cli"}',
                    "out.json"))
    assert answer == {"StatusCode": 200, "ExecutedVersion": aws["version"]}
    assert json.loads((home / "out.json").read_text()) == {"who": "cli"}
    # A function that raised: the command succeeds, and says so.
    answer = ok(cli("invoke", "--function-name", "awsc.boom", "--payload", "{}", "err.json"))
    assert answer["StatusCode"] == 200 and answer["FunctionError"] == "Unhandled"
    error = json.loads((home / "err.json").read_text())
    assert error["errorType"] == "ValueError" and error["errorMessage"] == "boom"
    # An unknown function: a non-zero exit, botocore's error name on stderr.
    done = cli("invoke", "--function-name", "awsc-nope.echo", "nope.json")
    assert done.returncode != 0
    assert "ResourceNotFoundException" in done.stderr
    assert "no container named 'awsc-nope'" in done.stderr


def test_list_functions_and_aliases(aws):
    cli = aws["cli"]
    names = [f["FunctionName"] for f in ok(cli("list-functions"))["Functions"]]
    assert "awsc.echo" in names and "awsc.boom" in names
    created = ok(cli("create-alias", "--function-name", "awsc", "--name", "live",
                     "--function-version", aws["version"], profile="admin"))
    assert created["Name"] == "live" and created["FunctionVersion"] == aws["version"]
    got = ok(cli("get-alias", "--function-name", "awsc.echo", "--name", "live"))
    assert got["AliasArn"] == "arn:aws:lambda:local:000000000000:function:awsc.echo:live"
    assert got["RevisionId"] == created["RevisionId"]
    # Changing aliases takes the admin token: the invoke token's profile is refused.
    done = cli("create-alias", "--function-name", "awsc", "--name", "mine",
               "--function-version", aws["version"])
    assert done.returncode != 0 and "AccessDeniedException" in done.stderr


def test_invoke_auth_refuses_a_wrong_secret(private_tmp, wheelhouse, tmp_path):
    data = private_tmp / "awscli-auth" / "data"
    data.parent.mkdir()
    srv = Server(data, ["--find-links", str(wheelhouse), "--offline", "--invoke-auth"])
    try:
        srv.deploy(make_package(tmp_path, "echo", name="awsa"))
        right = Cli(tmp_path / "right", srv.url, data / "tokens")
        answer = ok(right("invoke", "--function-name", "awsa.echo", "--payload", "7",
                          "out.json"))
        assert answer["StatusCode"] == 200
        assert (tmp_path / "right" / "out.json").read_text() == "7"
        wrong = Cli(tmp_path / "wrong", srv.url, data / "tokens", invoke_secret="not-it")
        done = wrong("invoke", "--function-name", "awsa.echo", "--payload", "7", "out.json")
        assert done.returncode != 0
        assert "InvalidSignatureException" in done.stderr
        assert not (tmp_path / "wrong" / "out.json").exists()
    finally:
        assert srv.stop() == 0, srv.log_path.read_text()[-3000:]
    assert not srv.leftovers, srv.leftovers

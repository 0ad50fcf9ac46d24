"""Aliases through the real boto3 client against a real `dockyard serve`: create, get, list,
update and delete, an alias as a Invoke and GetFunction qualifier, and a weighted split whose
calls land on the extra version in proportion (ExecutedVersion)."""

from __future__ import annotations

import json

import boto3
import botocore
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import make_package


def client(url: str, key: str, secret: str, unsigned: bool = False):
    config = Config(retries={"max_attempts": 0}, read_timeout=120, connect_timeout=10,
                    signature_version=botocore.UNSIGNED if unsigned else None)
    return boto3.client("lambda", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key=secret, config=config)


@pytest.fixture(scope="module")
def two_versions(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lambda-aliases")
    server.deploy(make_package(tmp, "echo", name="lal", version="v1"))
    server.deploy(make_package(tmp, "echo", name="lal", version="v2",
                               files={"extra.py": "X = 2\n"}))
    invoke = (server.data / "tokens" / "invoke").read_text().strip()
    return {"server": server, "admin": client(server.url, "admin", server.admin),
            "invoke": client(server.url, "invoke", invoke)}


def test_alias_lifecycle_and_weighted_calls(two_versions):
    admin, lam = two_versions["admin"], two_versions["invoke"]
    created = admin.create_alias(FunctionName="lal", Name="live", FunctionVersion="v1",
                                 Description="canary",
                                 RoutingConfig={"AdditionalVersionWeights": {"v2": 0.2}})
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert created["Name"] == "live" and created["FunctionVersion"] == "v1"
    assert created["AliasArn"] == "arn:aws:lambda:local:000000000000:function:lal:live"
    assert created["RoutingConfig"] == {"AdditionalVersionWeights": {"v2": 0.2}}
    got = lam.get_alias(FunctionName="lal.echo", Name="live")
    assert got["FunctionVersion"] == "v1" and got["Description"] == "canary"
    assert got["RevisionId"] == created["RevisionId"]
    assert [a["Name"] for a in lam.list_aliases(FunctionName="lal")["Aliases"]] == ["live"]
    # The alias is a qualifier: 1 000 calls, about a fifth of them on v2.
    ran = {"v1": 0, "v2": 0}
    for n in range(1000):
        answer = lam.invoke(FunctionName="lal.echo", Qualifier="live", Payload=str(n))
        assert json.loads(answer["Payload"].read()) == n
        ran[answer["ExecutedVersion"]] += 1
    assert 140 <= ran["v2"] <= 260, ran
    assert lam.invoke(FunctionName="lal.echo:live", InvocationType="DryRun")["StatusCode"] == 204
    # GetFunction through the alias describes its own version.
    config = lam.get_function(FunctionName="lal.echo", Qualifier="live")["Configuration"]
    assert config["Version"] == "v1"
    # Weight 0: every call back on v1.
    updated = admin.update_alias(FunctionName="lal", Name="live",
                                 RoutingConfig={"AdditionalVersionWeights": {"v2": 0.0}})
    assert "RoutingConfig" not in updated and updated["RevisionId"] != created["RevisionId"]
    versions = {lam.invoke(FunctionName="lal.echo", Qualifier="live")["ExecutedVersion"]
                for _ in range(50)}
    assert versions == {"v1"}
    moved = admin.update_alias(FunctionName="lal", Name="live", FunctionVersion="v2")
    assert moved["FunctionVersion"] == "v2"
    assert lam.invoke(FunctionName="lal.echo", Qualifier="live")["ExecutedVersion"] == "v2"
    # A stale RevisionId is a conflict.
    with pytest.raises(admin.exceptions.ResourceConflictException):
        admin.update_alias(FunctionName="lal", Name="live", FunctionVersion="v1",
                           RevisionId=created["RevisionId"])
    admin.delete_alias(FunctionName="lal", Name="live")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_alias(FunctionName="lal", Name="live")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="lal.echo", Qualifier="live")


def test_alias_refusals(two_versions):
    admin, lam = two_versions["admin"], two_versions["invoke"]
    with pytest.raises(admin.exceptions.ResourceNotFoundException):
        admin.create_alias(FunctionName="lal", Name="bad", FunctionVersion="v9")
    with pytest.raises(admin.exceptions.ResourceNotFoundException):
        admin.create_alias(FunctionName="no-such-container", Name="x", FunctionVersion="v1")
    with pytest.raises(admin.exceptions.InvalidParameterValueException):
        admin.create_alias(FunctionName="lal", Name="w", FunctionVersion="v1",
                           RoutingConfig={"AdditionalVersionWeights": {"v2": 1.5}})
    with pytest.raises(admin.exceptions.InvalidParameterValueException):
        admin.create_alias(FunctionName="lal", Name="w", FunctionVersion="v1",
                           RoutingConfig={"AdditionalVersionWeights": {"v1": 0.5}})
    with pytest.raises(admin.exceptions.ResourceConflictException):
        admin.create_alias(FunctionName="lal", Name="v2", FunctionVersion="v1")
    admin.create_alias(FunctionName="lal", Name="stable", FunctionVersion="$LATEST")
    with pytest.raises(admin.exceptions.ResourceConflictException):
        admin.create_alias(FunctionName="lal", Name="stable", FunctionVersion="v1")
    # Changing aliases takes the admin token's signature; reading, the invoke token's too.
    with pytest.raises(ClientError) as exc:
        lam.create_alias(FunctionName="lal", Name="mine", FunctionVersion="v1")
    assert exc.value.response["Error"]["Code"] == "AccessDeniedException"
    assert exc.value.response["Error"]["Message"] == (
        "an invoke token cannot use this route: sign with the admin token")
    with pytest.raises(ClientError) as exc:
        client(two_versions["server"].url, "x", "y", unsigned=True).delete_alias(
            FunctionName="lal", Name="stable")
    assert exc.value.response["Error"]["Code"] == "MissingAuthenticationTokenException"
    assert lam.get_alias(FunctionName="lal", Name="stable")["FunctionVersion"] == "$LATEST"
    answer = lam.invoke(FunctionName="lal.echo", Qualifier="stable")
    assert answer["ExecutedVersion"] == "v2"   # the serving version
    admin.delete_alias(FunctionName="lal", Name="stable")

"""The reads of the Lambda-compatible API: ListFunctions, GetFunction and
GetFunctionConfiguration. A Lambda function is a declared function of a container, named
CONTAINER.FUNCTION; its `$LATEST` is the container's serving version and its versions are the
container's versions. ARNs carry a fixed region and account (REGION, ACCOUNT)."""

from __future__ import annotations

import base64
import json
import math
import platform
import sys
import time

from ...common.frames import dumps
from ...common.protocol import DeploymentStatus
from ..store import functions as store
from .lambda_errors import LambdaError, not_found

REGION = "local"
ACCOUNT = "000000000000"
LATEST = "$LATEST"
RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
ARCHITECTURE = "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
MAX_ITEMS = 50
JSON = ("Content-Type", "application/json")


def function_arn(name: str, version: str | None = None) -> str:
    arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"
    return f"{arn}:{version}" if version and version != LATEST else arn


def only_function(functions, container: str) -> str:
    """The function a bare CONTAINER names: its only declared one."""
    names = sorted(functions)
    if len(names) == 1:
        return names[0]
    if not names:
        raise not_found(f"container '{container}' declares no functions: name one in "
                        "[functions] of its dockyard.toml, then call CONTAINER.FUNCTION")
    shown = ", ".join(f"{container}.{n}" for n in names[:10])
    raise not_found(f"container '{container}' declares {len(names)} functions, so its name "
                    f"alone names none of them: call one of {shown}")


def configuration(row: dict, function: str, latest: bool) -> dict:
    """A FunctionConfiguration of one function of one stored version (`row`, see
    store/functions.py); `latest`: as the container's $LATEST."""
    manifest = json.loads(row["manifest"])
    limits = manifest.get("limits") or {}
    name = f"{row['container']}.{function}"
    version = LATEST if latest else row["version"]
    target = manifest.get("functions", {}).get(function, function)
    return {
        "FunctionName": name,
        "FunctionArn": function_arn(name, version),
        "Runtime": RUNTIME,
        "Role": f"arn:aws:iam::{ACCOUNT}:role/dockyard",
        "Handler": target.replace(":", "."),
        "CodeSize": int(row["artifact_size"] or 0),
        "Description": f"dockyard container {row['container']}, version {row['version']}",
        "Timeout": int(math.ceil(float(limits.get("timeout_s", 30)))),
        "MemorySize": int(limits.get("memory_mb", 512)),
        "LastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000+0000",
                                      time.gmtime(row["created_at"] or 0)),
        "CodeSha256": base64.b64encode(bytes.fromhex(row["content_sha256"])).decode("ascii"),
        "Version": version,
        **_state(bool(row.get("serving")), row.get("deployment_status"),
                 row.get("deployment_error")),
        "PackageType": "Zip",
        "Architectures": [ARCHITECTURE],
    }


def _state(serving: bool, deployment: str | None, error: str | None) -> dict:
    """State and LastUpdateStatus from the version's last deployment, as Lambda has them: a
    version that serves is Active whatever its last deployment did (that is LastUpdateStatus:
    Failed, or InProgress while a new deployment of it is under way); one that does not is
    Failed where its last deployment failed on every live worker (with the reason), Pending
    while it is deployed, else Active (one never deployed, or superseded, starts on
    demand, as an inactive Lambda function does)."""
    if deployment == DeploymentStatus.FAILED:
        reason = (error or "its deployment failed").strip().splitlines()[0][:1024]
        update = {"LastUpdateStatus": "Failed", "LastUpdateStatusReason": reason,
                  "LastUpdateStatusReasonCode": "FunctionError"}
        if serving:
            return {"State": "Active", **update}
        return {"State": "Failed", "StateReason": reason, "StateReasonCode": "FunctionError",
                **update}
    if deployment in (DeploymentStatus.PENDING, DeploymentStatus.IN_PROGRESS):
        if serving:
            return {"State": "Active", "LastUpdateStatus": "InProgress"}
        return {"State": "Pending", "StateReason": "the version is being deployed",
                "StateReasonCode": "Creating", "LastUpdateStatus": "InProgress"}
    return {"State": "Active", "LastUpdateStatus": "Successful"}


def _functions(row: dict) -> list[str]:
    return sorted(json.loads(row["manifest"]).get("functions", {}))


def list_functions(db, query: dict):
    """ListFunctions: every declared function's $LATEST (with FunctionVersion=ALL, each of
    its versions too), by name, paged by Marker and MaxItems."""
    entries = []
    every = query.get("FunctionVersion") == "ALL"
    rows = store.versions(db) if every else []
    for row in store.serving(db):
        for function in _functions(row):
            entries.append(configuration(row, function, latest=True))
            entries += [configuration(r, function, latest=False) for r in rows
                        if r["container"] == row["container"] and function in _functions(r)]
    try:
        start = int(query.get("Marker") or 0)
        count = int(query.get("MaxItems") or MAX_ITEMS)
    except ValueError:
        raise LambdaError(400, "InvalidParameterValueException",
                          "Marker and MaxItems must be numbers (Marker as a previous answer's "
                          "NextMarker gave it)") from None
    count = max(1, min(count, 10_000))
    page = {"Functions": entries[start:start + count]}
    if start + count < len(entries):
        page["NextMarker"] = str(start + count)
    return "200 OK", [JSON], dumps(page)


def find(db, container: str, function: str | None, version: str | None) -> tuple[dict, str]:
    """The stored version row and function name a function name and version (None: the
    serving one) name; ResourceNotFoundException otherwise."""
    if version is None:
        rows = store.serving(db, container)
    else:
        rows = [r for r in store.versions(db, container) if r["version"] == version]
    shown = f"{container}.{function}" if function else container
    if not rows:
        raise not_found(f"Function not found: {function_arn(shown, version or LATEST)} "
                        f"(no container '{container}' with " +
                        (f"a version '{version}')" if version else "an active version)") +
                        "; `dockyard ls` lists them")
    row = rows[0]
    declared = _functions(row)
    function = function or only_function(declared, container)
    if function not in declared:
        raise not_found(f"Function not found: {function_arn(f'{container}.{function}')} "
                        f"(container '{container}' declares "
                        f"{', '.join(declared[:10]) or 'none'})")
    return row, function


def get_function(db, container: str, function: str | None, qualifier: str | None,
                 configuration_only: bool):
    """GetFunction (the configuration under "Configuration") or
    GetFunctionConfiguration."""
    version = None if qualifier in (None, "", LATEST) else qualifier
    row, function = find(db, container, function, version)
    config = configuration(row, function, latest=version is None)
    body = config if configuration_only else {"Configuration": config, "Tags": {}}
    return "200 OK", [JSON], dumps(body)

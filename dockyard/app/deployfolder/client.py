"""The deploy-folder watcher's calls to the control plane: the same upload, deployment and
container routes any client uses, so a dropped package takes the path of an API upload and
its failures are told in the API's own words."""

from __future__ import annotations

import re

from ...common.http_client import Client, ClientError, api_path

LOG_STAMP = re.compile(r"^\d\d:\d\d:\d\d ")   # of each line of a worker's build log
LOG_CAUSES = ("error:", "cause:", "caused by:")
LOG_DETAIL_CHARS = 300


class Unreachable(Exception):
    """The control plane did not answer (it is starting or stopping): try again later."""


class ControlPlane:
    def __init__(self, client: Client):
        self.client = client

    def _call(self, method: str, path: str, missing_ok: bool = False, **kwargs):
        try:
            return self.client.json(method, path, **kwargs)
        except ClientError as exc:
            status = getattr(exc, "status", None)
            if status is None:
                raise Unreachable(exc.message) from None
            if status == 404 and missing_ok:
                return None
            raise

    def upload(self, package: bytes) -> dict:
        """The version record, as `POST /api/containers` answers; a refused package raises
        ClientError with the API's message."""
        return self._call("POST", "/api/containers", data=package,
                          headers={"Content-Type": "application/octet-stream"})

    def deployment(self, deployment_id: str) -> dict | None:
        return self._call("GET", api_path("deployments", deployment_id), missing_ok=True)

    def container(self, name: str) -> dict | None:
        return self._call("GET", api_path("containers", name), missing_ok=True)

    def delete(self, name: str) -> None:
        self._call("DELETE", api_path("containers", name), missing_ok=True)

    def serving_version(self, name: str | None) -> str | None:
        """The version serving `name`'s calls, or None (none, or no answer)."""
        if not name:
            return None
        try:
            detail = self.container(name)
        except (Unreachable, ClientError):
            return None
        return detail.get("serving_version") if detail else None


def failure_reason(deployment: dict) -> str:
    """Why a deployment failed: the workers' one line, and the lines of the build log that
    say what went wrong (uv's `error:` and `cause:`), which that line may not carry."""
    reason = deployment.get("error") or ""
    details: list[str] = []
    for worker in deployment.get("workers") or []:
        reason = reason or worker.get("error") or ""
        for line in (worker.get("log") or "").splitlines():
            text = LOG_STAMP.sub("", line, count=1).strip()
            if text.startswith(LOG_CAUSES) and text not in details and text not in reason:
                details.append(text[:LOG_DETAIL_CHARS])
    reason = reason.strip().splitlines()[0] if reason.strip() else "the version failed to start"
    return reason + (f" (build log: {'; '.join(details)})" if details else "")

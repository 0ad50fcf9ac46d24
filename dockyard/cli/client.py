"""The HTTP client the CLI (and the deploy-folder scanner) uses: finds the server and token,
and turns every failure into one DockyardError with a message for people."""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests

from ..app.datadir import DataDir
from ..errors import DockyardError


class ClientError(DockyardError):
    type = "ClientError"


def discover(url: str | None, token: str | None, data: str | None) -> tuple[str, str | None]:
    """--url/DOCKYARD_URL and --token/DOCKYARD_TOKEN, else what `serve` wrote in the data dir."""
    data_dir = DataDir.at(data)
    if not url:
        try:
            url = json.loads(data_dir.server_json.read_text())["url"]
        except (OSError, ValueError, KeyError):
            url = "http://127.0.0.1:8080"
    if not token:
        token = data_dir.read_token("admin")
    return url.rstrip("/"), token


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 60.0):
        self.url = url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def request(self, method: str, path: str, expect=(200, 201, 202), **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, self.url + path, **kwargs)
        except requests.ConnectionError:
            raise ClientError(f"cannot reach dockyard at {self.url}; is `dockyard serve` "
                              "running? (set --url or DOCKYARD_URL)") from None
        except requests.Timeout:
            raise ClientError(f"dockyard at {self.url} did not answer in time") from None
        if response.status_code not in expect:
            raise self._error(response)
        return response

    @staticmethod
    def _error(response) -> ClientError:
        try:
            body = response.json()
            error = body.get("error") or {}
            message = error.get("message") or response.reason
            kind = error.get("type") or "Error"
        except ValueError:
            body, message, kind = {}, response.text.strip()[:200] or response.reason, "Error"
        exc = ClientError(f"{kind}: {message}")
        exc.status = response.status_code
        exc.body = body
        return exc

    def json(self, method: str, path: str, **kwargs):
        return self.request(method, path, **kwargs).json()

    def upload(self, package: bytes, activate: bool = True) -> dict:
        path = "/api/containers" + ("" if activate else "?activate=0")
        return self.json("POST", path, data=package,
                         headers={"Content-Type": "application/octet-stream"})

    def invoke(self, target: str, event_text: str | None, asynchronous: bool = False):
        headers = {"Content-Type": "application/json"}
        if asynchronous:
            headers["Prefer"] = "respond-async"
        return self.request("POST", f"/invoke/{target}", expect=tuple(range(100, 600)),
                            data=(event_text or "").encode(), headers=headers,
                            timeout=max(self.timeout, 930))


def package_bytes(path: str | os.PathLike) -> bytes:
    from ..common.archive import read_package
    p = Path(path)
    if not p.exists():
        raise ClientError(f"{path}: no such file or folder")
    return read_package(p)

"""dockyard's HTTP API as a client sees it: one session with the bearer token, and every
failure turned into one ClientError with a message for people (used by the CLI and by the
deploy-folder watcher)."""

from __future__ import annotations

from urllib.parse import quote

import requests

from ..errors import DockyardError


def api_path(*segments) -> str:
    """`/api/SEGMENT/...` with each segment quoted whole: a name holding `/`, `?` or `#` stays
    one path segment (and the server's 404 names it)."""
    return "/api/" + "/".join(quote(str(segment), safe="") for segment in segments)


class ClientError(DockyardError):
    type = "ClientError"


class Client:
    # What a 401's message adds (which token was sent and how to send another): the CLI's.
    unauthorized_hint = None

    def __init__(self, url: str, token: str | None, timeout: float = 60.0):
        self.url = url
        self.token = token
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
            raise self._error(response, self.token)
        return response

    @staticmethod
    def _error(response, token: str | None = None) -> ClientError:
        try:
            body = response.json()
            error = body.get("error") or {}
            message = error.get("message") or response.reason
            kind = error.get("type") or "Error"
        except ValueError:
            body, message, kind = {}, response.text.strip()[:200] or response.reason, "Error"
        if response.status_code == 401 and Client.unauthorized_hint:
            message = f"{message.rstrip('.')}; {Client.unauthorized_hint(token)}"
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

"""The CLI's side of the HTTP client (common/http_client.py): finds the server and the token
to send, and says in a 401 which token was sent and how to send another."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..app.datadir import DataDir, running_servers, server_alive
from ..common.http_client import Client, ClientError

# Where the token each Client of this process sends came from, for the message of a 401.
_TOKEN_SOURCES: dict[str | None, str] = {}


def discover(url: str | None, token: str | None, data: str | None) -> tuple[str, str | None]:
    """--url/DOCKYARD_URL and --token/DOCKYARD_TOKEN, else what `serve` wrote in the data dir.
    With no data dir named (neither --data nor DOCKYARD_HOME) and no server running from the
    default one, a server started in this folder with another data dir is found by the note
    it left (datadir.running_servers): the URL and token come from its data dir."""
    data_dir = DataDir.at(data)
    found = _server_url(data_dir)
    if found is None and not (data or os.environ.get("DOCKYARD_HOME")):
        for note in running_servers(Path.cwd()):
            other = DataDir(Path(note["data"]))
            if (other.root != data_dir.root and other.read_token("admin")
                    and (not url or url.rstrip("/") == note["url"])):
                data_dir, found = other, note["url"]
                break
    url = url or found or "http://127.0.0.1:8080"
    if token:
        _TOKEN_SOURCES[token] = "the token from --token or DOCKYARD_TOKEN"
    else:
        token = data_dir.read_token("admin")
        path = data_dir.token_path("admin")
        _TOKEN_SOURCES[token] = (f"the token in {path}" if token else
                                 f"no token ({path} does not exist)")
    return url.rstrip("/"), token


def _server_url(data_dir: DataDir) -> str | None:
    """The URL of the server running from `data_dir` (None if none is: no server.json, or
    one left by a server that is gone)."""
    try:
        record = json.loads(data_dir.server_json.read_text())
        url = record["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "pid" in record and not server_alive(record):
        return None
    return url


def token_hint(token: str | None) -> str:
    """Which token the CLI sent and how to send another, for a 401."""
    source = _TOKEN_SOURCES.get(token, "the token it was given" if token else "no token")
    return (f"the CLI sent {source}; point it at the server's data dir with --data DIR or "
            "DOCKYARD_HOME (or give the token in DOCKYARD_TOKEN)")


Client.unauthorized_hint = staticmethod(token_hint)


def package_bytes(path: str | os.PathLike) -> bytes:
    from ..common.archive import read_package
    p = Path(path)
    if not p.exists():
        raise ClientError(f"{path}: no such file or folder")
    return read_package(p)

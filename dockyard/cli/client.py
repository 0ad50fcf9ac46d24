"""The CLI's side of the HTTP client (common/http_client.py): finds the server and the token
to send, and says in a 401 which token was sent and how to send another.

Which server, from any folder: `--url`/DOCKYARD_URL, else the server running from the data dir
named by `--data`/DOCKYARD_HOME; with neither, the server running from `./.dockyard`, else one
started in this folder, else the most recent one this user runs (the notes `serve` leaves,
see datadir.running_servers). When several could be meant and one was picked, one line on
stderr says which and how to pick another."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..app.datadir import DataDir, running_servers, server_alive
from ..common.http_client import Client, ClientError

DEFAULT_URL = "http://127.0.0.1:8080"
SHOWN_OTHERS = 3

# Where the token each Client of this process sends came from, for the message of a 401.
_TOKEN_SOURCES: dict[str | None, "TokenSource"] = {}


@dataclass(frozen=True)
class TokenSource:
    text: str                     # for people: "the token in /x/tokens/admin"
    given_in: str | None = None   # "DOCKYARD_TOKEN" or "--token" when the user gave it


@dataclass
class Found:
    """The server the CLI talks to, the token it sends, and how it found both."""

    url: str
    token: str | None
    data_dir: Path | None          # the data dir the URL or the token came from, if any
    how: str                       # how the server was found, for people
    token_source: TokenSource
    choice: str | None = None      # said on stderr: several servers ran and one was picked

    def describe(self) -> list[str]:
        """What `--verbose` prints (on stderr)."""
        return [f"server: {self.url}, {self.how}",
                f"data dir: {self.data_dir or '-'}",
                f"token: {self.token_source.text}"]

    def as_json(self) -> dict:
        return {"url": self.url, "found_by": self.how,
                "data_dir": str(self.data_dir) if self.data_dir else None,
                "token": self.token_source.text}


def find_server(url: str | None, token: str | None, data: str | None,
                url_given_in: str = "--url", token_given_in: str = "--token") -> Found:
    """The server and token to use (see the module's docstring). `url_given_in` and
    `token_given_in` name where `url` and `token` came from, for people."""
    named = data or os.environ.get("DOCKYARD_HOME")
    data_dir = DataDir.at(data)
    choice = None
    from_data = False     # the URL came from a data dir (its server.json or a note)
    if named:
        served = _server_url(data_dir)
        how = (f"from {url_given_in}" if url else
               f"the server running from {data_dir.root} (its server.json)" if served else
               f"the default: no server runs from {data_dir.root}")
        url = url or served or DEFAULT_URL
    else:
        here = _server_url(data_dir)
        if here and (not url or _same(url, here)):
            from_data = True
            how = (f"from {url_given_in}, the server running from ./.dockyard" if url
                   else "the server running from ./.dockyard")
            url = here
        else:
            running = [note for note in running_servers()
                       if isinstance(note.get("url"), str) and isinstance(note.get("data"), str)
                       and (token or DataDir(Path(note["data"])).read_token("admin"))]
            candidates = [n for n in running if not url or _same(url, n["url"])]
            started_here = [n for n in candidates if n.get("cwd") == str(Path.cwd())]
            pool = started_here or candidates
            if pool:
                note = pool[0]
                from_data = True
                data_dir = DataDir(Path(note["data"]))
                how = _how(note, url, url_given_in, bool(started_here), len(pool))
                url = note["url"]
                if len(pool) > 1:
                    choice = _choice(note, pool, bool(started_here))
            elif url:
                how = f"from {url_given_in}"
            else:
                how = "the default: no running server of this user was found"
                url = DEFAULT_URL
    if token:
        source = TokenSource(f"the token given in {token_given_in}", token_given_in)
    else:
        token = data_dir.read_token("admin")
        path = data_dir.token_path("admin")
        source = TokenSource(f"the token in {path}" if token
                             else f"no token ({path} does not exist)")
    _TOKEN_SOURCES[token] = source
    # The data dir shown is the one the URL or the token came from (none: both were given).
    used = data_dir.root if named or from_data or not source.given_in else None
    return Found(url.rstrip("/"), token, used, how, source, choice)


def _same(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _how(note: dict, url: str | None, url_given_in: str, started_here: bool,
         among: int) -> str:
    pid = f"serve pid {note['pid']}, started in {note.get('cwd') or '?'}"
    if url:
        return f"from {url_given_in}; {pid}"
    if started_here:
        return (f"serve started in this folder (pid {note['pid']})" if among == 1 else
                f"the most recent of {among} serves started in this folder (pid {note['pid']})")
    if among == 1:
        return f"the one server this user runs ({pid})"
    return f"the most recent of {among} servers this user runs ({pid})"


def _choice(note: dict, pool: list[dict], started_here: bool) -> str:
    """The line said when several servers could be meant."""
    where = " started in this folder" if started_here else ""
    others = ", ".join(f"{n['url']} (--data {n['data']})" for n in pool[1:SHOWN_OTHERS + 1])
    if len(pool) > SHOWN_OTHERS + 1:
        others += f" and {len(pool) - SHOWN_OTHERS - 1} more"
    return (f"note: {len(pool)} dockyard servers{where} are running; using the most recent, "
            f"{note['url']} (data {note['data']}); pick one with --data DIR or --url URL "
            f"(the others: {others})")


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
    source = _TOKEN_SOURCES.get(token) or TokenSource(
        "the token it was given" if token else "no token")
    if source.given_in:
        unset = ("leave --token out" if source.given_in == "--token"
                 else f"unset {source.given_in}")
        return (f"the CLI sent {source.text}, which this server refused: give its admin "
                f"token there instead, or {unset} to let the CLI read it from the server's "
                "data dir")
    return (f"the CLI sent {source.text}; point it at the server's data dir with --data DIR or "
            "DOCKYARD_HOME (or give the token in DOCKYARD_TOKEN)")


Client.unauthorized_hint = staticmethod(token_hint)


def package_bytes(path: str | os.PathLike) -> bytes:
    from ..common.archive import read_package
    p = Path(path)
    if not p.exists():
        raise ClientError(f"{path}: no such file or folder")
    return read_package(p)

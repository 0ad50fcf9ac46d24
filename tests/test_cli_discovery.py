"""The CLI finds a running local server from any folder: the one running from ./.dockyard, else
one started in this folder, else the most recent one of this user (from the notes `serve`
leaves), saying in one line which it picked when several run. Real `serve` processes (no
worker), each test with its own XDG_STATE_HOME so that no other server on the machine is
seen."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import terminate


def cli_env(state: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
    env["XDG_STATE_HOME"] = str(state)   # where serve leaves its note, and the CLI looks
    return env


def run(folder: Path, env: dict, *args: str, stdin: str | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockyard", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120, input=stdin)


class Serve:
    """`dockyard [--data DIR] serve --no-local-worker` started in `folder`."""

    def __init__(self, folder: Path, env: dict, data: Path | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.data = data or folder / ".dockyard"
        args = ["--data", str(data)] if data else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dockyard", *args, "serve", "--port", "0",
             "--no-local-worker", "--no-deploy-dir"], cwd=folder, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        line = self.proc.stdout.readline()
        match = re.search(r"dockyard listening on (http://\S+)", line)
        if not match:
            self.stop()
            raise AssertionError(f"serve did not start: {line!r}")
        self.url = match.group(1)

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture
def place(private_tmp, tmp_path):
    """Folders of a user's: where servers are started, and a package folder elsewhere."""
    root = private_tmp / f"find-{tmp_path.name}"
    root.mkdir()
    env = cli_env(tmp_path / "state")
    package = root / "elsewhere" / "mything"
    package.parent.mkdir()
    done = run(package.parent, env, "init", "mything")
    assert done.returncode == 0, done.stderr
    servers: list[Serve] = []

    def serve(folder: str, data: str | None = None) -> Serve:
        started = Serve(root / folder, env, root / data if data else None)
        servers.append(started)
        return started

    yield root, env, package, serve
    for started in servers:
        started.stop()
    notes = tmp_path / "state" / "dockyard" / "servers"
    assert not notes.exists() or not list(notes.glob("*.json"))   # each serve took its note


def used(folder: Path, env: dict, *args: str) -> tuple[str, list[str]]:
    """(the URL of the server `dockyard status` reached from `folder`, its stderr lines)."""
    done = run(folder, env, *args, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["server"]["url"], done.stderr.splitlines()


def error_line(done) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: "), done.stderr
    return line


def test_the_cli_finds_the_server_from_any_folder(place):
    root, env, package, serve = place
    first = serve("first")     # default data dir: first/.dockyard
    # `cd mything && dockyard deploy .`: no ./.dockyard here, the note names the server.
    deployed = run(package, env, "deploy", ".")
    assert deployed.returncode == 0, deployed.stderr
    assert "mything@" in deployed.stdout and "uploaded" in deployed.stdout
    assert deployed.stderr == ""
    assert used(package, env) == (first.url, [])
    verbose = run(package, env, "ls", "-v")
    assert verbose.returncode == 0 and "mything" in verbose.stdout
    assert verbose.stderr.splitlines() == [
        f"server: {first.url}, the one server this user runs (serve pid {first.proc.pid}, "
        f"started in {first.folder})",
        f"data dir: {first.data}",
        f"token: the token in {first.data / 'tokens' / 'admin'}"]
    status = run(package, env, "status")
    assert f"found   the one server this user runs (serve pid {first.proc.pid}" in status.stdout
    assert f"sent the token in {first.data / 'tokens' / 'admin'}" in status.stdout
    cli = json.loads(run(package, env, "status", "--json").stdout)["cli"]
    assert cli == {"url": first.url, "data_dir": str(first.data),
                   "found_by": f"the one server this user runs (serve pid {first.proc.pid}, "
                               f"started in {first.folder})",
                   "token": f"the token in {first.data / 'tokens' / 'admin'}"}

    # A second server, started later with a data dir elsewhere: the most recent one.
    second = serve("second", data="second-data")
    url, lines = used(package, env)
    assert url == second.url
    assert lines == [
        f"note: 2 dockyard servers are running; using the most recent, {second.url} (data "
        f"{second.data}); pick one with --data DIR or --url URL (the others: {first.url} "
        f"(--data {first.data}))"]
    # In the folder a server was started in, that one, without a word.
    assert used(first.folder, env) == (first.url, [])
    assert used(second.folder, env) == (second.url, [])
    # Picked by its data dir or its URL (the token then comes from its note's data dir).
    assert used(package, env, "--data", str(first.data)) == (first.url, [])
    assert used(package, dict(env, DOCKYARD_HOME=str(first.data))) == (first.url, [])
    assert used(package, env, "--url", first.url) == (first.url, [])
    picked = run(package, env, "--url", first.url, "-v", "ls")
    assert picked.returncode == 0
    assert f"token: the token in {first.data / 'tokens' / 'admin'}" in picked.stderr
    assert "note:" not in picked.stderr

    # A wrong DOCKYARD_TOKEN: said to be refused, and where the right one is.
    wrong = run(package, dict(env, DOCKYARD_TOKEN="dya_wrong"), "ls")
    line = error_line(wrong)
    assert line == (
        "Error: Unauthorized: wrong token: not a token of this server (its admin token is in "
        f"{second.data / 'tokens' / 'admin'}); the CLI sent the token given in DOCKYARD_TOKEN, "
        "which this server refused: give its admin token there instead, or unset "
        "DOCKYARD_TOKEN to let the CLI read it from the server's data dir"), line
    assert "give the token in DOCKYARD_TOKEN" not in wrong.stderr

    # Once the most recent one is gone, the other one again, without a word.
    second.stop()
    assert used(package, env) == (first.url, [])


def test_several_servers_started_in_one_folder(place):
    root, env, package, serve = place
    older = serve("here", data="here/one")
    newer = serve("here", data="here/two")
    url, lines = used(older.folder, env)
    assert url == newer.url
    assert len(lines) == 1 and lines[0].startswith(
        "note: 2 dockyard servers started in this folder are running; using the most recent, "
        f"{newer.url}"), lines
    # From elsewhere, the most recent of all.
    assert used(package, env)[0] == newer.url
    # With no server running: the default URL, and -v says why.
    older.stop()
    newer.stop()
    alone = run(package, env, "-v", "ls")
    assert alone.stderr.splitlines()[0] == ("server: http://127.0.0.1:8080, the default: no "
                                            "running server of this user was found")

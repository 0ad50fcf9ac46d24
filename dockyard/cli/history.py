"""`dockyard deployments NAME|ID`, `dockyard invocations [NAME]` and `dockyard logs ID|NAME
[--follow]`: what a deploy did on each worker, and the calls that were made."""

from __future__ import annotations

import json
import re
import time

import click

from ..common.http_client import api_path
from . import Command, pass_ctx, _age, _table
from .client import ClientError
from .jobs import _duration

DEPLOYMENT_ID_RE = re.compile(r"dep_.*")  # container names have no "_"


class WorkerNames:
    """Worker ids to names, for people (records keep the id; a worker forgotten since shows
    by its id). Looked up once, and again for an id not seen yet (a new worker, when
    following), at most every few seconds."""

    REFRESH_S = 5.0

    def __init__(self, client):
        self.client = client
        self.names: dict[str, str] | None = None
        self.fetched = 0.0

    def __call__(self, worker_id: str | None) -> str:
        if not worker_id:
            return "-"
        stale = time.monotonic() - self.fetched > self.REFRESH_S
        if self.names is None or (worker_id not in self.names and stale):
            try:
                workers = self.client.json("GET", "/api/workers")["workers"]
                self.names = {w["id"]: w["name"] for w in workers}
            except ClientError:
                self.names = self.names or {}
            self.fetched = time.monotonic()
        return self.names.get(worker_id) or worker_id



@click.command(cls=Command, short_help="Show a deployment (NAME: its latest) and build logs.")
@click.argument("target", metavar="NAME|ID")
@pass_ctx
def deployments(ctx, target):
    """Show a deployment (NAME: the container's latest one): its state on each worker and
    the build log."""
    client = ctx.client()
    deployment_id = target
    if not DEPLOYMENT_ID_RE.fullmatch(target):
        deployment_id = client.json("GET", api_path("containers", target)).get("last_deployment")
        if not deployment_id:
            raise click.ClickException(f"{target} has no deployment yet; activate a version "
                                       f"with `dockyard rollback {target} VERSION`")
    try:
        deployment = client.json("GET", api_path("deployments", deployment_id))
    except ClientError as exc:
        if getattr(exc, "status", None) != 404 or deployment_id != target:
            raise
        raise click.ClickException(f"no deployment with id '{target}'; `dockyard deployments "
                                   "NAME` shows a container's latest one") from None
    ctx.emit(deployment, show_deployment)


def show_deployment(d: dict) -> None:
    """A deployment for people: its state, each worker's state and the build logs."""
    click.echo(f"{d['id']}  {d['container']}@{d['version']}  {d['status']}  created "
               f"{_age(d['created_at'])}  finished {_age(d['finished_at'])}")
    if d.get("error"):
        click.echo(f"error: {d['error'].splitlines()[0]}")
    if not d["workers"]:
        click.echo("no worker has taken it yet")
        return
    _table([[w.get("name") or w["worker"], w["state"],
             (w.get("error") or "-").splitlines()[0][:70]]
            for w in d["workers"]], ["WORKER", "STATE", "ERROR"])
    for w in d["workers"]:
        if w.get("log"):
            click.echo(f"--- build log of {w.get('name') or w['worker']}")
            click.echo(w["log"].rstrip("\n"))


@click.command(cls=Command, short_help="List recent invocations (of container NAME).")
@click.argument("name", required=False)
@click.option("--status", help="Only calls with this status (succeeded, failed, …).")
@click.option("--since", help="Only calls made in this last stretch: 90s, 10m, 2h, 7d.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many calls to list, newest first (1 to 1000).")
@pass_ctx
def invocations(ctx, name, status, since, limit):
    """List recent invocations, newest first (of container NAME, if given)."""
    params = {"limit": limit}
    for key, value in (("container", name), ("status", status), ("since", since)):
        if value:
            params[key] = value
    client = ctx.client()
    data = client.json("GET", "/api/invocations", params=params)

    def human(d):
        if not d["invocations"]:
            click.echo("no invocations" + (f" of {name}" if name else "")
                       + (" match" if status or since else " yet"))
            return
        worker = WorkerNames(client)
        _table([[i["id"], f"{i['container']}@{i['version'] or '-'}/{i['function']}",
                 i["status"], i["trigger"], _duration(i["duration_ms"]),
                 worker(i.get("worker_id")), _age(i["created_at"])]
                for i in d["invocations"]],
               ["ID", "CALL", "STATUS", "TRIGGER", "DURATION", "WORKER", "TIME"])
    ctx.emit(data, human)


INVOCATION_ID_RE = re.compile(r"inv_.*")  # container names have no "_"
RECENT = 20
PAGE = 200
POLL_S = 0.5


@click.command(cls=Command, short_help="Show a call (ID), or a container's calls (NAME).")
@click.argument("target", metavar="ID|NAME")
@click.option("--follow", "-f", is_flag=True,
              help="NAME: print each call as it finishes, until Ctrl-C; ID: print what the "
                   "call prints as it runs, then its end.")
@pass_ctx
def logs(ctx, target, follow):
    """Show one invocation (ID): status, timing, output, error. For a container NAME: its
    last 20 calls, oldest first; with --follow, each new one as it finishes."""
    client = ctx.client()
    worker = WorkerNames(client)
    if INVOCATION_ID_RE.fullmatch(target):
        call = _invocation(client, target)
        if follow and call["status"] in ("queued", "running"):
            if ctx.as_json:
                call = _wait_end(client, call)
            else:
                _follow_call(client, call, worker)
                return
        ctx.emit(call, lambda i: show_invocation(i, worker))
        return
    recent = client.json("GET", "/api/invocations",
                         params={"container": target, "limit": RECENT, "full": 1})
    if not recent["invocations"]:
        _check_container(client, target)
    calls = list(reversed(recent["invocations"]))
    if not follow:
        def human(d):
            if not d["invocations"]:
                click.echo(f"no invocations of {target} yet")
            for i in d["invocations"]:
                show_invocation(i, worker)
        ctx.emit({"container": target, "invocations": calls}, human)
        return
    try:
        # Calls still under way are printed once they finish, from the cursor on.
        for call in calls:
            if call["status"] not in ("queued", "running"):
                _print_call(ctx, call, worker)
        _follow(ctx, client, target, recent["cursor"], worker)
    except KeyboardInterrupt:
        pass   # Ctrl-C is how a follow ends


def _wait_end(client, call: dict) -> dict:
    """The call's record once it ended (or as it stands at Ctrl-C)."""
    try:
        while call["status"] in ("queued", "running"):
            time.sleep(POLL_S)
            call = _invocation(client, call["id"])
    except KeyboardInterrupt:
        pass
    return call


def _follow_call(client, call: dict, worker: "WorkerNames") -> None:
    """A call under way, for people: what it prints as it prints it, then its end (REPORT,
    result or error). Ctrl-C stops following, not the call."""
    click.echo(f"{call['id']} is {call['status']}; following it (Ctrl-C stops following, "
               "not the call)", err=True)
    shown = {"stdout": "", "stderr": ""}
    try:
        while call["status"] in ("queued", "running"):
            for stream in ("stdout", "stderr"):
                text = call.get(stream) or ""
                if call.get("output_so_far") and text != shown[stream]:
                    click.echo(_new_part(shown[stream], text), nl=False,
                               err=stream == "stderr")
                    shown[stream] = text
            time.sleep(POLL_S)
            call = _invocation(client, call["id"])
    except KeyboardInterrupt:
        return
    for stream in ("stdout", "stderr"):
        text = call.get(stream) or ""
        if text != shown[stream]:
            click.echo(_new_part(shown[stream], text), nl=False, err=stream == "stderr")
    show_invocation(call, worker, streams=not any(shown.values()))


def _new_part(shown: str, text: str) -> str:
    """What `text` (a call's output so far, read whole each time: past 64 KB its start and
    its end, a line between them saying how much was left out) adds to `shown`."""
    if text.startswith(shown):
        return text[len(shown):]
    anchor = shown[-512:]
    at = text.rfind(anchor) if anchor else -1
    if at != -1:
        return text[at + len(anchor):]
    # More was printed since the last look than is kept: from the line that says so.
    gap = text.rfind("[... ")
    return text[gap:] if gap != -1 else text


def _invocation(client, invocation_id: str) -> dict:
    try:
        return client.json("GET", api_path("invocations", invocation_id))
    except ClientError as exc:
        if getattr(exc, "status", None) != 404:
            raise
        raise click.ClickException(
            f"no invocation with id '{invocation_id}' (records older than serve's "
            "--keep-invocations are removed); `dockyard invocations` lists recent ones"
        ) from None


def _check_container(client, name: str) -> None:
    try:
        client.json("GET", api_path("containers", name))
    except ClientError as exc:
        if getattr(exc, "status", None) != 404:
            raise
        raise click.ClickException(f"{name} is neither an invocation id (inv_…) nor a "
                                   "container; `dockyard ls` lists containers") from None


def _follow(ctx, client, name: str, cursor: int, worker: WorkerNames) -> None:
    while True:
        page = client.json("GET", "/api/invocations",
                           params={"container": name, "after": cursor, "limit": PAGE,
                                   "full": 1})
        for call in page["invocations"]:
            _print_call(ctx, call, worker)
        cursor = page["cursor"]
        if len(page["invocations"]) < PAGE:
            time.sleep(POLL_S)


def _print_call(ctx, call: dict, worker: WorkerNames) -> None:
    if ctx.as_json:
        click.echo(json.dumps(call, sort_keys=True))   # one object a line
    else:
        show_invocation(call, worker)


def show_invocation(i: dict, worker=lambda worker_id: worker_id or "-",
                    streams: bool = True) -> None:
    """One call for people: what ran, the REPORT line, its output, and its error (`streams`:
    its stdout and stderr too, unless they were printed as it ran)."""
    version = i["version"] or ("(serving)" if i["status"] == "queued" else "-")
    click.echo(f"{i['id']}  {i['container']}@{version}/{i['function']}  "
               f"{i['status']}  trigger={i['trigger']} attempt={i['attempt']}")
    if i["status"] in ("queued", "running"):
        since = i.get("started_at") or i.get("created_at")
        click.echo(f"{i['status']} for {max(0.0, time.time() - since):.1f} s on worker "
                   f"{worker(i.get('worker_id'))}; `dockyard logs {i['id']} --follow` "
                   "follows it to its end" if since else i["status"])
        for stream in ("stdout", "stderr"):
            if i.get("output_so_far") and i.get(stream):
                click.echo(f"--- {stream} so far")
                click.echo(i[stream].rstrip("\n"))
        return
    duration = f"{i['duration_ms']:.2f} ms" if i["duration_ms"] is not None else "-"
    memory = f"{i['max_rss_kb'] / 1024:.1f} MB" if i["max_rss_kb"] else "-"
    click.echo(f"REPORT duration: {duration}  max memory used: {memory}  "
               f"cold start: {'-' if i['cold'] is None else 'yes' if i['cold'] else 'no'}  "
               f"worker: {worker(i.get('worker_id'))}")
    for stream in ("stdout", "stderr") if streams else ():
        if i.get(stream):
            click.echo(f"--- {stream}")
            click.echo(i[stream].rstrip("\n"))
    if i.get("error"):
        click.echo(f"--- error: {i['error'].get('type')}: {i['error'].get('message')}")
        if i["error"].get("traceback"):
            click.echo(i["error"]["traceback"].rstrip("\n"))
    elif i["status"] == "succeeded":
        click.echo("--- output")
        click.echo(json.dumps(i.get("output")))

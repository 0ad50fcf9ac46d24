"""`dockyard deployments NAME|ID` and `dockyard invocations [NAME]`: what a deploy did on each
worker, and the calls that were made."""

from __future__ import annotations

import re

import click

from . import Command, Context, _age, _table
from .jobs import _duration

DEPLOYMENT_ID_RE = re.compile(r"dep_[0-9a-f]+")  # container names have no "_"

pass_ctx = click.make_pass_decorator(Context)


@click.command(cls=Command)
@click.argument("target", metavar="NAME|ID")
@pass_ctx
def deployments(ctx, target):
    """Show a deployment (NAME: the container's latest one): its state on each worker and
    the build log."""
    client = ctx.client()
    deployment_id = target
    if not DEPLOYMENT_ID_RE.fullmatch(target):
        deployment_id = client.json("GET", f"/api/containers/{target}").get("last_deployment")
        if not deployment_id:
            raise click.ClickException(f"{target} has no deployment yet; activate a version "
                                       f"with `dockyard rollback {target} VERSION`")
    data = client.json("GET", f"/api/deployments/{deployment_id}")

    def human(d):
        click.echo(f"{d['id']}  {d['container']}@{d['version']}  {d['status']}  created "
                   f"{_age(d['created_at'])}  finished {_age(d['finished_at'])}")
        if d.get("error"):
            click.echo(f"error: {d['error'].splitlines()[0]}")
        if not d["workers"]:
            click.echo("no worker has taken it yet")
            return
        _table([[w["worker"], w["state"], (w.get("error") or "-").splitlines()[0][:70]]
                for w in d["workers"]], ["WORKER", "STATE", "ERROR"])
        for w in d["workers"]:
            if w.get("log"):
                click.echo(f"--- build log of {w['worker']}")
                click.echo(w["log"].rstrip("\n"))
    ctx.emit(data, human)


@click.command(cls=Command)
@click.argument("name", required=False)
@click.option("--status", help="Only calls with this status (succeeded, failed, …).")
@click.option("--since", help="Only calls made in this last stretch: 90s, 10m, 2h, 7d.")
@click.option("--limit", type=int, default=20, show_default=True)
@pass_ctx
def invocations(ctx, name, status, since, limit):
    """List recent invocations, newest first (of container NAME, if given)."""
    params = {"limit": limit}
    for key, value in (("container", name), ("status", status), ("since", since)):
        if value:
            params[key] = value
    data = ctx.client().json("GET", "/api/invocations", params=params)

    def human(d):
        if not d["invocations"]:
            click.echo("no invocations" + (f" of {name}" if name else "")
                       + (" match" if status or since else " yet"))
            return
        _table([[i["id"], f"{i['container']}@{i['version'] or '-'}/{i['function']}",
                 i["status"], i["trigger"], _duration(i["duration_ms"]),
                 _age(i["created_at"])] for i in d["invocations"]],
               ["ID", "CALL", "STATUS", "TRIGGER", "DURATION", "TIME"])
    ctx.emit(data, human)

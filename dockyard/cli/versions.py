"""`dockyard versions NAME` (the versions of a container) and `dockyard versions prune NAME
--keep N` (delete old ones)."""

from __future__ import annotations

import click

from ..common.http_client import api_path
from ..common.protocol import DeploymentStatus
from . import ListByDefault, pass_ctx, _age, _table


@click.group(cls=ListByDefault, subcommand_metavar="NAME | ls NAME | prune NAME --keep N",
             short_help="List the versions of container NAME, or prune old ones.")
def versions():
    """List the versions of container NAME, or prune old ones."""


@versions.command(name="ls", short_help="List the versions of a container, newest first.")
@click.argument("name")
@pass_ctx
def list_versions(ctx, name):
    """List the versions of a container, newest first (`dockyard versions NAME` too)."""
    data = ctx.client().json("GET", api_path("containers", name, "versions"))

    def human(d):
        _table([[v["version"], _state(v), v["content_sha256"][:12], _age(v["created_at"])]
                for v in d["versions"]], ["VERSION", "STATE", "CONTENT", "CREATED"])
    ctx.emit(data, human)


@versions.command(short_help="Delete the versions of NAME older than its N newest.")
@click.argument("name")
@click.option("--keep", metavar="N", help="How many of the newest versions to keep (N >= 1).")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@pass_ctx
def prune(ctx, name, keep, dry_run):
    """Delete the versions of NAME older than its N newest. The serving and the active version
    are always kept, and so is a version a worker runs, a deployment in progress is for, or
    calls are queued or running on."""
    try:
        keep_n = int(keep)
    except (TypeError, ValueError):
        keep_n = 0
    if keep_n < 1:
        raise click.ClickException("say how many of the newest versions to keep: --keep N, "
                                   "with N a whole number of at least 1")
    data = ctx.client().json("POST", api_path("containers", name, "versions", "prune"),
                             json={"keep": keep_n, "dry_run": dry_run})

    def human(d):
        gone = [v["version"] for v in d["deleted"]]
        verb = "would delete" if d["dry_run"] else "deleted"
        if gone:
            artifacts = "" if d["dry_run"] else \
                f" ({len(d['artifacts_removed'])} package file(s) removed)"
            click.echo(f"{name}: {verb} {len(gone)} version(s): {', '.join(gone)}{artifacts}")
        else:
            click.echo(f"{name}: nothing to delete")
        if d["kept"]:
            click.echo("kept:")
            _table([[v["version"], ", ".join(v["reasons"])] for v in d["kept"]],
                   ["VERSION", "WHY"])
    ctx.emit(data, human)


def _failed_to_deploy(version: dict) -> bool:
    return (version.get("last_deployment") or {}).get("status") == DeploymentStatus.FAILED


def _state(version: dict) -> str:
    if version["serving"]:
        return "serving"
    if version["active"]:
        return "active"
    return "failed to deploy" if _failed_to_deploy(version) else ""


def previous_version(client, name: str) -> tuple[str, str, list[str]]:
    """(the version serving, the one to roll back to, the ones skipped between them): the
    newest version uploaded before the one serving (or, with none serving, the active one)
    whose last deployment did not fail and that no live worker reports failed."""
    # newest first
    listed = client.json("GET", api_path("containers", name, "versions"))["versions"]
    current = (next((v for v in listed if v["serving"]), None)
               or next((v for v in listed if v["active"]), None))
    if current is None:
        raise click.ClickException(f"{name} has no version serving or active to roll back "
                                   f"from; name the one to deploy: dockyard rollback {name} "
                                   f"VERSION (dockyard versions {name} lists them)")
    failed = {v["version"] for w in client.json("GET", "/api/workers")["workers"]
              if w["state"] == "up" for v in w["versions"]
              if v["container"] == name and v["state"] == "failed"}
    failed |= {v["version"] for v in listed if _failed_to_deploy(v)}
    older = listed[listed.index(current) + 1:]
    for n, candidate in enumerate(older):
        if candidate["version"] not in failed:
            return (current["version"], candidate["version"],
                    [v["version"] for v in older[:n]])
    why = ("the others before it failed to deploy" if older
           else "it is the oldest version it has")
    state = "serves" if current["serving"] else "is active"
    raise click.ClickException(f"{name}@{current['version']} {state} and there is no version "
                               f"before it to roll back to ({why}); name one: dockyard "
                               f"rollback {name} VERSION (dockyard versions {name} lists them)")

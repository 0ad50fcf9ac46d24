"""`dockyard versions NAME` (the versions of a container) and `dockyard versions prune NAME
--keep N` (delete old ones)."""

from __future__ import annotations

import click

from . import Group, pass_ctx, _age, _table



class VersionsGroup(Group):
    """A first word that is not one of its commands is a container's NAME: `dockyard versions
    NAME` is `dockyard versions ls NAME`, as it was before `prune` existed."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "ls", self.commands["ls"], args
        return super().resolve_command(ctx, args)


@click.group(cls=VersionsGroup, subcommand_metavar="NAME | ls NAME | prune NAME --keep N")
def versions():
    """List the versions of container NAME, or prune old ones."""


@versions.command(name="ls")
@click.argument("name")
@pass_ctx
def list_versions(ctx, name):
    """List the versions of a container, newest first (`dockyard versions NAME` too)."""
    data = ctx.client().json("GET", f"/api/containers/{name}/versions")

    def human(d):
        _table([[v["version"], "serving" if v["serving"] else ("active" if v["active"] else ""),
                 v["content_sha256"][:12], _age(v["created_at"])] for v in d["versions"]],
               ["VERSION", "STATE", "CONTENT", "CREATED"])
    ctx.emit(data, human)


@versions.command()
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
    data = ctx.client().json("POST", f"/api/containers/{name}/versions/prune",
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

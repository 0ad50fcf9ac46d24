"""`dockyard aliases NAME` (a container's aliases), `dockyard aliases set NAME ALIAS VERSION
[--extra VERSION=SHARE]` and `dockyard aliases rm NAME ALIAS`: the aliases the Lambda API
speaks of, without a signed request."""

from __future__ import annotations

import click

from ..common.http_client import api_path
from . import ListByDefault, pass_ctx, _age, _table
from .traffic import parse_share, percent


@click.group(cls=ListByDefault, subcommand_metavar="NAME | ls NAME | set NAME ALIAS VERSION | "
             "rm NAME ALIAS", short_help="List, set or remove the aliases of container NAME.")
def aliases():
    """List, set or remove the aliases of container NAME: a name for one of its versions (or
    $LATEST, the serving one) that callers use where they use a version (NAME@ALIAS), with
    at most one more version taking a share of its calls."""


def words(alias: dict) -> str:
    """`v1`, or `v1 90% · v2 10%`."""
    if not alias["extra"]:
        return alias["version"]
    (extra, share), = alias["extra"].items()
    return f"{alias['version']} {percent(1 - share)} · {extra} {percent(share)}"


@aliases.command(name="ls", short_help="List the aliases of a container.")
@click.argument("name")
@pass_ctx
def list_aliases(ctx, name):
    """List the aliases of container NAME and the versions they name."""
    data = ctx.client().json("GET", api_path("containers", name, "aliases"))

    def human(d):
        if not d["aliases"]:
            click.echo(f"{name} has no aliases (dockyard aliases set {name} ALIAS VERSION "
                       "makes one)")
            return
        _table([[a["name"], words(a), _age(a["updated_at"]), a["description"] or "-"]
                for a in d["aliases"]], ["ALIAS", "VERSIONS", "CHANGED", "DESCRIPTION"])
    ctx.emit(data, human)


@aliases.command(name="set", short_help="Create alias ALIAS of NAME, or point it elsewhere.")
@click.argument("name")
@click.argument("alias")
@click.argument("version", required=False)
@click.option("--extra", metavar="VERSION=SHARE",
              help="Send this share of the alias's calls to another version (v2=10%); "
                   "--extra '' ends that.")
@click.option("--description", help="A note on what the alias is for.")
@pass_ctx
def set_alias(ctx, name, alias, version, extra, description):
    """Create alias ALIAS of container NAME for VERSION (a version, or $LATEST), or change what
    an existing one names. The versions it names are kept running on every worker."""
    body = {}
    if version is not None:
        body["version"] = version
    if extra is not None:
        body["extra"] = dict([parse_share(extra)]) if extra else {}
    if description is not None:
        body["description"] = description
    if not body:
        raise click.UsageError("say what ALIAS names: VERSION, --extra or --description")
    data = ctx.client().json("PUT", api_path("containers", name, "aliases", alias), json=body)
    ctx.emit(data, lambda a: click.echo(f"{name}@{a['name']} -> {words(a)}"))


@aliases.command(name="rm", short_help="Remove alias ALIAS of container NAME.")
@click.argument("name")
@click.argument("alias")
@pass_ctx
def remove_alias(ctx, name, alias):
    """Remove alias ALIAS of container NAME: calls naming it get a 404 from now on."""
    data = ctx.client().json("DELETE", api_path("containers", name, "aliases", alias))
    ctx.emit(data, lambda d: click.echo(f"{name}@{alias} removed"))

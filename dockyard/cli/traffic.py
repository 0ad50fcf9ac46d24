"""`dockyard traffic NAME [VERSION=SHARE ...]`: show or set how a container's calls are split
between its serving version and others (a gradual rollout)."""

from __future__ import annotations

import click

from ..common.http_client import api_path
from . import Command, pass_ctx, _table


def parse_share(text: str) -> tuple[str, float]:
    """`v2=10%` or `v2=0.1` -> ("v2", 0.1)."""
    version, sep, share = text.partition("=")
    if not sep or not version or not share:
        raise click.BadParameter(f"'{text}' is not VERSION=SHARE; e.g. v2=10% (or v2=0.1)",
                                 param_hint="VERSION=SHARE")
    try:
        if share.endswith("%"):
            weight = float(share[:-1]) / 100.0
        else:
            weight = float(share)
            if weight > 1:
                raise click.BadParameter(
                    f"'{text}': a share above 1 needs a % sign ({share}% of the calls?)",
                    param_hint="VERSION=SHARE")
    except ValueError:
        raise click.BadParameter(f"'{text}': the share is a percentage (10%) or a fraction "
                                 "(0.1)", param_hint="VERSION=SHARE") from None
    if not 0.0 <= weight <= 1.0:
        raise click.BadParameter(f"'{text}': a share is from 0% to 100%",
                                 param_hint="VERSION=SHARE")
    return version, weight


def percent(weight: float) -> str:
    text = f"{weight * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def split_words(traffic: dict) -> str:
    """`v1 90% · v2 10%`, the serving version first."""
    weights = traffic.get("weights") or {}
    return " · ".join(f"{version} {percent(w)}" for version, w in weights.items())


@click.command(cls=Command, short_help="Show or split NAME's calls between versions.")
@click.argument("name")
@click.argument("shares", nargs=-1, metavar="[VERSION=SHARE]...")
@click.option("--reset", is_flag=True, help="End the split: the serving version takes every "
                                            "call again.")
@pass_ctx
def traffic(ctx, name, shares, reset):
    """Show how NAME's calls (those that name no version) are split between its serving
    version and others; with VERSION=SHARE (`v2=10%` or `v2=0.1`), give VERSION that share
    and the serving version the rest. A version with no instance ready yet has its share
    served by the serving version; a deploy or rollback ends the split."""
    path = api_path("containers", name, "traffic")
    client = ctx.client()
    if reset and shares:
        raise click.UsageError("give VERSION=SHARE or --reset, not both")
    if reset or shares:
        weights = dict(parse_share(s) for s in shares)
        data = client.json("POST", path, json={"weights": weights})
    else:
        data = client.json("GET", path)

    def human(d):
        if not d.get("serving"):
            click.echo(f"{name} has no serving version: deploy one first")
            return
        rows = [[version, percent(w), "serving" if version == d["serving"] else ""]
                for version, w in d["weights"].items()]
        _table(rows, ["VERSION", "SHARE", ""])
        if len(d["weights"]) == 1:
            click.echo(f"(no split: `dockyard traffic {name} VERSION=10%` sends a share of "
                       "the calls to another version)")
    ctx.emit(data, human)

"""`dockyard status [NAME]`: the server, its workers and every container at a glance; with
NAME, that container in detail with its last deployment."""

from __future__ import annotations

import click

from ..common.http_client import api_path
from . import Command, pass_ctx, _age, _table
from .history import show_deployment
from .aliases import words as alias_words
from .traffic import split_words



@click.command(cls=Command, short_help="The server, workers and containers; or container NAME.")
@click.argument("name", required=False)
@pass_ctx
def status(ctx, name):
    """The server (and how the CLI found it: which server, data dir and token), workers and
    containers (serving version, last deployment, instances, last error); with NAME, that
    container in detail with its last deployment and build log."""
    client = ctx.client()
    if name:
        container = client.json("GET", api_path("containers", name))
        deployment = None
        if container.get("last_deployment"):
            deployment = client.json("GET", api_path("deployments", container['last_deployment']))
        workers = client.json("GET", "/api/workers")["workers"]
        held = [{"worker": w["id"], "worker_name": w["name"], "worker_state": w["state"],
                 **v}
                for w in workers for v in w["versions"] if v["container"] == name]
        named = client.json("GET", api_path("containers", name, "aliases"))["aliases"]
        ctx.emit({"container": container, "deployment": deployment, "workers": held,
                  "aliases": named}, _show_container)
        return
    data = {"server": client.json("GET", "/api/server"),
            "cli": ctx.find().as_json(),
            "workers": client.json("GET", "/api/workers")["workers"],
            "containers": client.json("GET", "/api/containers")["containers"]}
    ctx.emit(data, _show_overview)


def _show_overview(d: dict) -> None:
    s = d["server"]
    up = f"up {_uptime(s['uptime_s'])}" if s.get("uptime_s") is not None else "uptime unknown"
    click.echo(f"server  {s.get('url') or '-'}  dockyard {s.get('version') or '?'}  {up}  "
               f"data {s['data_dir']}")
    found = d["cli"]
    click.echo(f"found   {found['found_by']}; sent {found['token']}")
    if s.get("retention"):
        click.echo(f"retention  {_retention(s['retention'])}")
    click.echo("")
    if d["workers"]:
        _table([[w["name"], w["state"], w.get("calls_in_flight", 0), w["address"],
                 ", ".join(f"{v['container']}@{v['version']}:{v['state']}"
                           for v in w["versions"]) or "-", w["id"]] for w in d["workers"]],
               ["WORKER", "STATE", "IN FLIGHT", "ADDRESS", "RUNS", "ID"])
    else:
        click.echo("no workers registered")
    click.echo("")
    if not d["containers"]:
        click.echo("no containers yet; deploy one with `dockyard deploy PATH`")
        return
    _table([[c["name"], _serving(c), c["active_version"] or "-",
             c.get("last_deployment") or "-", c.get("last_deployment_status") or "-",
             c.get("instances", "-"), _error(c.get("last_error"), 60)]
            for c in d["containers"]],
           ["CONTAINER", "SERVING", "ACTIVE", "DEPLOYMENT", "STATE", "INSTANCES",
            "LAST ERROR"])


def _serving(c: dict) -> str:
    """The serving version, or the traffic split (`v1 90% · v2 10%`) when there is one."""
    if c.get("traffic"):
        return split_words({"weights": c["traffic"]})
    return c["serving_version"] or "-"


def _show_container(d: dict) -> None:
    c = d["container"]
    active = c.get("active") or {}
    rows = [("serving", _serving(c)),
            ("active", c["active_version"] or "-"),
            ("versions", f"{c['versions']} (dockyard versions {c['name']})"),
            ("instances", f"{c.get('instances', 0)} running"),
            ("functions", ", ".join(f"{k} = {v}" for k, v in
                                    (active.get("functions") or {}).items()) or "-"),
            ("limits", _limits(active.get("limits") or {})),
            ("aliases", ", ".join(f"{a['name']} -> {alias_words(a)}" for a in d["aliases"])
             or "-"),
            ("updated", _age(c["updated_at"])),
            ("last error", _error(c.get("last_error")))]
    click.echo(c["name"])
    for key, value in rows:
        click.echo(f"  {key:<11} {value}")
    if d["workers"]:
        click.echo("")
        _table([[h.get("worker_name") or h["worker"], h["worker_state"], h["version"],
                 h["state"],
                 (h.get("error") or "-").splitlines()[0][:60]] for h in d["workers"]],
               ["WORKER", "WORKER STATE", "VERSION", "STATE", "ERROR"])
    click.echo("")
    if d["deployment"]:
        click.echo("last deployment:")
        show_deployment(d["deployment"])
    else:
        click.echo(f"no deployment yet; activate a version with `dockyard rollback "
                   f"{c['name']} VERSION`")


# How a limit reads for people: the manifest's key -> (name, unit).
LIMIT_WORDS = {"timeout_s": ("timeout", "s"), "memory_mb": ("memory", "MB"),
               "tmp_mb": ("tmp", "MB"), "queue_timeout_s": ("queue timeout", "s")}


def _limits(limits: dict) -> str:
    """`timeout 30 s, memory 512 MB, concurrency 1, instances 1, network on, …`."""
    words = []
    for key, value in limits.items():
        if value is None:
            continue
        name, unit = LIMIT_WORDS.get(key, (key.replace("_", " "), ""))
        if isinstance(value, bool):
            text = "on" if value else "off"
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        words.append(f"{name} {text}" + (f" {unit}" if unit else ""))
    return ", ".join(words) or "-"


def _error(error: dict | None, width: int | None = None) -> str:
    if not error:
        return "-"
    text = f"{error['message']} ({error['source']} {error['id']}, {_age(error['at'])})"
    if width is not None:
        text = error["message"]
        if len(text) > width:
            text = text[:width - 1] + "…"
    return text


def _retention(r: dict) -> str:
    calls = (f"invocations {_uptime(r['keep_invocations_s'])}"
             if r.get("keep_invocations_s") else "invocations kept")
    versions = (f"versions: {r['keep_versions']} newest" if r.get("keep_versions")
                else "versions kept")
    gone = (f", gone workers after {_uptime(r['forget_workers_after_s'])}"
            if r.get("forget_workers_after_s") else "")
    return f"{calls}, {versions}{gone}, every {_uptime(r['prune_every_s'])}"


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if len(parts) < 2 and seconds:
        parts.append(f"{seconds}s")
    return " ".join(parts[:2])

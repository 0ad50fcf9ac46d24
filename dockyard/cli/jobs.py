"""`dockyard jobs ls|add|show|run|pause|resume|rm|runs`: cron jobs from the command line."""

from __future__ import annotations

import json
import time

import click
from click.core import ParameterSource

from ..common.http_client import api_path
from ..common.protocol import FINISHED_STATUSES
from . import Context, Group, pass_ctx, _table
from .times import at_iso, at_job


def _when(ts, timezone_name: str = "UTC") -> str:
    """A job's time in its zone, with the CLI's zone beside it (see times.at_job)."""
    return at_job(ts, timezone_name)


def _duration(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


@click.group(cls=Group, short_help="Cron jobs: scheduled calls of a container's function.")
def jobs():
    """Cron jobs: scheduled calls of a container's function."""


@jobs.command(name="ls")
@pass_ctx
def list_jobs(ctx):
    """List jobs with their next fire and last status."""
    data = ctx.client().json("GET", "/api/jobs")

    def human(d):
        if not d["jobs"]:
            click.echo("no jobs yet; add one with `dockyard jobs add NAME CONTAINER/FUNCTION "
                       "SCHEDULE` or a [[jobs]] table in dockyard.toml")
            return
        _table([[j["name"], j["target"], j["schedule"], j["timezone"],
                 _when(j["next_fire_at"], j["timezone"]) if j["enabled"] else "paused",
                 j["last_status"] or "-", j["concurrency"], j["source"]]
                for j in d["jobs"]],
               ["NAME", "TARGET", "SCHEDULE", "TIMEZONE", "NEXT", "LAST", "POLICY", "SOURCE"])
    ctx.emit(data, human)


@jobs.command(short_help="Add a job: NAME TARGET SCHEDULE [options].")
@click.argument("name")
@click.argument("target")
@click.argument("schedule")
@click.option("--payload", help="The event each fire sends (JSON).")
@click.option("--timezone", "timezone_name", default="UTC", show_default=True,
              help="IANA timezone of the schedule, e.g. Europe/Berlin.")
@click.option("--concurrency", type=click.Choice(["forbid", "replace", "allow"]),
              default="forbid", show_default=True,
              help="When a fire comes while the previous run is still going.")
@click.option("--retries", type=int, default=0, show_default=True,
              help="How many times a failed, timed-out or crashed run is tried again.")
@click.option("--retry-backoff", type=float, default=10.0, show_default=True,
              help="Seconds before the first retry; doubles each time, up to 10 minutes.")
@click.option("--timeout", type=float, help="Seconds a run may take (at most the "
              "container's timeout_s).")
@click.option("--starting-deadline", type=float, default=300.0, show_default=True,
              help="Seconds after its time a missed fire may still start.")
@click.option("--history-days", type=float, default=7.0, show_default=True,
              help="Days of run history kept (always the last 3 successes and the last "
                   "failure).")
@click.option("--paused", is_flag=True, help="Add it paused.")
@pass_ctx
def add(ctx, name, target, schedule, payload, timezone_name, concurrency, retries,
        retry_backoff, timeout, starting_deadline, history_days, paused):
    """Add job NAME calling TARGET (CONTAINER/FUNCTION or CONTAINER#module:function) on
    SCHEDULE ('*/5 * * * *', 6 fields with seconds, @daily, '@every 30s', '@at
    2026-12-01T09:00')."""
    body = {"name": name, "target": target, "schedule": schedule,
            "timezone": timezone_name, "concurrency": concurrency, "retries": retries,
            "retry_backoff_s": retry_backoff, "timeout_s": timeout,
            "starting_deadline_s": starting_deadline, "history_days": history_days,
            "enabled": not paused}
    if payload is not None:
        body["payload"] = _payload(payload)
    job = ctx.client().json("POST", "/api/jobs", json=body)

    def human(j):
        click.echo(f"job {j['name']} added: {j['explain']}")
        click.echo(f"next fire: {at_iso(j['next_fire'], j['timezone'])}" if j["enabled"]
                   else "paused")
    ctx.emit(job, human)


def _payload(text: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.ClickException(f"--payload is not valid JSON: {exc}") from None


def _seconds_or_none(ctx, param, value):
    """`--timeout SECONDS`, or `none` for no timeout of the job's own."""
    if value is None or value.lower() in ("none", "off"):
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter("give seconds (e.g. 30) or none") from None


# What `jobs edit` may change: option -> the job's field.
EDIT_FIELDS = {"target": "target", "schedule": "schedule", "payload": "payload",
               "timezone_name": "timezone", "concurrency": "concurrency", "retries": "retries",
               "retry_backoff": "retry_backoff_s", "timeout": "timeout_s",
               "starting_deadline": "starting_deadline_s", "history_days": "history_days"}


@jobs.command(short_help="Change job NAME's schedule, payload, zone or settings.")
@click.argument("name")
@click.option("--target", metavar="TARGET",
              help="Call another function: CONTAINER/FUNCTION or CONTAINER#module:function.")
@click.option("--schedule", metavar="SCHEDULE", help="A new schedule (as for jobs add).")
@click.option("--payload", metavar="JSON", help="The event each fire sends (null: none).")
@click.option("--timezone", "timezone_name", metavar="ZONE",
              help="IANA timezone of the schedule, e.g. Europe/Berlin.")
@click.option("--concurrency", type=click.Choice(["forbid", "replace", "allow"]),
              help="When a fire comes while the previous run is still going.")
@click.option("--retries", type=int,
              help="How many times a failed, timed-out or crashed run is tried again.")
@click.option("--retry-backoff", type=float, metavar="SECONDS",
              help="Seconds before the first retry; doubles each time, up to 10 minutes.")
@click.option("--timeout", metavar="SECONDS|none", callback=_seconds_or_none,
              help="Seconds a run may take (at most the container's timeout_s); none: the "
                   "container's.")
@click.option("--starting-deadline", type=float, metavar="SECONDS",
              help="Seconds after its time a missed fire may still start.")
@click.option("--history-days", type=float, metavar="DAYS",
              help="Days of run history kept.")
@click.pass_context
def edit(click_ctx, name, **options):
    """Change job NAME: only the settings given change (a new schedule or timezone counts
    from now). Jobs from a dockyard.toml change with the package, not here; pause and resume
    them with `jobs pause|resume`."""
    ctx = click_ctx.find_object(Context)
    body = {}
    for option, key in EDIT_FIELDS.items():
        if click_ctx.get_parameter_source(option) is ParameterSource.DEFAULT:
            continue
        value = options[option]
        body[key] = _payload(value) if option == "payload" else value
    if not body:
        raise click.ClickException("say what to change, e.g. --schedule '@every 5m', --payload "
                               "JSON or --timezone Europe/Berlin (dockyard jobs edit --help "
                               "lists them)")
    job = ctx.client().json("PATCH", api_path("jobs", name), json=body)

    def human(j):
        click.echo(f"job {j['name']} changed ({', '.join(sorted(body))}): {j['explain']}")
        click.echo(f"target: {j['target']}  timezone: {j['timezone']}  payload: "
                   f"{json.dumps(j['payload'])}")
        click.echo(f"next fire: {at_iso(j['next_fire'], j['timezone'])}" if j["enabled"]
                   else "paused")
    ctx.emit(job, human)


@jobs.command()
@click.argument("name")
@pass_ctx
def show(ctx, name):
    """Show a job: its definition, next 5 fire times and counts."""
    job = ctx.client().json("GET", api_path("jobs", name))

    def human(j):
        click.echo(f"{j['name']}  {j['target']}  ({j['source']}"
                   + (f", version {j['version']})" if j["version"] else ")"))
        click.echo(f"schedule: {j['schedule']}  timezone: {j['timezone']}  "
                   f"{'enabled' if j['enabled'] else 'paused'}")
        click.echo(f"  {j['explain']}")
        click.echo(f"concurrency: {j['concurrency']}  retries: {j['retries']} (backoff "
                   f"{j['retry_backoff_s']:g}s)  timeout: "
                   f"{'-' if j['timeout_s'] is None else format(j['timeout_s'], 'g') + 's'}  "
                   f"starting deadline: {j['starting_deadline_s']:g}s  history: "
                   f"{j['history_days']:g} days")
        click.echo(f"payload: {json.dumps(j['payload'])}")
        counts = j["counts"]
        click.echo(f"fires: {counts['fires']}  failures: {counts['failures']}  skipped: "
                   f"{counts['skipped']}  missed: {counts['missed']}  last status: "
                   f"{j['last_status'] or '-'}  last success: "
                   f"{_when(j['last_success_at'], j['timezone'])}")
        click.echo("next fires:" if j["next_fires"] else "next fires: none")
        for when in j["next_fires"]:
            click.echo(f"  {at_iso(when, j['timezone'])}")
    ctx.emit(job, human)


@jobs.command(short_help="Run job NAME now, by hand.")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait for the run to finish and show its outcome.")
@pass_ctx
def run(ctx, name, wait):
    """Run job NAME now, by hand (trigger `manual`)."""
    client = ctx.client()
    started = client.json("POST", api_path("jobs", name, "run"))
    invocation = started["invocation_id"]
    if wait:
        while True:
            inv = client.json("GET", api_path("invocations", invocation))
            if inv["status"] in FINISHED_STATUSES:
                started = dict(started, status=inv["status"], duration_ms=inv["duration_ms"],
                               output=inv.get("output"), error=inv.get("error"))
                break
            time.sleep(0.2)

    def human(r):
        if not wait:
            click.echo(f"run of {name} queued: {invocation} (`dockyard logs {invocation}`)")
            return
        click.echo(f"{invocation} {r['status']} in {_duration(r['duration_ms'])}")
        if r["status"] == "succeeded":
            click.echo(json.dumps(r["output"]))
        elif r.get("error"):
            click.echo(f"{r['error'].get('type')}: {r['error'].get('message')}")
    ctx.emit(started, human)
    if wait and started["status"] != "succeeded":
        raise SystemExit(1)


@jobs.command()
@click.argument("name")
@pass_ctx
def pause(ctx, name):
    """Pause job NAME: no fires until it is resumed."""
    job = ctx.client().json("POST", api_path("jobs", name, "pause"))
    ctx.emit(job, lambda j: click.echo(f"{j['name']} paused"))


@jobs.command(short_help="Resume job NAME (missed fires are not replayed).")
@click.argument("name")
@pass_ctx
def resume(ctx, name):
    """Resume job NAME (the fires it missed while paused are not replayed)."""
    job = ctx.client().json("POST", api_path("jobs", name, "resume"))
    ctx.emit(job, lambda j: click.echo(f"{j['name']} resumed; next fire: "
                                       f"{at_iso(j['next_fire'], j['timezone'])}"))


@jobs.command(name="rm")
@click.argument("name")
@pass_ctx
def remove(ctx, name):
    """Remove job NAME and its run history."""
    data = ctx.client().json("DELETE", api_path("jobs", name))
    ctx.emit(data, lambda d: click.echo(f"{name} removed"))


@jobs.command()
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many runs to show, newest first (1 to 1000).")
@click.option("--status", help="Only runs with this status (succeeded, failed, skipped, "
              "missed, …).")
@pass_ctx
def runs(ctx, name, limit, status):
    """Show the runs of job NAME, newest first."""
    params = {"limit": limit}
    if status:
        params["status"] = status
    data = ctx.client().json("GET", api_path("jobs", name, "runs"), params=params)

    def human(d):
        if not d["runs"]:
            click.echo(f"no runs of {name} yet")
            return
        tz = d.get("timezone", "UTC")
        _table([[_when(r["scheduled_at"], tz), _when(r["fired_at"], tz),
                 "-" if r["lateness_s"] is None else f"{r['lateness_s']:.3f}s",
                 r["status"] + (f" x{r['count']}" if r["count"] > 1 else ""), r["attempt"],
                 r["trigger"], _duration(r["duration_ms"]), r["invocation_id"] or "-",
                 (r["reason"] or "")[:70]] for r in d["runs"]],
               ["SCHEDULED", "FIRED", "LATE", "STATUS", "ATTEMPT", "TRIGGER", "DURATION",
                "INVOCATION", "REASON"])
    ctx.emit(data, human)

"""`dockyard invoke NAME/FUNCTION [JSON|@FILE|-]`: one call, its result on stdout; with
`--verbose`/`-v` its invocation id, version, duration and worker on stderr, with `--id` its
invocation id alone on stderr."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..common.http_client import api_path
from . import Command, pass_ctx
from .client import ClientError, token_hint
from .history import WorkerNames

RECORD_WAIT_S = 2.0   # a synchronous call's record lands a moment after its answer


def read_event(event: str | None) -> str | None:
    """The event's JSON text: given as is, `@FILE` read from a file, `-` from stdin."""
    if event == "-":
        event = sys.stdin.read()
    elif event is not None and event.startswith("@"):
        path = Path(event[1:])
        if not event[1:]:
            raise click.ClickException("name the file after @, e.g. @event.json (- reads "
                                       "stdin)")
        try:
            event = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise click.ClickException(f"cannot read the event from {path}: "
                                       f"{exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise click.ClickException(f"the event in {path} is not UTF-8 JSON text") from None
    if not event or not event.strip():
        return None   # no event: the function gets None
    try:
        json.loads(event)
    except ValueError as exc:
        raise click.ClickException(f"the event is not valid JSON: {exc}") from None
    return event


@click.command(cls=Command, short_help="Call NAME/FUNCTION with a JSON event.")
@click.argument("target")
@click.argument("event", required=False)
@click.option("--async", "asynchronous", is_flag=True,
              help="Queue it; print its invocation id (the JSON answer with --json).")
@click.option("--id", "print_id", is_flag=True,
              help="Print the call's invocation id alone on stderr (the result stays on "
                   "stdout).")
@pass_ctx
def invoke(ctx, target, event, asynchronous, print_id):
    """Call NAME/FUNCTION (or NAME@VERSION/FUNCTION, NAME@ALIAS/FUNCTION) with an optional
    event: JSON, @FILE (the JSON in a file) or - (read from stdin). The result goes to
    stdout; --verbose (-v) prints the invocation id, version, duration and worker on stderr,
    --id the id alone."""
    if "/" not in target:
        raise click.ClickException("name the function as NAME/FUNCTION, e.g. hello/greet")
    event = read_event(event)
    client = ctx.client()
    response = client.invoke(target, event, asynchronous)
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"type": "BadResponse", "message": response.text[:200]}}
    invocation = response.headers.get("X-Dockyard-Invocation-Id")
    if invocation and not asynchronous:
        if print_id:
            click.echo(invocation, err=True)
        if ctx.verbose:
            click.echo(_details(client, invocation, response.headers), err=True)
    if response.status_code >= 400:
        if ctx.as_json:
            click.echo(json.dumps(body, indent=2))
        error = body.get("error") or {}
        inv = body.get("invocation_id")  # only an answer about a recorded call has one
        message = str(error.get("message") or response.reason).splitlines()[0]
        if response.status_code == 401:
            message = f"{message.rstrip('.')}; {token_hint(client.token)}"
        raise click.ClickException(f"{error.get('type')}: {message}"
                                   + (f" (dockyard logs {inv})" if inv else ""))
    if ctx.as_json:
        click.echo(json.dumps(body, indent=2))
    elif asynchronous:
        click.echo(body["invocation_id"])  # alone: `dockyard logs $(dockyard invoke --async …)`
        if print_id:
            click.echo(body["invocation_id"], err=True)
    else:
        click.echo(json.dumps(body))


def _details(client, invocation: str, headers) -> str:
    """One line about a call: its id and version and duration (from the answer's headers),
    and the worker that ran it (from its record, once it is written)."""
    duration = headers.get("X-Dockyard-Duration-Ms")
    try:
        duration = f"{float(duration):.2f} ms" if duration else "-"
    except ValueError:
        duration = "-"
    return (f"invocation {invocation}  version {headers.get('X-Dockyard-Version') or '-'}  "
            f"duration {duration}  worker {_worker(client, invocation)}")


def _worker(client, invocation: str) -> str:
    """The name of the worker that ran the call, from its record (written a moment after the
    answer); `-` if the record does not say within RECORD_WAIT_S or cannot be read."""
    end = time.monotonic() + RECORD_WAIT_S
    while True:
        try:
            record = client.json("GET", api_path("invocations", invocation))
            if record.get("worker_id"):
                return WorkerNames(client)(record["worker_id"])
        except ClientError as exc:
            if getattr(exc, "status", None) != 404:
                return "-"   # e.g. a token that may call but not read records
        if time.monotonic() > end:
            return "-"
        time.sleep(0.05)

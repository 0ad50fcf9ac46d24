"""`dockyard cancel ID`: stop a queued or running call."""

from __future__ import annotations

import click

from ..common.http_client import api_path
from . import Command, pass_ctx
from .client import ClientError


@click.command(cls=Command, short_help="Stop a queued or running call (ID).")
@click.argument("invocation_id", metavar="ID")
@pass_ctx
def cancel(ctx, invocation_id):
    """Stop the call ID (synchronous or async, queued or running): its process is killed and
    its record says `cancelled`. A call that has finished is left as it is."""
    client = ctx.client()
    try:
        record = client.json("POST", api_path("invocations", invocation_id, "cancel"))
    except ClientError as exc:
        status = getattr(exc, "status", None)
        if status == 404:
            raise click.ClickException(
                f"no call with id '{invocation_id}' is queued or running; `dockyard "
                "invocations --status running` lists those that are") from None
        if status == 409:
            raise click.ClickException(exc.message.split(": ", 1)[-1]) from None
        raise
    ctx.emit(record, lambda r: click.echo(f"{r['id']}: {r['status']}"))

"""What a running call has printed so far: its record holds its output only once it ends, so
reading a running call's record asks the worker that has it (`dockyard logs ID`, and
`--follow` until it ends)."""

from __future__ import annotations

import logging

from ...common.protocol import Frame, Status
from ..store import workers as worker_store
from ..store.engine import Database
from .worker_client import WorkerConnections, WorkerGone

log = logging.getLogger("dockyard.invoke")

ASK_TIMEOUT_S = 2.0


def with_output_so_far(db: Database, connections: WorkerConnections, record: dict) -> dict:
    """`record` with `stdout` and `stderr` as printed so far, and `output_so_far: true`, when
    it is a running call whose worker answers; else as it is."""
    if record.get("status") != Status.RUNNING or not record.get("worker_id"):
        return record
    address = worker_store.address_of(db, record["worker_id"])
    if address is None:
        return record
    try:
        reply = connections.request(address, {
            "type": Frame.OUTPUT, "id": record["id"],
            # An async call's record names the version it asked for, if any, until it ends
            # (None: whichever serves when it runs): any version of its container may have it.
            "what": f"{record['container']}@{record['version']}" if record.get("version")
            else str(record.get("container"))},
            timeout=ASK_TIMEOUT_S)
    except WorkerGone as exc:
        log.info("%s: its worker cannot say what it printed so far: %s", record["id"], exc)
        return record
    if reply.get("type") != Frame.OUTPUT or not reply.get("found"):
        return record
    return dict(record, stdout=_text(reply.get("stdout")), stderr=_text(reply.get("stderr")),
                output_so_far=True)


def _text(value) -> str:
    return value if isinstance(value, str) else ""

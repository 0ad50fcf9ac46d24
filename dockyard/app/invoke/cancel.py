"""Stopping a call from outside: `POST /api/invocations/<id>/cancel`, a job's `replace`
policy and a job's own timeout. The record is marked first, so the worker's later report
cannot turn it into a success or a failure; then every live worker is told, and the one that
has the call kills the process running it (its whole tree: the only way to stop Python code).
A worker that gets the call later refuses it."""

from __future__ import annotations

import logging

from ..store.engine import Database

from ...common.protocol import Frame, Status
from ...errors import Conflict, NotFound
from ..store import invocations
from ..store import workers as worker_store
from .worker_client import WorkerConnections, WorkerGone

log = logging.getLogger("dockyard.cancel")

TELL_TIMEOUT_S = 5.0


def cancel(db: Database, connections: WorkerConnections, invocation_id: str
           ) -> dict:
    previous = invocations.stop(db, invocation_id, Status.CANCELLED,
                                {"type": "Cancelled", "message": "cancelled on request"})
    if previous is None:
        # A synchronous call's record is written when it ends: it may be running right now.
        if tell_workers(db, connections, invocation_id):
            log.info("%s: cancelled (a synchronous call)", invocation_id)
            return {"id": invocation_id, "status": Status.CANCELLED}
        raise NotFound(f"no invocation '{invocation_id}'")
    if previous not in (Status.QUEUED, Status.RUNNING):
        raise Conflict(f"invocation '{invocation_id}' has finished already ({previous})")
    if previous == Status.RUNNING:
        tell_workers(db, connections, invocation_id)
    log.info("%s: cancelled (it was %s)", invocation_id, previous)
    return invocations.get(db, invocation_id)


def tell_workers(db: Database, connections: WorkerConnections,
                 invocation_id: str) -> bool:
    """Ask every live worker to kill the process running the call; True if one had it."""
    found = False
    for worker in worker_store.live_workers(db):
        try:
            reply = connections.request(worker["address"], {"type": Frame.CANCEL,
                                                            "id": invocation_id},
                                        timeout=TELL_TIMEOUT_S)
        except WorkerGone as exc:
            log.warning("%s: cannot tell worker %s to cancel it: %s", invocation_id,
                        worker["id"], exc)
            continue
        found = found or bool(reply.get("found"))
    return found

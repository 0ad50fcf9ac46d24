"""How a deployment moves on: from what the live workers report about its version to
`in_progress`, `ready`, `partial` or `failed`, and the container's traffic to the version once
a live worker has it ready."""

from __future__ import annotations

from .engine import Database

from ...common.protocol import (ROUTABLE_STATES, SETTLED_DEPLOYMENT_STATUSES, DeploymentStatus,
                                VersionState)
from .db import now
from .containers import _first_line
from .workers import live_worker_ids


def advance_deployments(db: Database) -> None:
    """Move each container's latest deployment on from what the live workers report about its
    version (workers that are lost, suspect or stopped count for nothing, so none holds a
    deployment up), and switch the container's traffic to the version once one live worker
    has it ready. A version that failed on every live worker gives way to the one serving
    before, if any. Runs inside the caller's transaction."""
    live = set(live_worker_ids(db))
    conn = db
    for c in list(db.query("SELECT * FROM containers WHERE active_version_id IS NOT NULL")):
        active = c["active_version_id"]
        rows = {r["worker_id"]: r for r in db.query(
            "SELECT wv.worker_id, wv.state, wv.error, w.name FROM worker_versions wv "
            "JOIN workers w ON w.id = wv.worker_id WHERE wv.version_id = ?", [active])
            if r["worker_id"] in live}
        ready = [w for w, r in rows.items() if r["state"] in ROUTABLE_STATES]
        failed = [r for r in rows.values() if r["state"] == VersionState.FAILED]
        if ready and c["serving_version_id"] != active:
            conn.execute("UPDATE containers SET serving_version_id = ?, updated_at = ? "
                         "WHERE id = ?", [active, now(), c["id"]])
        deployment = next(iter(db.query(
            "SELECT * FROM deployments WHERE container_id = ? "
            "ORDER BY created_at DESC, id DESC LIMIT 1", [c["id"]])), None)
        if deployment is None or deployment["version_id"] != active:
            continue
        status, error = deployment_status(deployment["status"], deployment["error"], live,
                                          rows, ready, failed)
        if status is None or (status, error) == (deployment["status"], deployment["error"]):
            continue
        if deployment["status"] == DeploymentStatus.READY:
            continue   # over: a worker failing later is the version's trouble, not this one's
        if (deployment["status"] == DeploymentStatus.FAILED
                and status not in (DeploymentStatus.READY, DeploymentStatus.PARTIAL)):
            continue   # over, unless the workers' retries brought it up after all
        if status == DeploymentStatus.FAILED and c["serving_version_id"] not in (None, active):
            # Keep the old version serving and stop chasing the broken one.
            conn.execute("UPDATE containers SET active_version_id = serving_version_id, "
                         "updated_at = ? WHERE id = ?", [now(), c["id"]])
        settled = status in SETTLED_DEPLOYMENT_STATUSES
        conn.execute("UPDATE deployments SET status = ?, error = ?, finished_at = ? "
                     "WHERE id = ?", [status, error, now() if settled else None,
                                      deployment["id"]])


def deployment_status(current: str, current_error: str | None, live: set[str],
                      rows: dict[str, dict], ready: list[str],
                      failed: list[dict]) -> tuple[str | None, str | None]:
    """(status, error) of a deployment from the live workers' rows about its version: ready
    when every live worker serves it; failed when every one failed; partial once each one
    has settled, some serving and some failed (and it stays partial while the failed ones
    retry); in progress otherwise. None while no live worker reported."""
    if not live or not rows:
        return None, None
    if len(ready) == len(live):
        return DeploymentStatus.READY, None
    if len(failed) == len(live):
        return DeploymentStatus.FAILED, failed[0]["error"] or "the version failed to start"
    settled = len(rows) == len(live) and len(ready) + len(failed) == len(live)
    if ready and (settled or current == DeploymentStatus.PARTIAL):
        if not failed:
            return DeploymentStatus.PARTIAL, current_error   # the failed ones are retrying
        return DeploymentStatus.PARTIAL, (
            f"serves on {len(ready)} of {len(live)} live workers; failed on " + "; ".join(
                f"{r['name'] or r['worker_id']} ({r['worker_id']}): "
                f"{_first_line(r['error'] or 'the version failed to start')}"
                for r in sorted(failed, key=lambda r: r["worker_id"])))
    return DeploymentStatus.IN_PROGRESS, None

"""Containers, versions, activation (rollback), deployments and artifact downloads."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, request, send_file

from ...common.archive import ArchiveLimits, inspect_archive
from ...common.manifest import parse_manifest
from ...common.protocol import DeploymentStatus
from ...errors import BadRequest, DockyardError, NotFound
from ..auth import require
from ..store.db import transaction
from ..jobs.retention import prune_versions
from ..state import artifacts, connections, database
from ..store import containers as store
from ..store import deployments
from ..store import jobs as job_store
from ..store import workers as worker_store

bp = Blueprint("containers", __name__)
log = logging.getLogger("dockyard.deploy")


def _archive_limits() -> ArchiveLimits:
    config = current_app.config
    return ArchiveLimits(max_compressed=config["MAX_UPLOAD_BYTES"],
                         max_uncompressed=config["MAX_UNCOMPRESSED_BYTES"],
                         max_members=config["MAX_MEMBERS"])


def _upload_stream():
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise BadRequest("multipart upload needs the package in a field named 'file'")
        return upload.stream
    return request.stream


def poke_workers(db) -> None:
    # The active versions changed: their manifest jobs are the jobs now (the scheduler
    # would see it within a second; the caller sees it at once).
    job_store.sync_manifest_jobs(db)
    for worker in worker_store.live_workers(db):
        connections().poke(worker["address"])


def _deploy_answer(db, container: dict, version: dict, created: bool):
    record = store.version_record(version, container)
    deployment = store.latest_deployment(db, version["id"])
    record["deployment"] = deployment["id"] if deployment else None
    record["deployment_status"] = deployment["status"] if deployment else None
    record["created"] = created
    return record


@bp.post("/api/containers")
@require()
def upload():
    activate = request.args.get("activate", "1") not in ("0", "false", "no")
    store_ = artifacts()
    tmp, sha256, size = store_.receive(_upload_stream(), current_app.config["MAX_UPLOAD_BYTES"])
    try:
        if size == 0:
            raise BadRequest("empty upload: send a .zip or .tar.gz package as the body")
        info = inspect_archive(tmp, _archive_limits())
        manifest = parse_manifest(info.manifest_text)
        manifest.modules = sorted(info.modules)
        db = database()
        try:
            with store_.lock():  # retention removes no artifact between these two steps
                store_.keep(tmp, sha256)
                container, version, created = store.add_version(
                    db, manifest, info.content_sha256, sha256, size, activate)
        except DockyardError:
            # Refused (a version name taken by other content, a bad manifest value): the
            # package file goes too, unless a version (another upload's) uses the same bytes.
            store_.remove_unused([sha256], lambda sha256s: store.artifacts_in_use(db, sha256s))
            raise
    finally:
        tmp.unlink(missing_ok=True)
    if version["artifact_sha256"] != sha256:
        # The same content packed again (another archive format or order): the version keeps
        # its package file, and this one is not used by any.
        store_.remove_unused([sha256], lambda sha256s: store.artifacts_in_use(db, sha256s))
    log.info("package %s version %s (%s, %s)", manifest.name, version["version"],
             "new" if created else "already known", "activating" if activate else "kept")
    if activate:
        poke_workers(db)
    return jsonify(_deploy_answer(db, container, version, created)), 201 if created else 200


@bp.get("/api/containers")
@require()
def list_containers():
    return jsonify({"containers": store.list_containers(database())})


@bp.get("/api/containers/<name>")
@require()
def get_container(name: str):
    return jsonify(store.container_detail(database(), name))


@bp.get("/api/containers/<name>/versions")
@require()
def list_versions(name: str):
    return jsonify({"container": name, "versions": store.list_versions(database(), name)})


@bp.post("/api/containers/<name>/versions/prune")
@require()
def prune(name: str):
    """Delete old versions: `{"keep": N, "dry_run": false}`. Never one that serves, is
    active, runs on a worker, has a deployment in progress or calls queued or running."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "keep" not in body:
        raise BadRequest('send {"keep": N} (N >= 1: the newest versions to keep)')
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    db = database()
    result = prune_versions(db, artifacts(), name, body["keep"], dry_run)
    if result["deleted"] and not dry_run:
        poke_workers(db)   # they drop what they held of the deleted versions at once
    return jsonify(result)


@bp.post("/api/containers/<name>/activate")
@require()
def activate(name: str):
    version = store.validate_activate_body(request.get_json(silent=True))
    db = database()
    container, row = store.activate(db, name, version)
    poke_workers(db)
    return jsonify(_deploy_answer(db, container, row, False))


@bp.delete("/api/containers/<name>")
@require()
def delete(name: str):
    """Undeploy: delete the container, its versions and their package files; with
    `?keep_versions=1` only take it out of service."""
    db = database()
    if request.args.get("keep_versions", "0") not in ("0", "false", "no", ""):
        kept = store.undeploy(db, name)
        poke_workers(db)
        return jsonify({"undeployed": name, "versions_kept": kept})
    used = store.delete_container(db, name)
    poke_workers(db)
    removed = artifacts().remove_unused(
        used, lambda sha256s: store.artifacts_in_use(db, sha256s))
    return jsonify({"deleted": name, "artifacts_removed": len(removed)})


@bp.get("/api/deployments/<deployment_id>")
@require()
def deployment(deployment_id: str):
    """A deployment and each live worker's progress. One still under way is judged again
    first: a worker lost since the last heartbeat does not hold it up until the next one."""
    db = database()
    detail = worker_store.deployment_detail(db, deployment_id)
    if detail["status"] not in (DeploymentStatus.READY, DeploymentStatus.FAILED,
                                DeploymentStatus.SUPERSEDED):
        with transaction(db):
            deployments.advance_deployments(db)
        detail = worker_store.deployment_detail(db, deployment_id)
    return jsonify(detail)


@bp.get("/api/artifacts/<sha256>")
@require("worker")
def artifact(sha256: str):
    try:
        path = artifacts().local(sha256)
    except (ValueError, FileNotFoundError):
        raise NotFound(f"no artifact '{sha256}'") from None
    return send_file(path, mimetype="application/octet-stream")

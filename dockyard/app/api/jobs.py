"""Cron jobs: definitions, runs by hand, pause and resume, and their run history."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from . import page_limit
from ..jobs import definitions as job_views
from ..auth import require
from ..state import database
from ..store import job_runs
from ..store import jobs as store

bp = Blueprint("jobs", __name__)


@bp.get("/api/jobs")
@require()
def list_jobs():
    db = database()
    return jsonify({"jobs": [job_views.record(row, full=False) for row in store.list_all(db)]})


@bp.post("/api/jobs")
@require()
def create_job():
    db = database()
    name, definition = job_views.definition_from(db, request.get_json(silent=True))
    row = store.create(db, name, definition)
    return jsonify(job_views.record(store.with_last_status(db, row))), 201


@bp.get("/api/jobs/<name>")
@require()
def get_job(name: str):
    db = database()
    return jsonify(job_views.record(store.with_last_status(db, store.get(db, name))))


@bp.patch("/api/jobs/<name>")
@require()
def update_job(name: str):
    db = database()
    row = store.get(db, name)
    store.check_editable(row)
    changes = job_views.changes_from(db, row, request.get_json(silent=True))
    row = store.update(db, name, changes)
    return jsonify(job_views.record(store.with_last_status(db, row)))


@bp.delete("/api/jobs/<name>")
@require()
def delete_job(name: str):
    store.delete(database(), name)
    return jsonify({"deleted": name})


@bp.post("/api/jobs/<name>/run")
@require()
def run_job(name: str):
    db = database()
    run = job_runs.manual(db, store.get(db, name))
    return jsonify(dict(run, job=name)), 202


def _set_enabled(name: str, enabled: bool):
    db = database()
    return jsonify(job_views.record(store.with_last_status(db, store.set_enabled(db, name,
                                                                                 enabled))))


@bp.post("/api/jobs/<name>/pause")
@require()
def pause_job(name: str):
    return _set_enabled(name, False)


@bp.post("/api/jobs/<name>/resume")
@require()
def resume_job(name: str):
    return _set_enabled(name, True)


@bp.get("/api/jobs/<name>/runs")
@require()
def list_runs(name: str):
    limit = page_limit(request.args)
    db = database()
    row = store.get(db, name)
    return jsonify({"job": name, "timezone": row["timezone"],
                    "runs": job_runs.list_for(db, row["id"], limit,
                                              request.args.get("status"))})

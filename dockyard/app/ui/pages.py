"""The dashboard's pages: each reads the store and renders one template."""

from __future__ import annotations

import time
from collections import Counter

from flask import render_template, request, url_for
from werkzeug.exceptions import HTTPException

from ...common.protocol import RECORD_STATUSES
from ...errors import BadRequest, DockyardError
from ..jobs import definitions as job_views
from ..invoke.running_output import with_output_so_far
from ..state import connections, database
from ..store import containers as container_store
from ..store import deployfolder as folder_store
from ..store import invocations as invocation_store
from ..store import job_runs
from ..store import jobs as job_store
from ..store import workers as worker_store
from . import bp

HOUR, DAY = 3600.0, 86400.0
PAGE_SIZE = 50
WINDOWS = {"15m": 900, "1h": HOUR, "6h": 6 * HOUR, "24h": DAY, "7d": 7 * DAY}
TROUBLED_RUNS = ("failed", "timed_out", "crashed", "missed")


@bp.errorhandler(DockyardError)
def _dockyard_error(exc: DockyardError):
    return render_template("ui/error.html", status=exc.status, message=exc.message), exc.status


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    return (render_template("ui/error.html", status=exc.code, message=exc.description),
            exc.code or 500)


@bp.get("/")
def overview():
    db = database()
    t = time.time()
    hour = invocation_store.window_figures(db, t - HOUR)
    day = invocation_store.window_figures(db, t - DAY)
    jobs = [job_views.record(row, full=False) for row in job_store.list_all(db)]
    workers = worker_store.list_workers(db)
    containers = container_store.list_containers(db)
    return render_template(
        "ui/overview.html", hour=hour, day=day,
        running=invocation_store.unfinished(db, 50),
        failed_deployments=[c for c in containers
                            if c["last_deployment_status"] in ("failed", "partial")],
        troubled_jobs=[j for j in jobs if j["last_status"] in TROUBLED_RUNS],
        jobs=len(jobs), workers=workers,
        worker_states=sorted(Counter(w["state"] for w in workers).items()),
        containers=containers)


@bp.get("/containers")
def containers():
    return render_template("ui/containers.html",
                           containers=container_store.list_containers(database()))


@bp.get("/containers/<name>")
def container(name: str):
    db = database()
    detail = container_store.container_detail(db, name)
    versions = container_store.list_versions(db, name)
    since = time.time() - DAY
    series, sampled = invocation_store.per_version(db, name, since)
    totals = {v: {"calls": sum(b["calls"] for b in buckets),
                  "errors": sum(b["errors"] for b in buckets)} for v, buckets in series.items()}
    active = detail.get("active") or {}
    return render_template(
        "ui/container.html", c=detail, versions=versions, series=series, totals=totals,
        deployments=container_store.recent_deployments(db, name, 10),
        functions=sorted((active.get("functions") or {}).items()), sampled=sampled,
        calls=sum(t["calls"] for t in totals.values()),
        errors=sum(t["errors"] for t in totals.values()))


@bp.get("/deployments/<deployment_id>")
def deployment(deployment_id: str):
    detail = worker_store.deployment_detail(database(), deployment_id)
    return render_template("ui/deployment.html", d=detail,
                           live=detail["status"] in ("pending", "in_progress"))


def _filters() -> dict:
    args = request.args
    status = args.get("status") or None
    if status and status not in RECORD_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(RECORD_STATUSES)}")
    window = args.get("window") or None
    if window and window not in WINDOWS:
        raise BadRequest(f"window must be one of {', '.join(WINDOWS)}")
    trigger = args.get("trigger") or None
    if trigger and trigger not in invocation_store.TRIGGERS:
        raise BadRequest(f"trigger must be one of {', '.join(invocation_store.TRIGGERS)}")
    return {"container": args.get("container") or None,
            "function": args.get("function") or None, "status": status,
            "trigger": trigger, "window": window}


def _before() -> tuple[float, str] | None:
    text = request.args.get("before")
    if not text:
        return None
    created, _, last_id = text.partition("~")
    try:
        return float(created), last_id
    except ValueError:
        raise BadRequest("before must be a page mark from an 'older' link") from None


@bp.get("/invocations")
def invocations():
    filters = _filters()
    window = filters["window"]
    rows, more = invocation_store.page(
        database(), container=filters["container"], function=filters["function"],
        status=filters["status"], trigger=filters["trigger"],
        since=time.time() - WINDOWS[window] if window else None, before=_before(),
        limit=PAGE_SIZE)
    older = None
    if more:
        last = rows[-1]
        older = url_for("ui.invocations", **{k: v for k, v in filters.items() if v},
                        before=f"{last['created_at']!r}~{last['id']}")
    return render_template("ui/invocations.html", rows=rows, filters=filters, older=older,
                           paged=bool(request.args.get("before")),
                           newest=url_for("ui.invocations",
                                          **{k: v for k, v in filters.items() if v}),
                           statuses=RECORD_STATUSES, triggers=invocation_store.TRIGGERS,
                           windows=list(WINDOWS),
                           container_names=container_store.container_names(database()))


@bp.get("/invocations/<invocation_id>")
def invocation(invocation_id: str):
    db = database()
    # A running call's output so far comes from its worker (the page follows it).
    record = with_output_so_far(db, connections(), invocation_store.get(db, invocation_id))
    return render_template("ui/invocation.html", inv=record,
                           job=job_runs.job_of_invocation(db, invocation_id),
                           live=record["status"] in ("queued", "running"))


@bp.get("/jobs")
def jobs():
    db = database()
    return render_template("ui/jobs.html",
                           jobs=[job_views.record(row) for row in job_store.list_all(db)])


@bp.get("/jobs/<name>")
def job(name: str):
    db = database()
    row = job_store.with_last_status(db, job_store.get(db, name))
    runs = job_runs.list_for(db, row["id"], 100)
    return render_template("ui/job.html", job=job_views.record(row), runs=runs,
                           grid=list(reversed(runs)))


@bp.get("/workers")
def workers():
    return render_template("ui/workers.html", workers=worker_store.list_workers(database()))


@bp.get("/deploy-folder")
def deploy_folder():
    return render_template("ui/deploy_folder.html", folder=folder_store.describe(database()))


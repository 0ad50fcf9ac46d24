"""What the dashboard's forms do, each through the function its JSON API route calls: cancel
a call, activate a version (rollback), run, pause or resume a job, invoke a function (an async
call, as `POST /invoke/...` with `Prefer: respond-async`; its page follows it live). A refusal
(a call that has finished, a bad event, an unknown function or version) comes back as a
message on the page; an unknown container, call or job (the page's own subject) is a 404."""

from __future__ import annotations

from flask import current_app, flash, redirect, request, url_for

from ...common.frames import loads_strict
from ...errors import BadRequest, DockyardError, NotFound
from ..api.containers import poke_workers
from ..invoke.cancel import cancel
from ..invoke.execute import route
from ..invoke.qualifiers import resolve
from ..invoke.sync import too_large
from ..state import connections, database
from ..store import containers as container_store
from ..store import invocations as invocation_store
from ..store import job_runs
from ..store import jobs as job_store
from . import bp


def _back(default: str):
    target = request.form.get("back") or ""
    return redirect(target if target.startswith("/ui/") and not target.startswith("//")
                    else default)


def _refused(exc: DockyardError, default: str):
    flash(exc.message, "error")
    return _back(default)


@bp.post("/invocations/<invocation_id>/cancel")
def cancel_invocation(invocation_id: str):
    page = url_for("ui.invocation", invocation_id=invocation_id)
    try:
        record = cancel(database(), connections(), invocation_id)
    except NotFound:
        raise
    except DockyardError as exc:
        return _refused(exc, page)
    flash(f"{invocation_id}: {record.get('status', 'cancelled')}", "info")
    return _back(page)


@bp.post("/containers/<name>/activate")
def activate(name: str):
    page = url_for("ui.container", name=name)
    db = database()
    container_store.get_container(db, name)
    try:
        version = container_store.validate_activate_body({"version": request.form.get(
            "version", "")})
        container_store.activate(db, name, version)
        poke_workers(db)
    except DockyardError as exc:
        return _refused(exc, page)
    flash(f"{name}: version {version} is active", "info")
    return _back(page)


@bp.post("/containers/<name>/invoke")
def invoke(name: str):
    page = url_for("ui.container", name=name)
    function = request.form.get("function", "")
    version = request.form.get("version") or None
    text = request.form.get("event", "").strip() or None
    db = database()
    container_store.get_container(db, name)
    try:
        limit = current_app.config["MAX_EVENT_BYTES"]
        if text is not None and len(text.encode()) > limit:
            raise too_large(limit)
        if text is not None:
            try:
                loads_strict(text.encode())
            except ValueError as exc:
                raise BadRequest(f"the event is not valid JSON: {exc}") from None
        version = resolve(db, name, version)    # a version, else an alias's draw
        route(db, name, version)[0].manifest.resolve_function(function)
        invocation_id = invocation_store.new_id()
        invocation_store.enqueue(db, invocation_id, name, version, function, "async", text)
    except DockyardError as exc:
        return _refused(exc, page)
    return redirect(url_for("ui.invocation", invocation_id=invocation_id))


@bp.post("/jobs/<name>/run")
def run_job(name: str):
    db = database()
    run = job_runs.manual(db, job_store.get(db, name))
    flash(f"{name}: run queued as {run['invocation_id']}", "info")
    return _back(url_for("ui.job", name=name))


@bp.post("/jobs/<name>/pause")
def pause_job(name: str):
    return _set_enabled(name, False)


@bp.post("/jobs/<name>/resume")
def resume_job(name: str):
    return _set_enabled(name, True)


def _set_enabled(name: str, enabled: bool):
    job_store.set_enabled(database(), name, enabled)
    flash(f"{name}: {'resumed' if enabled else 'paused'}", "info")
    return _back(url_for("ui.job", name=name))

"""Signing in to the dashboard: the admin token, typed once, opens a session kept in a signed
cookie (HttpOnly, SameSite=Strict, path /ui). The key that signs it is derived from the admin
token (an HMAC under a fixed label), so every control plane sharing the tokens accepts the
same session and a new admin token ends every session. Each session has a CSRF token that
every form that changes something carries."""

from __future__ import annotations

import hmac
import secrets
import time

from flask import (abort, flash, redirect, render_template, request, session, url_for)

from ..auth import is_local
from ..state import extension
from . import bp

SESSION_LABEL = b"dockyard dashboard session v1"
SESSION_MAX_AGE_S = 12 * 3600


def configure(state) -> None:
    app = state.app
    admin = app.extensions["dockyard"]["tokens"].get("admin")
    if admin and not app.secret_key:
        app.secret_key = hmac.new(admin.encode(), SESSION_LABEL, "sha256").hexdigest()
    app.config.update(SESSION_COOKIE_NAME="dockyard_ui", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH="/ui")


def signed_in() -> bool:
    started = session.get("signed_in")
    return isinstance(started, (int, float)) and time.time() - started < SESSION_MAX_AGE_S


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(24)
    return token


@bp.app_context_processor
def _template_globals():
    return {"csrf_token": csrf_token}


@bp.before_request
def _guard():
    if request.endpoint == "ui.static":
        return None
    if request.method == "POST":
        sent = request.form.get("csrf", "")
        expected = session.get("csrf", "")
        if not (sent and expected and hmac.compare_digest(sent, expected)):
            abort(400, "the form is out of date or was not sent from this dashboard "
                       "(no valid CSRF token): reload the page and try again")
    if request.endpoint == "ui.sign_in" or signed_in():
        return None
    if request.method == "GET" and not request.headers.get("X-Dockyard-Refresh"):
        return redirect(url_for("ui.sign_in", next=request.full_path.rstrip("?")))
    abort(401, "not signed in: sign in at /ui/sign-in with the admin token")


def _safe_next(target: str | None) -> str:
    # Only a page of the dashboard: never another site.
    if target and target.startswith("/ui/") and not target.startswith("//"):
        return target
    return url_for("ui.overview")


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    # Only a caller on this host is told where the data dir is (as the API does).
    where = (extension()["data"].root / "tokens" / "admin" if is_local(request.remote_addr)
             else "tokens/admin in the server's data dir")
    if request.method == "GET":
        return render_template("ui/sign_in.html", signed_in=False,
                               next=request.args.get("next", ""), token_path=where)
    sent = request.form.get("token", "").strip()
    admin = extension()["tokens"].get("admin")
    if not admin or not sent or not hmac.compare_digest(sent.encode(), admin.encode()):
        message = ("wrong token: this is not the server's admin token (it is in "
                   f"{where})") if sent else "type the admin token to sign in"
        return render_template("ui/sign_in.html", signed_in=False, error=message,
                               next=request.form.get("next", ""), token_path=where), 401
    session.clear()
    session["signed_in"] = time.time()
    csrf_token()
    return redirect(_safe_next(request.form.get("next")))


@bp.post("/sign-out")
def sign_out():
    session.clear()
    flash("signed out", "info")
    return redirect(url_for("ui.sign_in"))

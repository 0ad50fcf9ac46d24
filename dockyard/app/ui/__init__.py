"""The dashboard at /ui/: server-rendered pages (Jinja) over the store's reads, and forms
whose actions go through the same functions as the JSON API. Signed in with the admin token
into a session cookie; every asset is in this package (no CDN, no build step)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates",
               static_folder="static", static_url_path="/static")

from . import actions, format, pages, session  # noqa: E402,F401 - they add their routes to bp

bp.record_once(session.configure)

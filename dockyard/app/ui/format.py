"""How the dashboard writes times, durations and sizes. Every time is in the server's time
zone, named on each page."""

from __future__ import annotations

import json
import time
from datetime import datetime

from . import bp


def zone_name() -> str:
    now = datetime.now().astimezone()
    offset = now.strftime("%z")
    return f"{now.tzname()} (UTC{offset[:3]}:{offset[3:]})"


@bp.app_template_filter("when")
def when(t: float | None) -> str:
    if t is None:
        return "—"
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S")


@bp.app_template_filter("ago")
def ago(t: float | None) -> str:
    if t is None:
        return "never"
    return span(time.time() - t) + " ago" if t <= time.time() else "in " + span(t - time.time())


def span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


@bp.app_template_filter("ms")
def ms(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.2f} ms"
    if value < 1000:
        return f"{value:.1f} ms"
    if value < 10_000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.1f} s"


@bp.app_template_filter("kb")
def kb(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1024:.1f} MB" if value >= 1024 else f"{value} KB"


@bp.app_template_filter("percent")
def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


@bp.app_template_filter("pretty_json")
def pretty_json(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False)


@bp.app_template_filter("error_line")
def error_line(error: dict | None) -> str:
    if not error:
        return ""
    return f"{error.get('type', 'Error')}: {error.get('message', '')}".strip()[:300]


@bp.app_context_processor
def _globals():
    return {"server_zone": zone_name(), "now": time.time()}


@bp.app_template_global("container_exists")
def container_exists(name: str | None) -> bool:
    """Whether container `name` exists now (a record outlives its container: a link to a
    removed one would be a 404). The names are read once per page."""
    from flask import g

    from ..state import database
    from ..store.containers import container_names

    if "container_names" not in g:
        g.container_names = set(container_names(database()))
    return name in g.container_names

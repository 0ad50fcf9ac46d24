"""A job's settings, their defaults and their checks, shared by the API and a manifest's
`[[jobs]]`: one place says what a valid job is."""

from __future__ import annotations

import json
import math
import re

from . import schedule as schedules

POLICIES = ("allow", "forbid", "replace")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_RETRIES = 100
BACKOFF_CAP_S = 600.0

# setting: (default, kind, minimum, maximum); kind "number" takes int or float, never bool.
SETTINGS = {
    "timezone": ("UTC", "timezone", None, None),
    "payload": (None, "json", None, None),
    "enabled": (True, "bool", None, None),
    "concurrency": ("forbid", "policy", None, None),
    "retries": (0, "int", 0, MAX_RETRIES),
    "retry_backoff_s": (10.0, "number", 0.1, 3600),
    "timeout_s": (None, "number", 0.1, 24 * 3600),
    "starting_deadline_s": (300.0, "number", 1, 30 * 24 * 3600),
    "history_days": (7.0, "number", 0, 3650),
}


class JobError(ValueError):
    """What is wrong with a job's definition, in words for the user."""


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise JobError(f"job name {schedules.shown(name)} is not valid: lower-case letters, "
                       "digits, '-' and '_', starting with a letter or digit (up to 63)")
    return name


def check_setting(key: str, value, where: str = ""):
    """The value of one setting, checked (None for an optional one means its default)."""
    default, kind, low, high = SETTINGS[key]
    label = f"{where}{key}"
    if value is None:
        if kind == "json":
            return None
        if default is None:
            return None
        raise JobError(f"{label} cannot be null")
    if kind == "bool":
        if not isinstance(value, bool):
            raise JobError(f"{label} must be true or false")
        return value
    if kind == "policy":
        if value not in POLICIES:
            raise JobError(f"{label} must be one of {', '.join(POLICIES)}, not "
                           f"{schedules.shown(value)}")
        return value
    if kind == "timezone":
        try:
            schedules.zone(value)
        except schedules.ScheduleError as exc:
            raise JobError(f"{where}{exc}") from None
        return value
    if kind == "json":
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError):
            raise JobError(f"{label} must be JSON (objects, arrays, strings, numbers, booleans, "
                           "null)") from None
        if size > MAX_PAYLOAD_BYTES:
            raise JobError(f"{label} is {size} bytes as JSON; at most {MAX_PAYLOAD_BYTES}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind == "int" and not isinstance(value, int)):
        raise JobError(f"{label} must be {'an integer' if kind == 'int' else 'a number'}")
    if not math.isfinite(value) or not low <= value <= high:
        raise JobError(f"{label} must be between {low:g} and {high:g}")
    return value if kind == "int" else float(value)


def check_settings(raw: dict, where: str = "", partial: bool = False) -> dict:
    """The settings in `raw` checked, with defaults filled in unless `partial`."""
    out = {} if partial else {key: spec[0] for key, spec in SETTINGS.items()}
    for key in SETTINGS:
        if key in raw:
            out[key] = check_setting(key, raw[key], where)
    return out


def check_schedule(text, timezone: str, now: float | None = None, where: str = ""
                   ) -> schedules.Schedule:
    try:
        return schedules.parse(text, timezone, now)
    except schedules.ScheduleError as exc:
        raise JobError(f"{where}schedule {schedules.shown(text)}: {exc}") from None


def backoff_s(base: float, attempt: int, jitter: float) -> float:
    """The wait before attempt `attempt + 1` after attempt `attempt` failed: `base` doubling
    per attempt, capped at 10 minutes (or at `base` when that is longer), times a jitter in
    [0.5, 1] so that jobs failing together do not retry together."""
    delay = min(max(BACKOFF_CAP_S, base), base * 2 ** max(0, attempt - 1))
    return delay * (0.5 + 0.5 * jitter)

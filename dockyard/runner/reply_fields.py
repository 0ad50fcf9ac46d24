"""The fields of a function process's reply, checked: the process writes its reply frame, and
its code can forge it. Only what has the right type and a sane value reaches the worker's
answer, the HTTP headers and the record; anything else is dropped or replaced, never trusted
(see STYLE.md, "Trust what you measured")."""

from __future__ import annotations

import math

MAX_TEXT = 1 << 20          # of captured output here; the record caps it further
MAX_ERROR_TEXT = 64 * 1024  # of an error's message or traceback
MAX_TYPE = 200              # of an error's type name


def text(value) -> str:
    """Captured stdout/stderr: a string, or nothing."""
    if not isinstance(value, str):
        return ""
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT]


def milliseconds(value) -> float | None:
    """A duration the process measured: a finite, non-negative number, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 <= value < 1e12 else None


def kilobytes(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value < 1 << 53 else None


def flag(value) -> bool | None:
    return value if isinstance(value, bool) else None


def error(value) -> dict:
    """The error a failed call reports: its type, message and traceback as strings."""
    if not isinstance(value, dict):
        return {"type": "BadReply", "message": "the function's process reported a failure "
                "without a proper error"}
    kind = value.get("type")
    if not isinstance(kind, str) or not kind or len(kind) > MAX_TYPE:
        kind = "Error"
    out = {"type": kind}
    for key in ("message", "traceback"):
        part = value.get(key)
        if isinstance(part, str):
            out[key] = part[:MAX_ERROR_TEXT]
    out.setdefault("message", "")
    return out

"""Durations as people write them: 90, 90s, 10m, 2h, 7d (`?since=`, `serve --keep-invocations`)."""

from __future__ import annotations

import re

DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in `text` (a number with an optional unit s, m, h or d); ValueError otherwise."""
    match = DURATION_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 90s, 10m, 2h or 7d")
    return float(match.group(1)) * UNIT_S[match.group(2)]

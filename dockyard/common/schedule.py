"""A job's schedule: parsing and the fire-time computation, pure and clock-free (every function
takes "now" as an argument). Cron expressions go through cronsim, which gets daylight saving
right: a time skipped by spring-forward fires once at the next valid minute, a repeated one
fires once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
EVERY_RE = re.compile(r"@every\s+((?:[0-9]+[hms])+)")
EVERY_PART_RE = re.compile(r"([0-9]+)([hms])")
UNIT_S = {"h": 3600, "m": 60, "s": 1}
MAX_EVERY_S = 366 * 24 * 3600
SHOWN_CHARS = 80


class ScheduleError(ValueError):
    """Why a schedule or a timezone cannot be used, in words for the user."""


def zone(name: str) -> ZoneInfo | timezone:
    """The IANA timezone `name` (UTC as the fixed zone, so cronsim skips its DST handling)."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise ScheduleError(f"timezone {shown(name)} is not an IANA name such as "
                            "'Europe/Berlin'")
    if name in ("UTC", "Etc/UTC"):
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown timezone {shown(name)}: use an IANA name such as "
                            "'Europe/Berlin' or 'UTC'") from None


@dataclass(frozen=True)
class Schedule:
    text: str
    timezone: str
    kind: str                       # "cron", "every" or "at"
    cron: str | None = None         # the expression cronsim runs (a macro expanded)
    every_s: int | None = None
    at: float | None = None         # epoch seconds of a one-time fire

    @property
    def tz(self):
        return zone(self.timezone)

    def next_after(self, t: float, anchor: float | None = None) -> float | None:
        """The first fire time strictly after epoch `t`, or None when there is none (a
        one-time fire that is past, a cron that never matches again). `anchor` is the start
        of an `@every` interval (the job's creation)."""
        if self.kind == "every":
            start = t if anchor is None else anchor
            if t < start:
                return start + self.every_s
            steps = int((t - start) // self.every_s) + 1
            fire = round(start + steps * self.every_s, 3)
            # (float division can land one step short of t)
            return fire if fire > t else round(start + (steps + 1) * self.every_s, 3)
        if self.kind == "at":
            return self.at if self.at > t else None
        # cronsim starts from a whole second and steps forward; at a repeated hour a local
        # time can map back to an instant before `t`, so skip anything not after it.
        it = CronSim(self.cron, datetime.fromtimestamp(int(t), self.tz))
        for _ in range(8):
            try:
                fire = next(it).timestamp()
            except StopIteration:
                return None
            if fire > t:
                return fire
        return None

    def previous_at_or_before(self, t: float) -> float | None:
        """The latest cron time at or before epoch `t` (cron schedules only)."""
        start = datetime.fromtimestamp(int(t), self.tz).replace(microsecond=1)
        try:
            fire = next(CronSim(self.cron, start, reverse=True)).timestamp()
        except StopIteration:
            return None
        return fire if fire <= t else None

    def next_times(self, after: float, count: int = 5, anchor: float | None = None
                   ) -> list[float]:
        out: list[float] = []
        t = after
        while len(out) < count:
            nxt = self.next_after(t, anchor)
            if nxt is None:
                break
            out.append(nxt)
            t = nxt
        return out

    def explain(self) -> str:
        where = "" if self.timezone == "UTC" else f" ({self.timezone} time)"
        if self.kind == "every":
            return f"Every {_duration(self.every_s)}, counted from the job's creation"
        if self.kind == "at":
            when = datetime.fromtimestamp(self.at, self.tz).strftime("%Y-%m-%d %H:%M:%S")
            return f"Once, at {when}{where}"
        try:
            text = CronSim(self.cron, datetime(2000, 1, 1)).explain()
        except Exception:  # noqa: BLE001 - explain() is prose; a gap in it is not an error
            text = f"Cron schedule {self.cron}"
        suffix = " (UTC)" if self.timezone == "UTC" else where
        return text + suffix


def parse(text: str, timezone_name: str = "UTC", now: float | None = None) -> Schedule:
    """A Schedule from its text: 5-field cron, 6 fields with seconds first, a macro
    (@hourly …), `@every 30s|5m|1h` (parts may be combined: 1h30m), or `@at
    2026-12-01T09:00` (in the timezone). Raises ScheduleError saying what is wrong (without
    the text itself: the caller quotes it). With `now`, a schedule that can never fire after
    it is refused too."""
    if not isinstance(text, str):
        raise ScheduleError("must be a string such as '*/5 * * * *', '@every 30s' or "
                            "'@at 2026-12-01T09:00'")
    if not text.strip():
        raise ScheduleError("empty: give a cron expression such as '*/5 * * * *', @hourly, "
                            "'@every 30s' or '@at 2026-12-01T09:00'")
    text = " ".join(text.split())
    tz = zone(timezone_name)
    if text.startswith("@every"):
        schedule = Schedule(text, timezone_name, "every", every_s=_every_seconds(text))
    elif text.startswith("@at"):
        schedule = Schedule(text, timezone_name, "at", at=_at_epoch(text[3:].strip(), tz))
    else:
        expr = MACROS.get(text.lower(), text)
        if expr.startswith("@"):
            raise ScheduleError(f"unknown macro; known: {', '.join(sorted(MACROS))}, "
                                "@every, @at")
        fields = len(expr.split())
        if fields not in (5, 6):
            raise ScheduleError(f"not a cron expression: it has {fields} field"
                                f"{'s' if fields != 1 else ''}; cron has 5 (minute hour day "
                                "month weekday) or 6 (seconds first)")
        try:
            CronSim(expr, datetime(2000, 1, 1))
        except CronSimError as exc:
            _check_day_in_months(expr)
            raise ScheduleError(f"not a cron expression ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - a malformed field can trip more than that
            raise ScheduleError(f"not a cron expression ({type(exc).__name__}: "
                                f"{shown(str(exc))})") from None
        schedule = Schedule(text, timezone_name, "cron", cron=expr)
    if now is not None and schedule.kind != "every" and schedule.next_after(now) is None:
        raise ScheduleError("is in the past" if schedule.kind == "at" else "never fires")
    return schedule


def _check_day_in_months(expr: str) -> None:
    """cronsim refuses a day of month that none of the months has (`0 0 31 2 *`) with the
    words it uses for a day out of range: say that such a schedule never fires."""
    fields = expr.split()
    month = len(fields) - 2
    try:
        sim = CronSim(" ".join(fields[:month] + ["*"] + fields[month + 1:]),
                      datetime(2000, 1, 1))
    except Exception:  # noqa: BLE001 - the day itself is wrong: cronsim's words say so
        return
    days = getattr(sim, "days", None)
    day = f"day {min(days)}" if days else "the day it names"
    raise ScheduleError(f"never fires: no month it names has {day} (February has at most 29 "
                        "days; April, June, September and November 30)")


def _every_seconds(text: str) -> int:
    match = EVERY_RE.fullmatch(text)
    if not match:
        raise ScheduleError("use @every N followed by s, m or h (@every 30s, @every 5m, "
                            "@every 1h30m)")
    seconds = sum(int(n) * UNIT_S[unit] for n, unit in EVERY_PART_RE.findall(match.group(1)))
    if seconds < 1:
        raise ScheduleError("the interval of @every must be at least 1s")
    if seconds > MAX_EVERY_S:
        raise ScheduleError("the interval of @every must be at most 366 days")
    return seconds


def _at_epoch(value: str, tz) -> float:
    try:
        local = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ScheduleError(f"@at wants a date and time such as 2026-12-01T09:00 "
                            f"({shown(str(exc))})") from None
    if local.tzinfo is not None:
        return local.timestamp()
    local = local.replace(tzinfo=tz, fold=0)
    # A wall time that does not exist (skipped by spring-forward) fires at the next valid
    # minute, as cron times do.
    for _ in range(180):
        if _exists(local):
            return local.timestamp()
        local = (local + timedelta(minutes=1)).replace(second=0, microsecond=0)
    return local.timestamp()


def _exists(local: datetime) -> bool:
    back = local.astimezone(timezone.utc).astimezone(local.tzinfo)
    return back.replace(tzinfo=None) == local.replace(tzinfo=None)


def _duration(seconds: int) -> str:
    parts = []
    for unit, size, name in (("h", 3600, "hour"), ("m", 60, "minute"), ("s", 1, "second")):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {name}{'s' if n != 1 else ''}")
    return " ".join(parts)


def shown(value) -> str:
    text = repr(value[:SHOWN_CHARS + 1] if isinstance(value, str) else value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def iso(epoch: float | None, timezone_name: str = "UTC") -> str | None:
    """An epoch time as ISO 8601 in a job's timezone (with its offset), for people."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, zone(timezone_name)).isoformat(timespec="seconds")


# -- what is due ----------------------------------------------------------------------------

MAX_MISSED_LISTED = 100      # missed times recorded one by one; earlier ones are counted
MAX_SCAN = 10_000            # cron times looked at after a long gap (then the count is a floor)


@dataclass(frozen=True)
class Due:
    fire: float | None            # the scheduled time to fire now, if any
    missed: tuple[float, ...]     # scheduled times recorded as missed, oldest first
    missed_before: int            # more missed times, before missed[0] (counted, not listed)
    next_fire_at: float | None    # the first scheduled time after now


def due(schedule: Schedule, next_fire_at: float, now: float, anchor: float | None,
        starting_deadline_s: float) -> Due:
    """Which scheduled times from `next_fire_at` up to `now` fire and which are missed. Only
    the latest one may fire, and only within its starting deadline: after downtime a job runs
    once, not once per missed time; everything older is missed."""
    times: list[float] = []
    before = 0
    if schedule.kind == "every":
        # Counted, not walked: a long gap in a 1-second interval is many times.
        step = schedule.every_s
        base = next_fire_at - step if anchor is None else anchor
        k0 = round((next_fire_at - base) / step)
        total = int((now - next_fire_at) // step) + 1 if now >= next_fire_at else 0
        before = max(0, total - MAX_MISSED_LISTED - 1)
        times = [t for t in (round(base + (k0 + k) * step, 3) for k in range(before, total))
                 if t <= now]
        after = schedule.next_after(now, base)
    else:
        t: float | None = next_fire_at
        scanned = 0
        while t is not None and t <= now:
            times.append(t)
            if len(times) > MAX_MISSED_LISTED + 1:
                times.pop(0)
                before += 1
            scanned += 1
            if scanned >= MAX_SCAN:
                # A long gap: the rest is counted as one more at least, and the latest time
                # before now is found walking back from now.
                latest = schedule.previous_at_or_before(now)
                if latest is not None and latest > times[-1]:
                    times.append(latest)
                    times.pop(0)
                    before += 2
                t = schedule.next_after(now, anchor)
                break
            t = schedule.next_after(t, anchor)
        after = t
    if not times:
        return Due(None, (), 0, next_fire_at)
    latest = times[-1]
    if now - latest <= starting_deadline_s:
        return Due(latest, tuple(times[:-1]), before, after)
    return Due(None, tuple(times), before, after)

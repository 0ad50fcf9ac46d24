"""Times as the CLI prints them: every one says its zone. UTC by default; `--tz ZONE` (or
DOCKYARD_TZ) for another IANA zone, `local` for this machine's. A job's times are shown in the
job's own zone with the CLI's zone beside them, so a job's run and the call it made read the
same."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo

import click

from ..common.schedule import ScheduleError, zone

LOCAL = "local"
FORMAT = "%Y-%m-%d %H:%M:%S"

# The zone of this process's output, from --tz / DOCKYARD_TZ (a CLI process runs one command);
# looked up when the first time is printed, so a bad DOCKYARD_TZ troubles only commands that
# print times.
_name: str | None = None
_shown: list = []


def use(name: str | None) -> None:
    """Print times in zone `name` (None: UTC)."""
    global _name
    _name = name
    _shown.clear()


def shown_zone() -> tzinfo | None:
    """The zone times are printed in (an unknown one is a usage error, said once)."""
    if not _shown:
        _shown.append(zone_named(_name))
    return _shown[0]


def zone_named(name: str | None) -> tzinfo | None:
    """The zone `name` stands for: UTC for None, this machine's for `local` (None: Python then
    takes the machine's offset at each instant), else an IANA zone."""
    if not name or name.upper() == "UTC":
        return timezone.utc
    if name.lower() == LOCAL:
        return None
    try:
        return zone(name)
    except ScheduleError:
        raise click.ClickException(f"unknown zone '{name}' (--tz or DOCKYARD_TZ): give an "
                                   "IANA name such as Europe/Berlin, UTC or local (this "
                                   "machine's)") from None


def _in(ts: float, tz: tzinfo | None) -> datetime:
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return moment.astimezone(tz) if tz is not None else moment.astimezone()


def _label(moment: datetime) -> str:
    return moment.tzname() or moment.strftime("%z")


def at(ts) -> str:
    """An epoch time in the CLI's zone, with the zone's name: `2026-03-01 12:21:12 UTC`."""
    if not ts:
        return "-"
    moment = _in(ts, shown_zone())
    return f"{moment.strftime(FORMAT)} {_label(moment)}"


def at_job(ts, job_zone: str | None) -> str:
    """An epoch time of a job in the job's zone, and in the CLI's zone beside it when that
    differs: `2026-03-01 13:21:12 CET (12:21:12 UTC)` (the date too when it differs)."""
    if not ts:
        return "-"
    try:
        own = zone(job_zone or "UTC")
    except ScheduleError:
        return at(ts)   # a zone this machine does not know: the CLI's alone
    there, here = _in(ts, own), _in(ts, shown_zone())
    first = f"{there.strftime(FORMAT)} {_label(there)}"
    if there.utcoffset() == here.utcoffset() and _label(there) == _label(here):
        return first
    other = here.strftime(FORMAT if here.date() != there.date() else "%H:%M:%S")
    return f"{first} ({other} {_label(here)})"


def at_iso(text: str | None, job_zone: str | None) -> str:
    """An ISO 8601 time with its offset (as the API gives a job's next fires), as at_job."""
    if not text:
        return "-"
    try:
        return at_job(datetime.fromisoformat(text).timestamp(), job_zone)
    except ValueError:
        return text

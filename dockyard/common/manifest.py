"""`dockyard.toml`: parsing and validating a package's manifest into a `Manifest`."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from cronsim import CronSim, CronSimError

from ..errors import BadPackage, NotFound

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
SHORT_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
TARGET_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                       r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
TOP_KEYS = {"name", "version", "dependencies", "requirements", "env", "functions", "limits",
            "jobs"}
# key: (type, minimum, maximum); bool is checked apart because bool is an int in Python.
LIMITS = {
    "timeout_s": ((int, float), 0, 3600),
    "memory_mb": (int, 16, 65536),
    "concurrency": (int, 1, 1000),
    "instances": (int, 0, 64),
    "processes": (int, 1, 65536),
    "tmp_mb": (int, 1, 65536),
    "cpus": ((int, float), 0.05, 1024),
}
JOB_KEYS = {"name", "function", "schedule", "timezone", "payload", "enabled", "concurrency",
            "retries", "timeout_s", "starting_deadline_s"}


@dataclass
class Limits:
    timeout_s: float = 30
    memory_mb: int = 512
    concurrency: int = 1
    instances: int = 1
    network: bool = True
    processes: int = 64
    tmp_mb: int = 512                # size of the private /tmp (and of /dev/shm)
    cpus: float | None = None        # a CPU share (cgroup quota); None: no share limit


@dataclass
class JobSpec:
    name: str
    function: str
    schedule: str
    timezone: str = "UTC"
    payload: object = None


@dataclass
class Manifest:
    name: str
    version: str | None = None
    dependencies: list[str] = field(default_factory=list)
    requirements: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    functions: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    jobs: list[JobSpec] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        data["limits"] = Limits(**data.get("limits", {}))
        data["jobs"] = [JobSpec(**j) for j in data.get("jobs", [])]
        return cls(**data)

    def resolve_function(self, name: str) -> str:
        """A short name from [functions] → its "module:callable"; an explicit
        "module:callable" is taken as is (the child says if it does not exist)."""
        if name in self.functions:
            return self.functions[name]
        if TARGET_RE.fullmatch(name):
            return name
        declared = ", ".join(sorted(self.functions)) or "none"
        raise NotFound(f"container '{self.name}' has no function '{name}'; declared: "
                       f"{declared} (or call any 'module:callable')")


def _bad(message: str) -> BadPackage:
    return BadPackage(f"dockyard.toml: {message}")


def validate_container_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _bad(f"name {name!r} is not valid: use 1-63 lowercase letters, digits and "
                   "dashes, starting with a letter or digit")
    return name


def _string_list(value, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _bad(f"'{key}' must be a list of strings")
    return list(value)


def _limits(raw) -> Limits:
    if not isinstance(raw, dict):
        raise _bad("[limits] must be a table")
    values = {}
    for key, value in raw.items():
        if key == "network":
            if not isinstance(value, bool):
                raise _bad("limits.network must be true or false")
            values[key] = value
            continue
        if key not in LIMITS:
            raise _bad(f"unknown key limits.{key}; known: {', '.join(sorted([*LIMITS, 'network']))}")
        kind, low, high = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _bad(f"limits.{key} must be a number")
        if key == "timeout_s":
            if not low < value <= high:
                raise _bad(f"limits.timeout_s must be more than 0 and at most {high}")
        elif not low <= value <= high:
            raise _bad(f"limits.{key} must be between {low} and {high}")
        values[key] = value
    return Limits(**values)


def _functions(raw) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise _bad("[functions] must be a table of name = \"module:callable\"")
    for short, target in raw.items():
        if not SHORT_NAME_RE.fullmatch(short):
            raise _bad(f"function name {short!r} is not valid (letters, digits, _ and -)")
        if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
            raise _bad(f"functions.{short} = {target!r} is not 'module:callable'")
    return dict(raw)


MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
EVERY_RE = re.compile(r"@every\s+([1-9][0-9]*)(s|m|h)")


def schedule_problem(schedule: str) -> str | None:
    """Why a schedule is not valid, or None: 5-field cron, 6 with seconds, a macro, or
    `@every N{s,m,h}`."""
    text = schedule.strip()
    if text.startswith("@every"):
        return None if EVERY_RE.fullmatch(text) else "use @every N followed by s, m or h"
    try:
        CronSim(MACROS.get(text, text), datetime(2000, 1, 1))
    except CronSimError as exc:
        return f"not a cron expression ({exc})"
    return None


def _known_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _jobs(raw) -> list[JobSpec]:
    if not isinstance(raw, list):
        raise _bad("[[jobs]] must be an array of tables")
    jobs = []
    for i, job in enumerate(raw):
        if not isinstance(job, dict):
            raise _bad(f"jobs[{i}] must be a table")
        unknown = set(job) - JOB_KEYS
        if unknown:
            raise _bad(f"unknown key jobs[{i}].{sorted(unknown)[0]}")
        for key in ("name", "function", "schedule"):
            if not isinstance(job.get(key), str) or not job[key].strip():
                raise _bad(f"jobs[{i}] needs '{key}' (a string)")
        problem = schedule_problem(job["schedule"])
        if problem:
            raise _bad(f"jobs[{i}].schedule {job['schedule']!r}: {problem}")
        tz = job.get("timezone", "UTC")
        if not isinstance(tz, str) or not _known_timezone(tz):
            raise _bad(f"jobs[{i}].timezone {tz!r} is not an IANA name such as "
                       "'Europe/Berlin'")
        jobs.append(JobSpec(job["name"], job["function"], job["schedule"], tz,
                            job.get("payload")))
    return jobs


def parse_manifest(text: str) -> Manifest:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _bad(f"not valid TOML: {exc}") from None
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise _bad(f"unknown key '{sorted(unknown)[0]}'; known: {', '.join(sorted(TOP_KEYS))}")
    if "name" not in data:
        raise _bad("'name' is required, e.g. name = \"hello\"")
    name = validate_container_name(data["name"])
    version = data.get("version")
    if version is not None and (not isinstance(version, str) or not VERSION_RE.fullmatch(version)):
        raise _bad(f"version {version!r} is not valid: letters, digits, '.', '_', '+', '-' "
                   "(up to 64)")
    dependencies = _string_list(data.get("dependencies", []), "dependencies")
    requirements = data.get("requirements")
    if requirements is not None and (not isinstance(requirements, str) or not requirements):
        raise _bad("'requirements' must be a path inside the package")
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise _bad("'env' must be a table of strings, e.g. env = { GREETING = \"hi\" }")
    functions = _functions(data.get("functions", {}))
    jobs = _jobs(data.get("jobs", []))
    for i, job in enumerate(jobs):
        if job.function not in functions and not TARGET_RE.fullmatch(job.function):
            raise _bad(f"jobs[{i}].function '{job.function}' is neither a name in [functions] "
                       "nor 'module:callable'")
    return Manifest(name=name, version=version, dependencies=dependencies,
                    requirements=requirements, env=dict(env), functions=functions,
                    limits=_limits(data.get("limits", {})), jobs=jobs)

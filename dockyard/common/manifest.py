"""`dockyard.toml`: parsing and validating a package's manifest into a `Manifest`."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field
from datetime import date, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import BadPackage, NotFound
from .jobs import SETTINGS as JOB_SETTINGS
from .jobs import JobError, check_name, check_setting
from .schedule import ScheduleError
from .schedule import parse as parse_schedule

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
SHORT_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
TARGET_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                       r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# What a caller may name besides a declared function: a module of the package and one
# callable defined in it (no attribute chain, no dunder).
CALL_TARGET_RE = re.compile(r"(?P<module>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)"
                            r":(?!__)[A-Za-z_][A-Za-z0-9_]*")
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
    # Seconds a call waits for a free instance (then 429): long enough for a process to pick
    # up a call it is free for, short enough that a web thread is never held for long.
    "queue_timeout_s": ((int, float), 0.1, 300),
}
JOB_KEYS = {"name", "function", "schedule", *JOB_SETTINGS}

# Bounds on what an upload may ask of the parser and of the workers that carry the manifest.
# The text checks run before tomllib sees the manifest: tomllib recurses once per nesting
# level, and its dotted-key handling is quadratic in the number of parts (one 64 KB key of
# 32 000 parts takes about 16 s).
MAX_MANIFEST_BYTES = 64 * 1024     # of dockyard.toml
MAX_KEY_PARTS = 32                 # parts of one dotted key or [table.name]
MAX_NESTING = 32                   # arrays and tables inside one another
MAX_ENV_VARS = 64
MAX_ENV_VALUE_BYTES = 4 * 1024     # one value
MAX_ENV_BYTES = 32 * 1024          # all names and values together
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set for every child by the sandbox (Isolation.env, and HOME/TMPDIR per process): a manifest
# cannot change them.
# Set by dockyard for every process; the locale (LANG, LC_ALL) is only a default and may be
# changed by the manifest.
RESERVED_ENV = frozenset({"PATH", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "HOME", "TMPDIR"})
LOCALE_ENV = frozenset({"LANG", "LC_ALL"})
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1   # TOML integers are 64-bit
SHOWN_CHARS = 80                   # of a user-supplied value quoted in an error message


@dataclass
class Limits:
    timeout_s: float = 30
    memory_mb: int = 512
    concurrency: int = 1
    instances: int = 1
    network: bool = True
    processes: int = 64
    tmp_mb: int = 512                # size of the private /tmp (and of /dev/shm)
    cpus: float | None = None        # a CPU share (cgroup quota); None: one CPU
    queue_timeout_s: float = 10      # how long a call waits for a busy instance (then 429)


@dataclass
class JobSpec:
    """A `[[jobs]]` entry; the settings and their defaults are those of common/jobs.py."""

    name: str
    function: str
    schedule: str
    timezone: str = "UTC"
    payload: object = None
    enabled: bool = True
    concurrency: str = "forbid"
    retries: int = 0
    retry_backoff_s: float = 10.0
    timeout_s: float | None = None
    starting_deadline_s: float = 300.0
    history_days: float = 7.0


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
    # Not from dockyard.toml: the package's own module names, found in the package when it
    # was uploaded (None for a manifest read on its own).
    modules: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        data["limits"] = Limits(**data.get("limits", {}))
        data["jobs"] = [JobSpec(**j) for j in data.get("jobs", [])]
        return cls(**data)

    def resolve_function(self, name: str) -> str:
        """A short name from [functions] → its "module:callable"; otherwise "module:callable"
        of one of the package's own modules. Anything else (the standard library, the venv's
        packages, an attribute chain such as "main:os.getenv") is a 404 before anything runs;
        the child checks the same again against its files."""
        if name in self.functions:
            return self.functions[name]
        match = CALL_TARGET_RE.fullmatch(name)
        if match and self.modules is not None and match["module"] in self.modules:
            return name
        if match and self.modules is None and match["module"].split(".")[0] not in \
                sys.stdlib_module_names:
            return name     # a version stored before its modules were listed: the child decides
        names = sorted(self.functions)
        declared = ", ".join(clipped(n) for n in names[:10]) or "none"
        if len(names) > 10:
            declared += f" and {len(names) - 10} more"
        raise NotFound(f"container '{self.name}' has no function '{clipped(name)}' "
                       f"(declared: {declared}); declare it in [functions] of dockyard.toml, "
                       "or call 'module:callable' of a module of the package's own code")


def quoted(value) -> str:
    """repr() of a user-supplied value for an error message: one line, at most SHOWN_CHARS
    characters."""
    if isinstance(value, str):
        value = value[:SHOWN_CHARS + 1]
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def clipped(text) -> str:
    """A user-supplied string for a message, unquoted: escaped to one line, at most
    SHOWN_CHARS characters."""
    text = repr(str(text)[:SHOWN_CHARS + 1])[1:-1]
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def _bad(message: str) -> BadPackage:
    return BadPackage(f"dockyard.toml: {message}")


def validate_container_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _bad(f"name {quoted(name)} is not valid: use 1-63 lowercase letters, digits and "
                   "dashes, starting with a letter or digit")
    return name


def _env(raw) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in raw.items()):
        raise _bad("'env' must be a table of strings, e.g. env = { GREETING = \"hi\" }")
    if len(raw) > MAX_ENV_VARS:
        raise _bad(f"'env' has {len(raw)} variables; the limit is {MAX_ENV_VARS}")
    total = 0
    for key, value in raw.items():
        if not ENV_NAME_RE.fullmatch(key):
            raise _bad(f"env name {quoted(key)} is not valid: letters, digits and _, not "
                       "starting with a digit")
        if key in RESERVED_ENV:
            raise _bad(f"env.{key} is set by dockyard for every process and cannot be changed "
                       f"(reserved: {', '.join(sorted(RESERVED_ENV))})")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ENV_VALUE_BYTES:
            raise _bad(f"env.{clipped(key)} is {size} bytes; the limit is {MAX_ENV_VALUE_BYTES} "
                       "bytes per value")
        if "\0" in value:
            raise _bad(f"env.{clipped(key)} contains a NUL character")
        total += len(key) + size
    if total > MAX_ENV_BYTES:
        raise _bad(f"'env' is {total} bytes (names and values); the limit is {MAX_ENV_BYTES} "
                   "bytes")
    return dict(raw)


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
            raise _bad(f"unknown key limits.{clipped(key)}; known: "
                       f"{', '.join(sorted([*LIMITS, 'network']))}")
        kind, low, high = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _bad(f"limits.{key} must be a number")
        if key == "timeout_s":
            if not low < value <= high:
                raise _bad(f"limits.timeout_s must be more than 0 and at most {high}")
        elif key == "queue_timeout_s":
            if not low <= value <= high:
                raise _bad(f"limits.queue_timeout_s must be between {low} and {high} (the "
                           "seconds a call waits for a busy instance before a 429)")
        elif not low <= value <= high:
            raise _bad(f"limits.{key} must be between {low} and {high}")
        values[key] = value
    return Limits(**values)


def _functions(raw) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise _bad("[functions] must be a table of name = \"module:callable\"")
    for short, target in raw.items():
        if not SHORT_NAME_RE.fullmatch(short):
            raise _bad(f"function name {quoted(short)} is not valid (letters, digits, _ and -)")
        if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
            raise _bad(f"functions.{clipped(short)} = {quoted(target)} is not 'module:callable'")
    return dict(raw)


def _known_timezone(name: str) -> bool:
    if len(name) > 255:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _has_time(value) -> bool:
    """Whether a TOML value holds a date or a time anywhere (JSON has neither)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (date, time)):  # a datetime is a date
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _jobs(raw) -> list[JobSpec]:
    if not isinstance(raw, list):
        raise _bad("[[jobs]] must be an array of tables")
    jobs = []
    names = set()
    for i, job in enumerate(raw):
        if not isinstance(job, dict):
            raise _bad(f"jobs[{i}] must be a table")
        unknown = set(job) - JOB_KEYS
        if unknown:
            raise _bad(f"unknown key jobs[{i}].{clipped(sorted(unknown)[0])}")
        for key in ("name", "function", "schedule"):
            if not isinstance(job.get(key), str) or not job[key].strip():
                raise _bad(f"jobs[{i}] needs '{key}' (a string)")
        tz = job.get("timezone", "UTC")
        if not isinstance(tz, str) or not _known_timezone(tz):
            raise _bad(f"jobs[{i}].timezone {quoted(tz)} is not an IANA name such as "
                       "'Europe/Berlin'")
        try:
            parse_schedule(job["schedule"], tz)
        except ScheduleError as exc:
            raise _bad(f"jobs[{i}].schedule {quoted(job['schedule'])}: {exc}") from None
        if _has_time(job.get("payload")):
            raise _bad(f"jobs[{i}].payload holds a date or a time, which JSON cannot carry; "
                       "write it as a string")
        try:
            check_name(job["name"])
            settings = {key: check_setting(key, job[key], f"jobs[{i}].")
                        for key in JOB_SETTINGS if key in job}
        except JobError as exc:
            raise _bad(f"jobs[{i}]: {exc}" if str(exc).startswith("job name") else str(exc)
                       ) from None
        if job["name"] in names:
            raise _bad(f"two jobs are named {quoted(job['name'])}")
        names.add(job["name"])
        jobs.append(JobSpec(job["name"], job["function"], job["schedule"], **settings))
    return jobs


_SPECIAL = re.compile(r"""["'#.=,\[\]{}\n]""")
_BASIC_REST = re.compile(r'(?:[^"\\\n]|\\.)*"')                   # after the opening "
_ML_BASIC_REST = re.compile(r'(?:[^"\\]|\\.|"(?!""))*"""', re.S)   # after the opening """


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _string_end(text: str, start: int) -> int:
    """Where the TOML string opening at `start` ends (one past its closing quote), or -1 if it
    is not closed."""
    quote = text[start]
    if text.startswith(quote * 3, start):
        if quote == '"':
            rest = _ML_BASIC_REST.match(text, start + 3)
            end = rest.end() if rest else -1
        else:
            end = text.find("'''", start + 3)
            end = end + 3 if end >= 0 else -1
        # Up to two more quotes still belong to the string: """a""""" is 'a""'.
        for _ in range(2):
            if end >= 0 and text.startswith(quote, end):
                end += 1
        return end
    if quote == '"':
        rest = _BASIC_REST.match(text, start + 1)
        return rest.end() if rest else -1
    end = text.find("'", start + 1)
    if end < 0 or "\n" in text[start + 1:end]:
        return -1
    return end + 1


def _check_shape(text: str) -> None:
    """Refuse, before tomllib sees it, a manifest that nests more than MAX_NESTING arrays or
    tables or has a dotted key of more than MAX_KEY_PARTS parts. One pass over the text that
    skips strings and comments the way TOML reads them; an unclosed string is refused here,
    so nothing after it goes unchecked."""
    depth = dots = 0
    pos = 0
    while True:
        match = _SPECIAL.search(text, pos)
        if match is None:
            return
        char, pos = match.group(), match.end()
        if char == ".":
            # Dots between two separators: the parts of one key (a float has one dot).
            dots += 1
            if dots >= MAX_KEY_PARTS:
                raise _bad(f"the dotted key on line {_line(text, pos)} has more than "
                           f"{MAX_KEY_PARTS} parts")
            continue
        if char in "\"'":
            end = _string_end(text, pos - 1)
            if end < 0:
                raise _bad(f"not valid TOML: the string on line {_line(text, pos)} is not "
                           "closed")
            pos = end
            continue
        dots = 0
        if char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise _bad(f"line {_line(text, pos)} nests arrays or tables more than "
                           f"{MAX_NESTING} deep")
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif char == "#":
            newline = text.find("\n", pos)
            pos = len(text) if newline < 0 else newline


def _check_values(data: dict) -> None:
    """The parsed data's nesting depth and integer range, without recursion."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                raise _bad(f"tables and arrays nest more than {MAX_NESTING} deep")
            stack.extend((item, depth + 1)
                         for item in (value.values() if isinstance(value, dict) else value))
        elif isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
            raise _bad("an integer does not fit in 64 bits")


def _load(text: str) -> dict:
    """tomllib.loads with bounds: every failure is a BadPackage with a one-line message."""
    if len(text) > MAX_MANIFEST_BYTES or \
            len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise _bad(f"the manifest is larger than the limit of {MAX_MANIFEST_BYTES // 1024} KB")
    _check_shape(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _bad(f"not valid TOML: {clipped(exc)}") from None
    except RecursionError:
        raise _bad(f"not valid TOML: nested too deep (the limit is {MAX_NESTING})") from None
    except Exception as exc:  # e.g. ValueError for an integer of thousands of digits
        raise _bad(f"not valid TOML: {clipped(f'{type(exc).__name__}: {exc}')}") from None
    _check_values(data)
    return data


def parse_manifest(text: str) -> Manifest:
    data = _load(text)
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise _bad(f"unknown key '{clipped(sorted(unknown)[0])}'; known: "
                   f"{', '.join(sorted(TOP_KEYS))}")
    if "name" not in data:
        raise _bad("'name' is required, e.g. name = \"hello\"")
    name = validate_container_name(data["name"])
    version = data.get("version")
    if version is not None and (not isinstance(version, str) or not VERSION_RE.fullmatch(version)):
        raise _bad(f"version {quoted(version)} is not valid: letters, digits, '.', '_', '+', "
                   "'-' (up to 64)")
    dependencies = _string_list(data.get("dependencies", []), "dependencies")
    requirements = data.get("requirements")
    if requirements is not None and (not isinstance(requirements, str) or not requirements):
        raise _bad("'requirements' must be a path inside the package")
    env = _env(data.get("env", {}))
    functions = _functions(data.get("functions", {}))
    jobs = _jobs(data.get("jobs", []))
    for i, job in enumerate(jobs):
        if job.function not in functions and not TARGET_RE.fullmatch(job.function):
            raise _bad(f"jobs[{i}].function '{clipped(job.function)}' is neither a name in "
                       "[functions] nor 'module:callable'")
    return Manifest(name=name, version=version, dependencies=dependencies,
                    requirements=requirements, env=env, functions=functions,
                    limits=_limits(data.get("limits", {})), jobs=jobs)

"""dockyard.toml parsing: defaults, every validation error, round trip, function names."""

import pytest

from dockyard.common.manifest import Limits, Manifest, parse_manifest
from dockyard.errors import BadPackage, NotFound

FULL = '''
name = "hello"
version = "1.2.0"
dependencies = ["jinja2>=3.1"]
env = { GREETING = "hi" }

[functions]
greet = "main:greet"
deep = "pkg.mod:Class.method"

[limits]
timeout_s = 2.5
memory_mb = 128
concurrency = 4
instances = 0
network = false
processes = 8

[[jobs]]
name = "nightly"
function = "greet"
schedule = "0 3 * * *"
timezone = "Europe/Berlin"
payload = { who = "cron" }
'''


def test_defaults():
    m = parse_manifest('name = "a"\n')
    assert m.name == "a" and m.version is None and m.dependencies == []
    assert m.limits == Limits() and m.limits.timeout_s == 30 and m.limits.memory_mb == 512
    assert m.limits.concurrency == 1 and m.limits.instances == 1
    assert m.limits.network is True and m.limits.processes == 64


def test_full_manifest_round_trip():
    m = parse_manifest(FULL)
    assert m.version == "1.2.0" and m.env == {"GREETING": "hi"}
    assert m.limits.network is False and m.limits.instances == 0 and m.limits.timeout_s == 2.5
    assert m.jobs[0].timezone == "Europe/Berlin" and m.jobs[0].payload == {"who": "cron"}
    assert Manifest.from_dict(m.to_dict()) == m


def test_resolve_function():
    m = parse_manifest(FULL)
    assert m.resolve_function("greet") == "main:greet"
    assert m.resolve_function("other.mod:fn") == "other.mod:fn"
    with pytest.raises(NotFound, match="no function 'nope'; declared: deep, greet"):
        m.resolve_function("nope")


@pytest.mark.parametrize("text, message", [
    ("name = ", "not valid TOML"),
    ('version = "1"\n', "'name' is required"),
    ('name = "Bad_Name"\n', "name 'Bad_Name' is not valid"),
    ('name = "-x"\n', "is not valid"),
    ('name = "' + "a" * 64 + '"\n', "is not valid"),
    ('name = "a"\nversion = "1 0"\n', "version '1 0' is not valid"),
    ('name = "a"\nsurprise = 1\n', "unknown key 'surprise'"),
    ('name = "a"\ndependencies = "jinja2"\n', "'dependencies' must be a list of strings"),
    ('name = "a"\nenv = { A = 1 }\n', "'env' must be a table of strings"),
    ('name = "a"\n[functions]\nf = "nocolon"\n', "is not 'module:callable'"),
    ('name = "a"\n[functions]\n"f f" = "m:f"\n', "function name 'f f' is not valid"),
    ('name = "a"\n[limits]\ntimeout_s = 0\n', "timeout_s must be more than 0"),
    ('name = "a"\n[limits]\nmemory_mb = 8\n', "memory_mb must be between 16 and 65536"),
    ('name = "a"\n[limits]\ninstances = 65\n', "instances must be between 0 and 64"),
    ('name = "a"\n[limits]\nconcurrency = true\n', "concurrency must be a number"),
    ('name = "a"\n[limits]\nnetwork = "no"\n', "network must be true or false"),
    ('name = "a"\n[limits]\ncpu = 1\n', "unknown key limits.cpu"),
    ('name = "a"\n[[jobs]]\nname = "j"\nfunction = "f"\n', "jobs[0] needs 'schedule'"),
    ('name = "a"\n[[jobs]]\nname = "j"\nfunction = "m:f"\nschedule = "61 * * * *"\n',
     "jobs[0].schedule '61 * * * *': not a cron expression"),
    ('name = "a"\n[[jobs]]\nname = "j"\nfunction = "m:f"\nschedule = "@every 5x"\n',
     "use @every N followed by s, m or h"),
    ('name = "a"\n[[jobs]]\nname = "j"\nfunction = "m:f"\nschedule = "@daily"\n'
     'timezone = "Mars/Olympus"\n', "jobs[0].timezone 'Mars/Olympus' is not an IANA name"),
    ('name = "a"\n[[jobs]]\nname = "j"\nfunction = "nope"\nschedule = "@hourly"\n',
     "jobs[0].function 'nope' is neither a name in [functions]"),
])
def test_errors_name_the_problem(text, message):
    with pytest.raises(BadPackage) as info:
        parse_manifest(text)
    assert message in info.value.message
    assert info.value.message.startswith("dockyard.toml: ")
    assert "\n" not in info.value.message


@pytest.mark.parametrize("schedule", ["0 3 * * *", "*/5 * * * * *", "@weekly", "@every 30s",
                                      "@every 2h"])
def test_job_schedules_accepted(schedule):
    m = parse_manifest(f'name = "a"\n[functions]\ng = "m:g"\n[[jobs]]\nname = "j"\n'
                       f'function = "g"\nschedule = "{schedule}"\ntimezone = "Europe/Berlin"\n')
    assert m.jobs[0].schedule == schedule

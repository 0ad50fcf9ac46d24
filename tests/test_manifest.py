"""dockyard.toml parsing: defaults, every validation error, round trip, function names."""

import pytest

from dockyard.common.manifest import (MAX_ENV_BYTES, MAX_ENV_VALUE_BYTES, MAX_ENV_VARS,
                                      MAX_KEY_PARTS, MAX_MANIFEST_BYTES, MAX_NESTING,
                                      LOCALE_ENV, RESERVED_ENV, SHOWN_CHARS, Limits, Manifest,
                                      parse_manifest)
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
    # A manifest read on its own does not know the package's modules: only the standard
    # library is refused before the child looks (see test_invoke_gate.py).
    assert m.resolve_function("other.mod:fn") == "other.mod:fn"
    with pytest.raises(NotFound, match=r"no function 'nope' \(declared: deep, greet\)"):
        m.resolve_function("nope")
    m.modules = ["main"]
    with pytest.raises(NotFound):
        m.resolve_function("other.mod:fn")


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


# -- bounds: a hostile manifest is a 400 with a short one-line message ----------------------

def refused(text: str) -> str:
    with pytest.raises(BadPackage) as info:
        parse_manifest(text)
    message = info.value.message
    assert message.startswith("dockyard.toml: ") and "\n" not in message
    return message


@pytest.mark.parametrize("text", [
    "a = " + "[" * 5000 + "]" * 5000,                      # past the interpreter's recursion limit
    "a = " + "{b = " * 3000 + "1" + "}" * 3000,
    "a = " + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1),
    'name = "a"\n[[x]]\n' + "y = " + "[" * MAX_NESTING + "]" * MAX_NESTING,
])
def test_deep_nesting_is_refused_before_parsing(text):
    assert f"more than {MAX_NESTING} deep" in refused(text)


def test_nesting_hidden_in_dotted_keys_and_inline_tables_is_refused():
    key = ".".join(["k"] * (MAX_KEY_PARTS - 1))
    text = 'name = "a"\nx = ' + ("{" + key + " = ") * 8 + "1" + "}" * 8 + "\n"
    assert f"nest more than {MAX_NESTING} deep" in refused(text)


def test_nesting_at_the_limit_parses():
    m = parse_manifest('name = "a"\n[[jobs]]\nname = "j"\nfunction = "m:f"\nschedule = "@daily"\n'
                       "payload = " + "[" * (MAX_NESTING - 2) + "]" * (MAX_NESTING - 2) + "\n")
    assert m.jobs[0].payload is not None


@pytest.mark.parametrize("parts", [MAX_KEY_PARTS + 1, 32_000])
def test_long_dotted_keys_are_refused_before_parsing(parts):
    # tomllib is quadratic in the parts of one key: 32 000 parts (64 KB) take ~16 s there.
    for text in ["a" + ".a" * (parts - 1) + " = 1\n", "[" + ".".join(["a"] * parts) + "]\n",
                 "t = { " + " . ".join(['"a"'] * min(parts, 10_000)) + " = 1 }\n"]:
        assert f"more than {MAX_KEY_PARTS} parts" in refused(text)


def test_dotted_keys_at_the_limit_fill_64_kb_and_parse():
    key = ".".join(["a"] * (MAX_KEY_PARTS - 2))    # x.<key>.kN: MAX_KEY_PARTS parts
    lines, size = ['name = "a"', "[functions]"], 0
    while size < MAX_MANIFEST_BYTES - 200:
        lines.append(f'f{len(lines)} = "m:f"')
        size += len(lines[-1]) + 1
    assert parse_manifest("\n".join(lines) + "\n").functions["f2"] == "m:f"
    lines, size = ['name = "a"'], 0
    while size < MAX_MANIFEST_BYTES - 200:
        lines.append(f"x.{key}.k{len(lines)} = 1")
        size += len(lines[-1]) + 1
    # Parsed (quickly, within the part limit), then refused as an unknown key.
    assert "unknown key 'x'" in refused("\n".join(lines) + "\n")


def test_dots_and_brackets_inside_strings_and_comments_do_not_count():
    junk = "." * 200 + "[" * 200 + "{" * 200
    m = parse_manifest(f'name = "a"  # {junk}\nenv = {{ A = "{junk}", B = \'{junk}\' }}\n'
                       f'dependencies = ["""{junk}\n""""", \'\'\'{junk}\'\'\'\'\']\n')
    assert m.env == {"A": junk, "B": junk}
    assert m.dependencies == [junk + '\n""', junk + "''"]


@pytest.mark.parametrize("text", ['name = "a\n', "name = 'a\n", 'name = """a\n',
                                  "name = '''a", 'x = "' + '\\"' * 30_000 + "\n"])
def test_unclosed_strings_are_refused(text):
    assert "not valid TOML" in refused(text)


def test_manifest_over_the_size_limit_is_refused():
    assert "64 KB" in refused('name = "a"\n' + "#" * MAX_MANIFEST_BYTES + "\n")
    assert "64 KB" in refused('name = "' + "é" * (MAX_MANIFEST_BYTES // 2) + '"\n')


@pytest.mark.parametrize("text, message", [
    ("a = " + "1" * 5000 + "\n", "not valid TOML: ValueError"),   # int() digit limit
    ("a = 0x" + "f" * 20 + "\n", "does not fit in 64 bits"),
    ("a = -9223372036854775809\n", "does not fit in 64 bits"),
    ('name = "a"\n[[jobs]]\nname = "j"\nfunction = "m:f"\nschedule = "@daily"\n'
     "payload = { at = 1979-05-27 }\n", "payload holds a date or a time"),
    ('name = "a"\n[[jobs]]\nname = "j"\nfunction = "m:f"\nschedule = "@daily"\n'
     'timezone = "' + "Europe/" * 300 + '"\n', "is not an IANA name"),
])
def test_anything_the_parser_trips_on_is_a_400(text, message):
    assert message in refused(text)


def test_64_bit_integers_are_kept():
    m = parse_manifest('name = "a"\n[[jobs]]\nname = "j"\nfunction = "m:f"\nschedule = "@daily"\n'
                       "payload = [9223372036854775807, -9223372036854775808]\n")
    assert m.jobs[0].payload == [2 ** 63 - 1, -2 ** 63]


LONG = "x" * 30_000
JOB = 'name = "a"\n[[jobs]]\nname = "j"\n'


@pytest.mark.parametrize("text", [
    f'name = "{LONG}"\n',
    f'name = "a"\nversion = "{LONG}"\n',
    f'name = "a"\n{LONG} = 1\n',
    f'name = "a"\n"{LONG}\\n" = 1\n',
    f'name = "a"\n[functions]\n"{LONG} " = "m:f"\n',
    f'name = "a"\n[functions]\n{LONG} = "{LONG}"\n',
    f'name = "a"\n[limits]\n{LONG} = 1\n',
    f'{JOB}function = "m:f"\nschedule = "@daily"\n{LONG} = 1\n',
    f'{JOB}function = "m:f"\nschedule = "{LONG}"\n',
    f'{JOB}function = "m:f"\nschedule = "@every {LONG}"\n',
    f'{JOB}function = "m:f"\nschedule = "@daily"\ntimezone = "{LONG}"\n',
    f'{JOB}function = "{LONG}"\nschedule = "@daily"\n',
    f'name = "a"\nenv = {{ "{LONG}-" = "v" }}\n',
])
def test_user_values_in_messages_are_cut_short(text):
    message = refused(text)
    assert "xxxxxxxxxx" in message and "x" * (SHOWN_CHARS + 1) not in message
    assert len(message) < 400, message


def test_unknown_function_message_is_cut_short():
    m = parse_manifest('name = "a"\n[functions]\n' +
                       "".join(f'f{i}_{"y" * 200} = "m:f"\n' for i in range(50)))
    with pytest.raises(NotFound) as info:
        m.resolve_function("z" * 100_000)
    assert len(info.value.message) < 2000 and "and 40 more" in info.value.message


def env_manifest(env: dict) -> str:
    return 'name = "a"\nenv = { ' + ", ".join(f'{k} = "{v}"' for k, v in env.items()) + " }\n"


def test_env_within_the_limits_is_kept():
    env = {f"V{i}": "v" * 400 for i in range(MAX_ENV_VARS)}
    env["BIG"] = "b" * MAX_ENV_VALUE_BYTES
    env.pop("V0")
    assert parse_manifest(env_manifest(env)).env == env


@pytest.mark.parametrize("env, message", [
    ({f"V{i}": "v" for i in range(MAX_ENV_VARS + 1)}, f"the limit is {MAX_ENV_VARS}"),
    ({"A": "v" * (MAX_ENV_VALUE_BYTES + 1)}, f"the limit is {MAX_ENV_VALUE_BYTES} bytes per value"),
    ({"A": "é" * (MAX_ENV_VALUE_BYTES // 2 + 1)}, "bytes per value"),
    ({f"V{i}": "v" * 4000 for i in range(9)}, f"the limit is {MAX_ENV_BYTES} bytes"),
    ({'"1A"': "v"}, "env name '1A' is not valid"),
    ({'"A-B"': "v"}, "env name 'A-B' is not valid"),
    ({'"A B"': "v"}, "is not valid"),
    ({'""': "v"}, "is not valid"),
    ({"A": "x\\u0000y"}, "NUL"),
    ({"PATH": "/evil"}, "env.PATH is set by dockyard"),
    ({"HOME": "/"}, "env.HOME is set by dockyard"),
])
def test_env_limits(env, message):
    assert message in refused(env_manifest(env))


def test_reserved_env_names_cover_what_the_sandbox_sets(tmp_path):
    from dockyard.sandbox.isolation import Isolation
    assert set(Isolation.env({}, tmp_path)) | {"HOME", "TMPDIR"} <= RESERVED_ENV | LOCALE_ENV
    env = Isolation.env({"LANG": "de_DE.UTF-8"}, tmp_path)
    assert env["LANG"] == "de_DE.UTF-8"

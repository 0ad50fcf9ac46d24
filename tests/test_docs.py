"""The README documents every route, CLI command and option, HTTP error status and manifest
key, so the docs cannot fall behind the code (each test walks the code, not a list)."""

import re
from pathlib import Path

import click
import pytest

from dockyard.cli import GLOBAL_OPTIONS, cli
from dockyard.common.manifest import LIMITS, TOP_KEYS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README's `## title` section, up to the next `## `."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines()
            if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line.strip())]


# -- routes -------------------------------------------------------------------------------

def normal_path(path: str) -> str:
    """`/api/jobs/<name>` and `/api/jobs/<path:x>` alike: placeholders are `<>`."""
    return re.sub(r"<[^>]*>", "<>", path)


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) of each route in the HTTP API tables. A cell lists routes in code spans:
    `GET /a`, `GET/POST /b`, `POST /c/<name>/run`, `…/pause` (the method and the path's
    folder of the one before), with a query (`[?…]`) or a body (`{…}`) after the path."""
    found = set()
    for row in table_rows(section("HTTP API")):
        methods, path = [], ""
        for span in re.findall(r"`([^`]+)`", row[0]):
            match = re.match(r"(?:([A-Z]+(?:/[A-Z]+)*) )?(\S+)", span)
            if not match:
                continue
            if match.group(1):
                methods = match.group(1).split("/")
            route = re.split(r"[\[{?]", match.group(2))[0]
            if route.startswith("…"):
                route = path.rsplit("/", 1)[0] + route[1:]
            path = route
            found |= {(method, normal_path(route)) for method in methods}
    return found


def app_routes() -> set[tuple[str, str]]:
    import tempfile

    from dockyard.app import create_app
    with tempfile.TemporaryDirectory() as data:
        app = create_app({"DATA_DIR": data})
    return {(method, normal_path(rule.rule)) for rule in app.url_map.iter_rules()
            if rule.endpoint != "static"
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_every_route_is_in_the_api_table():
    documented = documented_routes()
    missing = sorted(app_routes() - documented)
    assert not missing, f"routes missing from README's HTTP API table: {missing}"


# -- CLI ----------------------------------------------------------------------------------

GLOBAL_FLAGS = {flag for flag, *_ in GLOBAL_OPTIONS}


def commands(group: click.Group, prefix: tuple[str, ...] = ()):
    """Every command of the tree, groups and their subcommands alike, with its path."""
    for name, command in sorted(group.commands.items()):
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from commands(command, prefix + (name,))


CODE_SPANS = re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", README, flags=re.M | re.S))


def is_documented(path: tuple[str, ...]) -> bool:
    """`dockyard jobs add …` in the README, or `add` listed as an alternative in a code span
    that starts with `dockyard jobs ` (`dockyard jobs ls | add NAME … | show NAME`)."""
    parent = " ".join(("dockyard",) + path[:-1])
    name = re.escape(path[-1])
    if re.search(rf"\b{re.escape(parent)} {name}\b(?!-)", README):
        return True
    return any(span.startswith(parent + " ")
               and re.search(rf"(?:^{re.escape(parent)} |\|\s*){name}\b(?!-)", span)
               for span in CODE_SPANS)


def option_flags(command: click.Command) -> set[str]:
    flags = set()
    for param in command.params:
        if isinstance(param, click.Option):
            flags |= {f for f in param.opts + param.secondary_opts if f.startswith("--")}
    return flags - {"--help", "--version"} - GLOBAL_FLAGS


def flag_in_readme(flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README) is not None


@pytest.mark.parametrize("path", [p for p, _ in commands(cli)], ids=" ".join)
def test_every_cli_command_and_option_is_documented(path):
    command = cli
    for name in path:
        command = command.commands[name]
    assert is_documented(path), f"`dockyard {' '.join(path)}` is not in the README"
    missing = sorted(flag for flag in option_flags(command) if not flag_in_readme(flag))
    assert not missing, f"options of `dockyard {' '.join(path)}` missing from the README: {missing}"


def test_the_global_options_are_documented():
    for flag in GLOBAL_FLAGS | {"--version"}:
        assert flag_in_readme(flag), flag
    assert {opt for p in cli.params for opt in getattr(p, "opts", ())} >= GLOBAL_FLAGS


# -- HTTP errors --------------------------------------------------------------------------

def error_statuses() -> set[int]:
    """Every error status the control plane can answer: its error classes, the statuses of
    an invocation's outcomes, explicit codes in dockyard/app, and the framework's own."""
    import dockyard.app  # noqa: F401 - loads every module that defines an error class
    from dockyard.app.invoke import execute as invoke
    from dockyard.errors import DockyardError

    codes = set()
    todo = [DockyardError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith(("dockyard.errors", "dockyard.app")):
            codes.add(cls.status)
    codes |= set(invoke.HTTP_STATUS.values()) | set(invoke.ERROR_STATUS.values())
    for source in (ROOT / "dockyard" / "app").rglob("*.py"):
        text = source.read_text()
        codes |= {int(c) for c in re.findall(r"abort\((\d{3})", text)}
        codes |= {int(c) for c in re.findall(r"status_code = (\d{3})", text)}
        codes |= {int(c) for c in re.findall(r"^\s*return .*, (\d{3})$", text, re.M)}
    codes |= {404, 405}   # Flask: no such route; a route called with a method it lacks
    return {c for c in codes if c >= 400}


def test_every_error_status_is_in_the_error_table():
    documented = set()
    for row in table_rows(section("HTTP API")):
        if re.fullmatch(r"[0-9/, ]+", row[0]):
            documented |= {int(c) for c in re.findall(r"\d{3}", row[0])}
    missing = sorted(error_statuses() - documented)
    assert not missing, f"statuses missing from README's HTTP error table: {missing}"
    assert documented <= error_statuses(), sorted(documented - error_statuses())


# -- manifest and set-up ------------------------------------------------------------------

def test_every_manifest_key_is_documented():
    for key in sorted(TOP_KEYS | set(LIMITS) | {"network"}):
        assert f"{key} =" in README or f"[{key}]" in README or f"[[{key}]]" in README, key


def test_the_two_setup_commands_and_ci_agree():
    ci = (ROOT / ".ci" / "run").read_text().strip()
    command = ci.splitlines()[-1]
    assert command in README
    assert "dockyard serve" in README

"""The README documents every CLI command and every manifest key (so docs cannot fall behind
the code)."""

from pathlib import Path

from dockyard.cli import cli
from dockyard.common.manifest import LIMITS, TOP_KEYS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_cli_command_is_documented():
    for name in cli.commands:
        assert f"dockyard {name}" in README or f"| {name} " in README or f" {name} " in README, name


def test_every_manifest_key_is_documented():
    for key in sorted(TOP_KEYS | set(LIMITS) | {"network"}):
        assert f"{key} =" in README or f"[{key}]" in README or f"[[{key}]]" in README, key


def test_the_two_setup_commands_and_ci_agree():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text().strip()
    command = ci.splitlines()[-1]
    assert command in README
    assert "dockyard serve" in README

"""`dockyard init NAME`: a working package to start from."""

from __future__ import annotations

from pathlib import Path

from ..common.manifest import validate_container_name
from ..errors import Conflict

MANIFEST = '''name = "{name}"
# version = "0.1.0"          # default: the content hash
dependencies = []            # e.g. ["jinja2>=3.1"]
env = {{}}                     # the function's whole environment besides PATH/LANG/HOME/TMPDIR

[functions]
hello = "main:hello"

[limits]
timeout_s = 30
memory_mb = 512
concurrency = 1
instances = 1
'''

MAIN = '''"""Functions of the {name} container."""


def hello(event, context):
    who = (event or {{}}).get("who", "world")
    context.logger.info("greeting %s", who)
    return {{"message": f"hello, {{who}}", "invocation": context.invocation_id}}
'''


def write_template(path: Path) -> Path:
    name = path.name
    validate_container_name(name)
    if path.exists() and any(path.iterdir()):
        raise Conflict(f"{path} already exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    (path / "dockyard.toml").write_text(MANIFEST.format(name=name))
    (path / "main.py").write_text(MAIN.format(name=name))
    return path

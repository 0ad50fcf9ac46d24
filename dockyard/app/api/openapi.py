"""`GET /openapi.json`: the OpenAPI 3.1 description of the HTTP API (openapi.yaml beside this
module), served without a token as /healthz is: it describes the routes, never their data."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import metadata, resources

import yaml
from flask import Blueprint, Response

bp = Blueprint("openapi", __name__)

DOCUMENT = "openapi.yaml"


def document() -> dict:
    """The description as a dict, info.version the running dockyard's."""
    text = resources.files(__package__).joinpath(DOCUMENT).read_text("utf-8")
    doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    try:
        doc["info"]["version"] = metadata.version("dockyard")
    except metadata.PackageNotFoundError:
        pass   # a source tree that was never installed: the file's placeholder
    return doc


@lru_cache(maxsize=1)
def _served() -> bytes:
    return json.dumps(document(), ensure_ascii=False).encode("utf-8")


@bp.get("/openapi.json")
def openapi():
    return Response(_served(), mimetype="application/json")

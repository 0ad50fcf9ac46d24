"""A container's aliases, as the Lambda-compatible API has them, without SigV4:
`GET /api/containers/<name>/aliases`, `PUT` and `DELETE /api/containers/<name>/aliases/<alias>`
(the CLI's `dockyard aliases`)."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from ...errors import BadRequest, NotFound
from ..auth import require
from ..state import database
from ..store import aliases as store
from ..store.containers import get_container
from .containers import poke_workers

bp = Blueprint("aliases", __name__)
BODY = ('send {"version": "<version or $LATEST>", "extra": {"<version>": <share 0..1>}, '
        '"description": "..."}: version to create it; any of them to change it')


@bp.get("/api/containers/<name>/aliases")
@require()
def list_aliases(name: str):
    db = database()
    get_container(db, name)     # a 404 that says so for a container that does not exist
    return jsonify({"container": name,
                    "aliases": [store.public(row) for row in store.list_for(db, name)]})


@bp.put("/api/containers/<name>/aliases/<alias>")
@require()
def put_alias(name: str, alias: str):
    """Create the alias (`version` needed) or change what it names; 201 or 200."""
    store.check_name(alias)
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not body or set(body) - {"version", "extra",
                                                              "description"}:
        raise BadRequest(BODY)
    version, extra, description = body.get("version"), body.get("extra"), \
        body.get("description")
    if version is not None and not (isinstance(version, str) and version):
        raise BadRequest("version must name a version of the container or $LATEST")
    if extra is not None:
        extra = store.check_extra(extra)
    if description is not None and not isinstance(description, str):
        raise BadRequest("description must be a string")
    db = database()
    if store.get(db, name, alias) is None:
        if version is None:
            get_container(db, name)
            raise BadRequest(f"alias '{alias}' of '{name}' does not exist yet: say the version "
                             "it names to create it")
        row, status = store.create(db, name, alias, version, extra or None,
                                   description or ""), 201
    else:
        changes = {k: v for k, v in (("function_version", version), ("extra", extra),
                                     ("description", description)) if v is not None}
        row, status = store.update(db, name, alias, changes), 200
    poke_workers(db)    # the versions it names are started at once
    return jsonify(store.public(row)), status


@bp.delete("/api/containers/<name>/aliases/<alias>")
@require()
def delete_alias(name: str, alias: str):
    db = database()
    if store.get(db, name, alias) is None:
        get_container(db, name)
        raise NotFound(f"container '{name}' has no alias '{alias}'; `dockyard aliases {name}` "
                       "lists them")
    store.delete(db, name, alias)
    poke_workers(db)
    return jsonify({"container": name, "deleted": alias})


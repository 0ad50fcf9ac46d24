"""Aliases of a container (the Lambda API's aliases): a name for one of its versions or
`$LATEST`, optionally with one more version taking a share of the calls. A caller names an
alias where it names a version (a Qualifier); `pick` draws the version a call runs."""

from __future__ import annotations

import random
import re
import secrets

from ...errors import BadRequest, Conflict, NotFound
from .db import now, transaction
from .engine import Database

LATEST = "$LATEST"
NAME_RE = re.compile(r"(?!^[0-9]+$)[a-zA-Z0-9_-]{1,128}")
_COLUMNS = ("container, name, function_version, extra_version, extra_weight, description, "
            "revision, created_at, updated_at")


def check_name(name) -> str:
    """An alias name: 1-128 letters, digits, '-' or '_', not digits only (Lambda's rule)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadRequest(f"alias name {str(name)[:140]!r} is not 1-128 letters, digits, '-' "
                         "or '_' (and not digits only)")
    return name


def check_extra(weights, called: str = "extra") -> dict:
    """An alias's extra version and its share of the calls: a dict of at most one version
    with a weight from 0 to 1 (a weight of 0 is no extra version); BadRequest otherwise."""
    if not isinstance(weights, dict) or len(weights) > 1:
        raise BadRequest(f"{called} takes at most one version and its share of the calls")
    for version, weight in weights.items():
        if not (isinstance(version, str) and version) or isinstance(weight, bool) or \
                not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise BadRequest(f"the weight of version '{str(version)[:64]}' must be a number "
                             "from 0.0 to 1.0")
    return {v: float(w) for v, w in weights.items() if w > 0}


def public(row: dict) -> dict:
    """An alias for the JSON API and the CLI."""
    return {"name": row["name"], "version": row["function_version"],
            "extra": {row["extra_version"]: row["extra_weight"]} if row["extra_version"]
            else {}, "description": row["description"], "revision": row["revision"],
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def get(db: Database, container: str, name: str) -> dict | None:
    rows = list(db.query(f"SELECT {_COLUMNS} FROM aliases WHERE container = ? AND name = ?",
                         [container, name]))
    return rows[0] if rows else None


def list_for(db: Database, container: str) -> list[dict]:
    return list(db.query(f"SELECT {_COLUMNS} FROM aliases WHERE container = ? ORDER BY name",
                         [container]))


def pick(alias: dict, draw=random.random) -> str | None:
    """The version one call through `alias` runs (None: the serving one)."""
    version = alias["function_version"]
    if alias["extra_version"] and alias["extra_weight"] and draw() < alias["extra_weight"]:
        version = alias["extra_version"]
    return None if version == LATEST else version


def _check(conn, container: str, function_version: str, extra: dict | None) -> None:
    if not conn.execute("SELECT 1 FROM containers WHERE name = ?", [container]).fetchone():
        raise NotFound(f"no container named '{container}'; `dockyard ls` lists them")
    for version in [function_version, *(extra or {})]:
        if version != LATEST and not conn.execute(
                "SELECT 1 FROM versions v JOIN containers c ON c.id = v.container_id "
                "WHERE c.name = ? AND v.version = ?", [container, version]).fetchone():
            raise NotFound(f"container '{container}' has no version '{version}'; "
                           f"`dockyard versions {container}` lists them")
    if extra:
        ((version, weight),) = extra.items()
        if version == function_version:
            raise BadRequest(f"the additional version '{version}' is the alias's own "
                             "version: name another one")


def create(db: Database, container: str, name: str, function_version: str,
           extra: dict | None, description: str) -> dict:
    with transaction(db) as conn:
        if conn.execute("SELECT 1 FROM aliases WHERE container = ? AND name = ?",
                        [container, name]).fetchone():
            raise Conflict(f"alias '{name}' of container '{container}' exists already; "
                           "update it instead")
        if conn.execute("SELECT 1 FROM versions v JOIN containers c ON c.id = v.container_id "
                        "WHERE c.name = ? AND v.version = ?", [container, name]).fetchone():
            raise Conflict(f"container '{container}' has a version named '{name}': an alias "
                           "needs another name")
        _check(conn, container, function_version, extra)
        (version, weight), t = _extra(extra), now()
        conn.execute(f"INSERT INTO aliases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [container, name, function_version, version, weight, description,
                      secrets.token_hex(8), t, t])
    return get(db, container, name)


def update(db: Database, container: str, name: str, changes: dict,
           revision: str | None = None) -> dict:
    """`changes`: any of function_version, extra (a {version: weight} of at most one entry;
    {} removes it) and description. `revision`: the update applies only to that revision."""
    with transaction(db) as conn:
        rows = list(conn.query(f"SELECT {_COLUMNS} FROM aliases WHERE container = ? AND "
                               "name = ?", [container, name]))
        if not rows:
            raise NotFound(f"container '{container}' has no alias '{name}'")
        row = rows[0]
        if revision and revision != row["revision"]:
            raise Conflict(f"alias '{name}' changed since revision {revision}: read it again")
        function_version = changes.get("function_version") or row["function_version"]
        if "extra" in changes:
            extra = changes["extra"] or None
        else:
            extra = {row["extra_version"]: row["extra_weight"]} if row["extra_version"] else None
        _check(conn, container, function_version, extra)
        version, weight = _extra(extra)
        description = changes.get("description", row["description"])
        conn.execute("UPDATE aliases SET function_version = ?, extra_version = ?, "
                     "extra_weight = ?, description = ?, revision = ?, updated_at = ? "
                     "WHERE container = ? AND name = ?",
                     [function_version, version, weight, description, secrets.token_hex(8),
                      now(), container, name])
    return get(db, container, name)


def delete(db: Database, container: str, name: str) -> None:
    with transaction(db) as conn:
        conn.execute("DELETE FROM aliases WHERE container = ? AND name = ?", [container, name])


def _extra(extra: dict | None) -> tuple[str | None, float | None]:
    if not extra:
        return None, None
    ((version, weight),) = extra.items()
    return version, float(weight)

"""What a call names after `@` (`/invoke/NAME@X/FUNCTION`, the dashboard's and the CLI's calls,
the Lambda API's Qualifier): a version of the container or, when no version has that name, one
of its aliases (store/aliases.py), whose version is drawn for each call by its weights (None:
the container's own unpinned route, for `$LATEST`). A version and an alias never share a name
(aliases.create refuses one), and should a version be deployed later under an alias's name,
the version is what the name calls.

The synchronous route tries the name as a version first, so that a call pinned to a version
costs what it did (its route, kept in memory), and looks for an alias only once no version has
that name (`after_miss`). A name found to be an alias is remembered in this process while the
routing hint is unchanged (a version deployed under that name moves it), so the next call
through it goes to the alias at once (`for_call`): one read of the alias, whose changes the
very next call sees."""

from __future__ import annotations

from ...errors import NotFound
from ..store import aliases as alias_store
from ..store import containers as container_store
from ..store.engine import Database
from ..store.routing_hint import routing_hint
from .execute import route

# (database, container, name) -> the routing hint when the name was found to be an alias.
_aliases: dict[tuple[str, str, str], int] = {}
KEPT = 4096


def for_call(db: Database, container: str, name: str | None) -> str | None:
    """The version one call naming `name` runs, if this process knows `name` as an alias of
    the container (drawn by its weights); else `name` itself, to be tried as a version (and,
    if none has that name, given to `after_miss`). For a version: one dictionary lookup."""
    if name is None:
        return None
    key = (db.path, container, name)
    seen = _aliases.get(key)
    if seen is None:
        return name
    if seen == routing_hint(db.path).value():
        alias = alias_store.get(db, container, name)
        if alias is not None:
            return alias_store.pick(alias)
    _aliases.pop(key, None)    # deleted, or a version may have that name now: look again
    return name


def after_miss(db: Database, container: str, name: str, missing: NotFound,
               draw: bool = True) -> str | None:
    """A call pinned to `name` was refused with `missing` before anything ran: the version the
    alias `name` gives it (drawn by its weights; without `draw`, the alias's own version), or
    `name` again if it is a version after all (deployed meanwhile). Raises `missing` when it was
    about something else (no such container or function), or a NotFound that says neither a
    version nor an alias has that name."""
    key = (db.path, container, name)
    # Read before the lookups: a version deployed under this name after them moves the hint.
    hint = routing_hint(db.path).value()
    alias = alias_store.get(db, container, name)
    record = container_store.get_container(db, container)   # no container: its own 404
    try:
        container_store.get_version(db, record, name)
    except NotFound:
        pass
    else:
        if alias is None:
            raise missing    # the version exists: the call was refused for something else
        return name          # a version now has the alias's name: the version wins
    if alias is None:
        raise NotFound(f"container '{container}' has neither a version nor an alias named "
                       f"'{name}'; `dockyard versions {container}` lists its versions")
    if len(_aliases) >= KEPT:
        _aliases.clear()
    _aliases[key] = hint
    if draw:
        return alias_store.pick(alias)
    version = alias["function_version"]
    return None if version == alias_store.LATEST else version


def resolve(db: Database, container: str, name: str | None, draw: bool = True) -> str | None:
    """The version a call naming `name` runs, for the routes that look it up before the call
    (async calls, the dashboard's form, the Lambda API's Event, DryRun and GetFunction): a
    version of that name, else the alias's draw (without `draw`, its own version)."""
    if name is None:
        return None
    if draw:
        version = for_call(db, container, name)
        if version != name:
            return version
    try:
        route(db, container, name)
    except NotFound as missing:
        return after_miss(db, container, name, missing, draw)
    return name

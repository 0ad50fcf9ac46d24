"""A real PostgreSQL server for the test session.

One throwaway cluster per test session, started lazily by the first test that asks for it:
`initdb` into a `dockyard-pg-*` folder of the system temp dir, listening on 127.0.0.1 on a free
port and on a Unix socket in that folder, durability off for speed. PostgreSQL refuses to run
as root, so when the tests run as root the server runs as the `postgres` system user (the
folder is chowned to it; pytest's own temp dirs are 0700 root and out of its reach). The
server itself is devtools/postgres.py's `PostgresServer`, which the benchmarks use too; this
module adds what only the tests need: the skip-or-fail decision and the fixtures.

Fixtures (registered from conftest.py):
- `postgres_server` (session): the running `PostgresServer`; stopped and its folder removed
  at the end of the session, also on failure or interruption (and at exit as a last resort).
- `pg_url` (function): a fresh empty database, `postgresql://postgres@127.0.0.1:PORT/t_<hex>`,
  dropped (WITH (FORCE)) after the test.
- `db_url` (function, params sqlite/postgresql): a SQLite file path under tmp_path, or a pg_url.

Without PostgreSQL the tests that need it skip with one line saying what to install, except
when CI=true, where a missing PostgreSQL fails them instead.
"""

from __future__ import annotations

import glob  # noqa: F401  (the tests reach these modules through this one)
import os
import pwd  # noqa: F401
import shutil  # noqa: F401
import sys
import tempfile  # noqa: F401
from pathlib import Path

import psutil  # noqa: F401
import pytest

# `python -m pytest` (the documented command) has the repository root on sys.path already;
# a bare `pytest` has only this folder.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from devtools.postgres import (  # noqa: E402,F401
    FOLDER_PREFIX, INSTALL_HINT, MAX_CONNECTIONS, SERVER_PROGRAMS, SERVER_USER, SUPERUSER,
    PostgresServer, _version_key, find_bindir, free_port, server_account, sweep_stale,
    unavailable_reason)

_real_find_bindir = find_bindir   # a test that plays a machine without PostgreSQL replaces it


# -- deciding what a missing PostgreSQL means -------------------------------------------------

def in_ci(environ=None) -> bool:
    return (environ if environ is not None else os.environ).get("CI", "").strip().lower() \
        in ("true", "1")


def availability(environ=None) -> tuple[str, str]:
    """("ok", "") when a server can be started here; else ("skip", why) or, when CI=true,
    ("fail", why): a CI run must never pass by skipping the PostgreSQL tests."""
    # This module's own find_bindir and server_account, so that a test can replace them here.
    problem = unavailable_reason(find_bindir, server_account)
    if problem and in_ci(environ) and find_bindir is _real_find_bindir:
        # A fresh CI machine: the test run sets it up (as root with apt-get), or says why not.
        from devtools.packages import install
        install("postgresql")
        problem = unavailable_reason(find_bindir, server_account)
    if not problem:
        return "ok", ""
    if in_ci(environ):
        return "fail", f"{problem} [CI=true: a missing PostgreSQL is a failure, not a skip]"
    return "skip", problem


def require_postgres(environ=None) -> None:
    """Skip (or under CI=true fail) the calling test when PostgreSQL is not available."""
    verdict, why = availability(environ)
    if verdict == "fail":
        pytest.fail(why, pytrace=False)
    if verdict == "skip":
        pytest.skip(why)


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server(request):
    """The session's PostgreSQL server, started on first use; skips (fails under CI=true)
    when PostgreSQL is not installed."""
    require_postgres()
    server = PostgresServer()
    request.addfinalizer(server.stop)      # registered first: runs even if start() is interrupted
    server.start()
    return server


@pytest.fixture
def pg_url(postgres_server):
    """A fresh empty database for this test, as postgresql://postgres@127.0.0.1:PORT/t_<hex>;
    dropped afterwards even if the test left connections open."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"),
                        pytest.param("postgresql", id="postgresql")])
def db_url(request, tmp_path):
    """The store's database on each engine: a SQLite file path (str, under tmp_path) or a
    fresh PostgreSQL database URL (see pg_url). Only the postgresql case starts the server."""
    if request.param == "sqlite":
        return str(tmp_path / "dockyard.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store_target(db_url, tmp_path):
    """db_url as the control plane names its database: a SQLite path, or a PostgreSQL URL
    with its routing hint file (engine.DbUrl) under tmp_path."""
    from dockyard.app.store.engine import DbUrl, is_postgres
    if is_postgres(db_url):
        return DbUrl(db_url, tmp_path / "routing.hint")
    return db_url

"""The PostgreSQL test fixtures: a real server answers, each test gets its own database and it
is gone afterwards, the server leaves nothing behind, and a missing PostgreSQL skips (fails
under CI=true)."""

from __future__ import annotations

import os
import pathlib
import subprocess
from urllib.parse import urlsplit

import psycopg
import pytest

import postgres
from postgres import PostgresServer

# Names the pg_url tests were given, to check from a later test that they were dropped.
SEEN: dict[str, str] = {}


def test_server_answers(postgres_server, pg_url):
    with psycopg.connect(pg_url) as conn:
        version = conn.execute("select version()").fetchone()[0]
        assert f"PostgreSQL {postgres_server.major}" in version
        assert conn.execute("show max_connections").fetchone()[0] == str(postgres.MAX_CONNECTIONS)
        assert conn.execute("show fsync").fetchone()[0] == "off"
        assert conn.execute("show server_encoding").fetchone()[0] == "UTF8"
        assert conn.execute("select current_user").fetchone()[0] == "postgres"
        # A fresh database is empty: no table of anyone else's.
        assert conn.execute("select count(*) from pg_tables where schemaname = 'public'"
                            ).fetchone()[0] == 0
    # The Unix socket in the server's folder answers as well.
    with psycopg.connect(host=str(postgres_server.socket_dir), port=postgres_server.port,
                         user="postgres", dbname="postgres") as conn:
        assert conn.execute("select 1").fetchone()[0] == 1


def test_url_form(postgres_server, pg_url):
    parts = urlsplit(pg_url)
    assert parts.scheme == "postgresql"
    assert parts.username == "postgres" and parts.password is None
    assert parts.hostname == "127.0.0.1" and parts.port == postgres_server.port
    assert parts.path.lstrip("/").startswith("t_")
    assert pg_url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}{parts.path}"


def test_server_runs_as_postgres_in_its_own_folder(postgres_server):
    folder = postgres_server.folder
    assert folder.name.startswith("dockyard-pg-")
    assert folder.parent == pathlib.Path(postgres.tempfile.gettempdir())
    assert (postgres_server.socket_dir / f".s.PGSQL.{postgres_server.port}").exists()
    procs = postgres_server.processes()
    assert procs, "no server process found"
    if os.geteuid() == 0:
        uid = postgres.pwd.getpwnam("postgres").pw_uid
        assert {p.uids().real for p in procs} == {uid}


def test_two_databases_are_separate(postgres_server):
    first, second = postgres_server.create_database(), postgres_server.create_database()
    try:
        assert first != second
        with psycopg.connect(postgres_server.url(first)) as conn:
            conn.execute("create table only_here (x int)")
        with psycopg.connect(postgres_server.url(second)) as conn:
            assert conn.execute("select to_regclass('only_here')").fetchone()[0] is None
    finally:
        postgres_server.drop_database(first)
        postgres_server.drop_database(second)
    assert not {first, second} & postgres_server.databases()


def test_pg_url_first(pg_url):
    SEEN["first"] = pg_url
    with psycopg.connect(pg_url) as conn:
        conn.execute("create table mine (x int)")
        conn.execute("insert into mine values (1)")


def test_pg_url_second(pg_url, postgres_server):
    SEEN["second"] = pg_url
    assert "first" in SEEN, "runs after test_pg_url_first"
    assert pg_url != SEEN["first"]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("select to_regclass('mine')").fetchone()[0] is None
    # The earlier test's database was dropped when that test ended.
    assert urlsplit(SEEN["first"]).path.lstrip("/") not in postgres_server.databases()


def test_drop_forces_out_open_connections(postgres_server):
    name = postgres_server.create_database()
    conn = psycopg.connect(postgres_server.url(name))
    try:
        postgres_server.drop_database(name)
        assert name not in postgres_server.databases()
    finally:
        try:
            conn.close()
        except psycopg.Error:
            pass


def test_db_url(db_url, tmp_path, request):
    if request.node.callspec.id == "sqlite":
        assert db_url == str(tmp_path / "dockyard.db")
    else:
        assert request.node.callspec.id == "postgresql"
        assert db_url.startswith("postgresql://postgres@127.0.0.1:")
        with psycopg.connect(db_url) as conn:
            assert conn.execute("select 1").fetchone()[0] == 1


def test_stop_leaves_nothing_behind():
    postgres.require_postgres()
    server = PostgresServer().start()
    folder = server.folder
    assert server.processes()
    with psycopg.connect(server.url()) as conn:
        assert conn.execute("select 1").fetchone()[0] == 1
    server.stop()
    server.stop()                                    # idempotent
    assert not folder.exists()
    assert not server.processes()
    user = "postgres" if os.geteuid() == 0 else str(os.geteuid())
    pgrep = subprocess.run(["pgrep", "-u", user, "-f", str(folder)], capture_output=True,
                           text=True)
    assert pgrep.returncode == 1, pgrep.stdout


def test_stale_cluster_of_a_dead_session_is_swept(tmp_path):
    folder = tmp_path / "dockyard-pg-dead"
    folder.mkdir()
    (folder / "owner").write_text("999999999 12.0\n")   # no such process
    live = tmp_path / "dockyard-pg-live"
    live.mkdir()
    me = postgres.psutil.Process()
    (live / "owner").write_text(f"{me.pid} {me.create_time()}\n")
    other = tmp_path / "dockyard-pg-noowner"
    other.mkdir()
    assert postgres.sweep_stale(str(tmp_path)) == [folder]
    assert not folder.exists() and live.exists() and other.exists()


# -- what a missing PostgreSQL means ----------------------------------------------------------

@pytest.fixture
def no_postgres(monkeypatch):
    monkeypatch.setattr(postgres, "find_bindir", lambda: None)


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_postgres_skips_outside_ci(no_postgres, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    verdict, why = postgres.availability()
    assert verdict == "skip"
    assert "apt-get install postgresql" in why and "\n" not in why
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        postgres.require_postgres()


@pytest.mark.parametrize("ci", ["true", "True", "1"])
def test_missing_postgres_fails_in_ci(no_postgres, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    verdict, why = postgres.availability()
    assert verdict == "fail"
    assert "apt-get install postgresql" in why and "\n" not in why
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        postgres.require_postgres()


def test_environ_argument_decides_without_touching_os_environ(no_postgres):
    assert postgres.availability({"CI": "true"})[0] == "fail"
    assert postgres.availability({})[0] == "skip"


def test_root_without_postgres_user(monkeypatch):
    monkeypatch.setattr(postgres, "find_bindir", lambda: pathlib.Path("/usr/bin"))
    monkeypatch.setattr(postgres.os, "geteuid", lambda: 0)

    def no_user(name):
        raise KeyError(name)
    monkeypatch.setattr(postgres.pwd, "getpwnam", no_user)
    assert postgres.availability({})[0] == "skip"
    verdict, why = postgres.availability({"CI": "true"})
    assert verdict == "fail" and "`postgres` user" in why


@pytest.mark.parametrize("ci", [None, "true"])
def test_present_postgres_runs(ci, monkeypatch):
    monkeypatch.setattr(postgres, "find_bindir", lambda: pathlib.Path("/usr/lib/postgresql/15/bin"))
    env = {} if ci is None else {"CI": ci}
    if os.geteuid() == 0:
        monkeypatch.setattr(postgres, "server_account", lambda: (101, 104))
    assert postgres.availability(env) == ("ok", "")


def test_finder_prefers_pg_config_then_newest_versioned_folder(monkeypatch, tmp_path):
    def server_folder(name):
        folder = tmp_path / name / "bin"
        folder.mkdir(parents=True)
        for program in postgres.SERVER_PROGRAMS:
            (folder / program).write_text("#!/bin/sh\n")
            (folder / program).chmod(0o755)
        return folder

    old, new = server_folder("9.6"), server_folder("16")
    pg_config = tmp_path / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {old}\n")
    pg_config.chmod(0o755)
    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [str(old), str(new)])
    monkeypatch.setattr(postgres.shutil, "which",
                        lambda name: str(pg_config) if name == "pg_config" else None)
    assert postgres.find_bindir() == old
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    assert postgres.find_bindir() == new
    assert postgres._version_key(str(new)) > postgres._version_key(str(old))
    # Nothing anywhere: None (and so a skip, or a failure under CI).
    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    assert postgres.find_bindir() is None

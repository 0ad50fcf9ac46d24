"""The store's connection to its database, whichever engine holds it: SQLite in the data dir
(the default) or PostgreSQL (`serve --db postgresql://…`, shared by several control planes).

Everything above store/ sees a `Database`, never a driver's connection. The store writes one
SQL text per statement for both engines, with `?` parameters (turned into the driver's style
here) and the few differences that remain named in `Dialect`. A write transaction keeps
SQLite's rule on both: one writer at a time in the database (SQLite's write lock; on
PostgreSQL an advisory transaction lock every write transaction takes first), so the
read-then-write sequences of the store mean the same on either engine."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# The advisory lock every PostgreSQL write transaction takes first (advisory locks are per
# database: two dockyards in two databases of one server do not share it).
WRITE_LOCK = 0x646F636B79617264 & 0x7FFFFFFFFFFFFFFF   # "dockyard"


def is_postgres(target) -> bool:
    return str(target).startswith(POSTGRES_SCHEMES)


class DbUrl(str):
    """A PostgreSQL URL as a database target, with the per-host file that stands beside it
    as routing.hint stands beside a SQLite file (see routing_hint.py)."""

    hint_path: Path

    def __new__(cls, url: str, hint_path: Path):
        self = super().__new__(cls, url)
        self.hint_path = Path(hint_path)
        return self

    def __reduce__(self):
        return DbUrl, (str(self), self.hint_path)


def hint_path(target) -> Path:
    """The routing hint page of the database `target`."""
    if isinstance(target, DbUrl):
        return target.hint_path
    if is_postgres(target):
        raise ValueError("a PostgreSQL database is named with its hint file: DbUrl(url, path)")
    return Path(target).with_name("routing.hint")


def redacted(target) -> str:
    """The target for a log line: a URL without its password."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(target))


@dataclass(frozen=True)
class Dialect:
    name: str

    def greatest(self, a: str, b: str) -> str:
        return f"max({a}, {b})" if self.name == "sqlite" else f"greatest({a}, {b})"

    def json_number(self, column: str, *path: str) -> str:
        """The number at `path` in the JSON text `column` (NULL when absent)."""
        if self.name == "sqlite":
            return f"json_extract({column}, '$.{'.'.join(path)}')"
        return f"(({column})::jsonb #>> '{{{','.join(path)}}}')::numeric"


SQLITE = Dialect("sqlite")
POSTGRES = Dialect("postgresql")


class NotFoundError(KeyError):
    """No row with that primary key."""


# Tables and their primary keys, for the row helpers (`db["table"].get(pk)` …).
PRIMARY_KEYS = {"containers": "id", "versions": "id", "deployments": "id", "workers": "id",
                "invocations": "id", "settings": "key", "jobs": "id", "job_runs": "id",
                "leases": "name"}
# Tables whose integer key the database hands out.
GENERATED_KEYS = {"containers", "versions", "job_runs"}


class Table:
    def __init__(self, db: "Database", name: str):
        self.db, self.name = db, name
        self.pk = PRIMARY_KEYS.get(name, "id")
        self.last_pk = None

    def insert(self, row: dict, replace: bool = False) -> "Table":
        columns = list(row)
        sql = (f"INSERT INTO {self.name} ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        if replace:
            updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != self.pk)
            sql += f" ON CONFLICT ({self.pk}) DO " + (f"UPDATE SET {updates}" if updates
                                                       else "NOTHING")
        if self.name in GENERATED_KEYS and self.pk not in row:
            if self.db.dialect is POSTGRES:
                self.last_pk = self.db.execute(sql + f" RETURNING {self.pk}",
                                               list(row.values())).fetchone()[0]
                return self
            self.last_pk = self.db.execute(sql, list(row.values())).lastrowid
            return self
        self.db.execute(sql, list(row.values()))
        self.last_pk = row.get(self.pk)
        return self

    def get(self, pk) -> dict:
        rows = list(self.db.query(f"SELECT * FROM {self.name} WHERE {self.pk} = ?", [pk]))
        if not rows:
            raise NotFoundError(f"{self.name} has no row {pk!r}")
        return rows[0]

    def update(self, pk, changes: dict) -> "Table":
        if changes:
            sets = ", ".join(f"{column} = ?" for column in changes)
            self.db.execute(f"UPDATE {self.name} SET {sets} WHERE {self.pk} = ?",
                            [*changes.values(), pk])
        return self

    def count_where(self, where: str, params=()) -> int:
        return self.db.execute(f"SELECT count(*) FROM {self.name} WHERE {where}",
                               list(params)).fetchone()[0]

    @property
    def count(self) -> int:
        return self.db.execute(f"SELECT count(*) FROM {self.name}").fetchone()[0]


class Database:
    """One connection, used by one thread at a time (see db.get_db)."""

    dialect: Dialect

    def __init__(self, target, raw, dialect: Dialect):
        self.path = target          # which database: the key of what a process keeps of it
        self.raw = raw
        self.dialect = dialect
        self.broken = False         # a failed ROLLBACK: get_db opens another

    def execute(self, sql: str, params=()):
        if self.dialect is POSTGRES:
            return self.raw.execute(_pg_sql(sql), _pg_params(params) or None)
        return self.raw.execute(sql, params)

    def query(self, sql: str, params=()):
        cursor = self.execute(sql, params)
        names = [d[0] for d in cursor.description or ()]
        for row in cursor.fetchall():
            yield dict(zip(names, row))

    def __getitem__(self, table: str) -> Table:
        return Table(self, table)

    def close(self) -> None:
        self.raw.close()

    @property
    def usable(self) -> bool:
        """False once the connection is lost (a database restarted, a connection killed):
        the thread's next get_db opens another."""
        if self.broken:
            return False
        return not (self.dialect is POSTGRES and self.raw.closed)

    @property
    def in_transaction(self) -> bool:
        if self.dialect is POSTGRES:
            return self.raw.info.transaction_status != 0   # psycopg: IDLE is 0
        return self.raw.in_transaction


@lru_cache(maxsize=4096)
def _pg_sql(sql: str) -> str:
    """`?` parameters in psycopg's style (a literal % doubled). The store's SQL has no `?`
    inside a string literal."""
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_params(params) -> list:
    """PostgreSQL's text holds no NUL character (SQLite's does): one that a function printed
    or a build logged is stored as U+FFFD rather than failing the whole write."""
    return [p.replace("\x00", "\ufffd") if p.__class__ is str and "\x00" in p else p
            for p in params]


def open_sqlite(path) -> Database:
    """WAL, a busy timeout, no fsync per commit (WAL with synchronous=NORMAL stays consistent
    after a crash; the last commits may be lost on power loss, never corrupted)."""
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return Database(path, conn, SQLITE)


def open_postgres(url) -> Database:
    import psycopg
    from psycopg.adapt import Loader

    class _Number(Loader):
        # numeric (what sum() of a bigint gives) as SQLite gives it: an int when whole.
        def load(self, data):
            value = Decimal(bytes(data).decode())
            return int(value) if value == value.to_integral_value() else float(value)

    # Client-side binding: parameters are typed as SQLite takes them (a NULL compared, a
    # number as text), and no statement is prepared per connection.
    conn = psycopg.connect(str(url), autocommit=True, cursor_factory=psycopg.ClientCursor,
                           application_name="dockyard", connect_timeout=10)
    conn.adapters.register_loader("numeric", _Number)
    return Database(url, conn, POSTGRES)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors a retry may cure (a locked or unreachable database), on either engine."""
    errors: list[type[BaseException]] = [sqlite3.OperationalError]
    try:
        import psycopg
        errors.append(psycopg.OperationalError)
    except ImportError:
        pass
    return tuple(errors)

"""The telemetry database's schema as numbered SQL files, and the runner that applies them.

`sql/NNNN_<name>.sql` are versioned migrations: each is applied once, in order, in
its own transaction together with its row in `schema_migrations` (version, file
name, sha256 checksum). They are append-only: a file whose checksum differs from
the one recorded when it was applied stops `apply` with `MigrationChanged`, since
the databases it already ran on would never see the edit. `sql/views.sql` (the
dashboards' views) is repeatable, like Flyway's `R__` files: re-applied whenever
its checksum changes, and after any numbered migration (one may drop a view to
change a column under it). Its checksum is the row of version 0: one history
table, read by one SELECT, and the numbered files start at 1. Rows of versions
this code has no file for (a newer release applied them) are left alone, so an
older process still starts beside a newer one.

Every producer and consumer calls this on start while dashboards and other
consumers are busy, and `ALTER TABLE` and `CREATE OR REPLACE VIEW` take exclusive
locks: when nothing is pending, `apply` runs only SELECTs and takes no lock. Work
is done under `pg_advisory_xact_lock(hashtext('f1_telemetry_schema'))` (the lock the
digest-based code before took too), and each step looks again under the lock, so
processes starting together apply each file once.

Why not Alembic: there are no SQLAlchemy models here and the schema is plain SQL.
Alembic for raw SQL means `op.execute` strings inside generated revision modules,
an `env.py` and a SQLAlchemy engine beside psycopg: a dependency and indirection
without gain. Numbered files plus a checksum table is what Flyway does.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

# Beside this module, inside the package: the wheel (hatchling, packages = ["pipeline"])
# ships it and an editable install reads it in place.
MIGRATIONS_DIR = Path(__file__).with_name("sql")
VIEWS_FILE = "views.sql"
VIEWS_VERSION = 0
VERSIONED_FILE = re.compile(r"(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql")
LOCK = "SELECT pg_advisory_xact_lock(hashtext('f1_telemetry_schema'))"
HISTORY_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL, "
    "applied_at timestamptz NOT NULL DEFAULT now())"
)


class MigrationChanged(RuntimeError):
    """A migration file differs from the one applied: the database and the code disagree."""


@dataclass(frozen=True)
class Migration:
    version: int  # VIEWS_VERSION for the repeatable views.sql
    name: str  # the file's name, as recorded
    statements: bytes  # bytes: read from a file, never a query built from values

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.statements).hexdigest()


def read_migrations(directory: Path = MIGRATIONS_DIR) -> tuple[list[Migration], Migration]:
    """The directory's numbered migrations in order, and its views file."""
    versioned: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        if path.name == VIEWS_FILE:
            continue
        match = VERSIONED_FILE.fullmatch(path.name)
        # A misnamed file would be skipped silently, its schema never applied.
        if match is None or int(match["version"]) == VIEWS_VERSION:
            raise ValueError(f"{path}: migrations are named 0001_<name>.sql (or {VIEWS_FILE})")
        version = int(match["version"])
        if version in versioned:
            raise ValueError(f"{path}: version {version} is {versioned[version].name} already")
        versioned[version] = Migration(version, path.name, path.read_bytes())
    views = directory / VIEWS_FILE
    return [versioned[v] for v in sorted(versioned)], Migration(
        VIEWS_VERSION, VIEWS_FILE, views.read_bytes()
    )


def _recorded(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    """version -> (name, checksum) of what was applied (empty: no history table yet)."""
    found = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if found is None or not found[0]:
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
    return {version: (name, checksum) for version, name, checksum in rows}


def _check_unchanged(versioned: list[Migration], recorded: dict[int, tuple[str, str]]) -> None:
    changed = [
        f"{m.name} (applied as {recorded[m.version][0]} with checksum "
        f"{recorded[m.version][1][:12]}, now {m.checksum[:12]})"
        for m in versioned
        if m.version in recorded and recorded[m.version] != (m.name, m.checksum)
    ]
    if changed:
        raise MigrationChanged(
            f"{'; '.join(changed)} changed after it was applied, and the databases it ran on "
            "will never see the edit: migrations are append-only: restore it and add a new "
            "numbered file with the change"
        )


def _pending(
    versioned: list[Migration], views: Migration, recorded: dict[int, tuple[str, str]]
) -> list[Migration]:
    _check_unchanged(versioned, recorded)
    steps = [m for m in versioned if m.version not in recorded]
    if steps or recorded.get(VIEWS_VERSION, ("", ""))[1] != views.checksum:
        steps.append(views)
    return steps


def pending(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """What `apply` would run, in order (SELECTs only). Raises MigrationChanged."""
    versioned, views = read_migrations(directory)
    with conn.transaction():
        return _pending(versioned, views, _recorded(conn))


def apply(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Bring the schema (in the connection's search_path) up to date; return the
    files applied, empty when it already was. Raises MigrationChanged, having
    applied nothing. `conn` must not be inside a transaction: each file commits."""
    from psycopg.pq import TransactionStatus

    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError("migrations.apply needs a connection outside a transaction")
    if not pending(conn, directory):
        return []
    versioned, views = read_migrations(directory)
    with conn.transaction():
        conn.execute(LOCK)
        conn.execute(HISTORY_DDL)
        _check_unchanged(versioned, _recorded(conn))  # another process's files may differ
    applied: list[str] = []
    for migration in versioned:
        with conn.transaction():
            conn.execute(LOCK)
            if migration.version in _recorded(conn):  # by another process meanwhile
                continue
            conn.execute(migration.statements)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
        applied.append(migration.name)
    with conn.transaction():
        conn.execute(LOCK)
        stored = _recorded(conn).get(VIEWS_VERSION, ("", ""))[1]
        if applied or stored != views.checksum:
            conn.execute(views.statements)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s) "
                "ON CONFLICT (version) DO UPDATE SET name = EXCLUDED.name, "
                "checksum = EXCLUDED.checksum, applied_at = now()",
                (views.version, views.name, views.checksum),
            )
            applied.append(views.name)
    if applied:
        log.info("schema: applied %s", ", ".join(applied))
    return applied

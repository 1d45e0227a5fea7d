"""The schema's migrations on the real PostgreSQL, each test in a scratch schema of
its own (dropped afterwards, pass or fail): the demo's tables are only read."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
from psycopg import sql

from pipeline.settings import Settings
from pipeline.sinks import migrations, telemetry_db

# What the old code (SCHEMA_SQL, VIEWS_SQL) made: later migrations may add more.
# telemetry_predictions was a table until 0005 moved its rows into the samples'.
TABLES = {
    "stream_runs", "stream_run_ends", "telemetry_samples", "telemetry_windows",
    "anomaly_events", "dead_letters", "stream_metrics", "live_model_scores",
    "consumer_offsets",
}  # fmt: skip
VIEWS = {
    "dash_latest_runs", "dash_latest_samples", "dash_car_latest", "dash_recent_samples",
    "dash_windows", "dash_predictions", "dash_model_versions", "dash_live_scores",
    "dash_anomalies", "dash_pipeline", "telemetry_predictions",
}  # fmt: skip
NUMBERED, VIEWS_MIGRATION = migrations.read_migrations()
ALL_FILES = [m.name for m in NUMBERED] + [VIEWS_MIGRATION.name]


@pytest.fixture
def scratch(stack: Settings) -> Iterator[psycopg.Connection]:
    """A connection whose search_path is a new, empty schema (and nothing else, so
    no statement can reach the demo's tables in public)."""
    schema = sql.Identifier(f"scratch_mig_{uuid.uuid4().hex[:8]}")
    with telemetry_db.connect(stack, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    try:
        with telemetry_db.connect(stack, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(schema))
            yield conn
    finally:
        with telemetry_db.connect(stack, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))


@pytest.fixture
def sql_dir(tmp_path: Path) -> Path:
    """A copy of the package's migrations, for tests that add or edit files."""
    return Path(shutil.copytree(migrations.MIGRATIONS_DIR, tmp_path / "sql"))


def history(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    ).fetchall()


def relations(conn: psycopg.Connection) -> dict[str, str]:
    """name -> BASE TABLE | VIEW, in the connection's current schema."""
    rows = conn.execute(
        "SELECT table_name, table_type FROM information_schema.tables "
        "WHERE table_schema = current_schema()"
    ).fetchall()
    return dict(rows)


def columns(conn: psycopg.Connection, tables: set[str]) -> set[tuple[Any, ...]]:
    """The tables' columns in the current schema. Each side is read on a connection
    whose search_path holds its schema, so defaults (nextval('..._seq')) read alike.
    Not their order: a database older than a column has it where it was added, and
    every statement names its columns."""
    return set(
        conn.execute(
            "SELECT table_name, column_name, data_type, udt_name, "
            "is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ANY(%s)",
            (sorted(tables),),
        ).fetchall()
    )


def indexes(conn: psycopg.Connection, tables: set[str]) -> set[tuple[str, str]]:
    rows = conn.execute(
        "SELECT indexname, replace(indexdef, schemaname || '.', '') FROM pg_indexes "
        "WHERE schemaname = current_schema() AND tablename = ANY(%s)",
        (sorted(tables),),
    ).fetchall()
    return set(rows)


def test_a_fresh_schema_gets_every_table_and_view(scratch: psycopg.Connection) -> None:
    assert [m.name for m in migrations.pending(scratch)] == ALL_FILES
    assert migrations.apply(scratch) == ALL_FILES
    found = relations(scratch)
    assert TABLES | {"schema_migrations"} <= {n for n, t in found.items() if t == "BASE TABLE"}
    assert {n for n, kind in found.items() if kind == "VIEW"} >= VIEWS
    assert "schema_applied" not in found
    assert [row[:2] for row in history(scratch)] == [(0, "views.sql")] + [
        (m.version, m.name) for m in NUMBERED
    ]
    assert migrations.pending(scratch) == []


def test_the_migrated_schema_equals_the_one_the_old_code_made(
    scratch: psycopg.Connection, stack: Settings
) -> None:
    # public was made by the old SCHEMA_SQL and VIEWS_SQL (or migrated since by
    # this code, whose first file is that SQL verbatim): the same names must come
    # out the same, column by column.
    migrations.apply(scratch)
    made = TABLES | VIEWS
    with telemetry_db.connect(stack) as public:
        assert made <= set(relations(public)), "the running demo lacks tables the old code made"
        assert columns(public, made) == columns(scratch, made)
        assert indexes(public, made) == indexes(scratch, made)


class RecordingCursor(psycopg.Cursor[Any]):
    """Records each statement the connection runs (conn.execute goes through it)."""

    statements: ClassVar[list[str]] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        text = query.decode() if isinstance(query, bytes) else str(query)
        RecordingCursor.statements.append(text)
        return super().execute(query, params, **kwargs)


def test_a_second_apply_runs_only_selects_and_waits_for_no_lock(
    scratch: psycopg.Connection, stack: Settings
) -> None:
    migrations.apply(scratch)
    applied = history(scratch)
    schema = scratch.execute("SELECT current_schema()").fetchone()
    assert schema is not None
    # A busy dashboard and a process in the middle of migrating: any exclusive lock
    # or the advisory lock would wait for them (and fail at lock_timeout, not hang).
    with telemetry_db.connect(stack) as busy:
        busy.execute(migrations.LOCK)
        busy.execute(
            sql.SQL("LOCK TABLE {}, {} IN ACCESS SHARE MODE").format(
                sql.Identifier(schema[0], "telemetry_predictions"),
                sql.Identifier(schema[0], "telemetry_samples"),
            )
        )
        scratch.execute("SET lock_timeout = '10s'")
        RecordingCursor.statements = []
        scratch.cursor_factory = RecordingCursor
        try:
            assert migrations.apply(scratch) == []
        finally:
            scratch.cursor_factory = psycopg.Cursor
        busy.rollback()
    assert RecordingCursor.statements, "apply ran nothing at all"
    assert all(s.lstrip().upper().startswith("SELECT") for s in RecordingCursor.statements)
    assert not any("advisory" in s for s in RecordingCursor.statements)
    assert history(scratch) == applied


def next_file(name: str) -> str:
    return f"{NUMBERED[-1].version + 1:04d}_{name}.sql"


def test_a_new_numbered_file_is_applied_once(scratch: psycopg.Connection, sql_dir: Path) -> None:
    migrations.apply(scratch, sql_dir)
    before = history(scratch)
    # Not idempotent on purpose: a second run would fail with "column already exists".
    (sql_dir / next_file("stream_runs_note")).write_text(
        "ALTER TABLE stream_runs ADD COLUMN note text;\n"
    )
    assert migrations.apply(scratch, sql_dir) == [next_file("stream_runs_note"), "views.sql"]
    assert migrations.apply(scratch, sql_dir) == []
    assert scratch.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'stream_runs' AND column_name = 'note'"
    ).fetchone()
    after = history(scratch)
    assert after[-1][:2] == (NUMBERED[-1].version + 1, next_file("stream_runs_note"))
    assert after[1:-1] == before[1:]  # the numbered files applied before are untouched


def test_an_edited_applied_file_is_refused_and_changes_nothing(
    scratch: psycopg.Connection, sql_dir: Path
) -> None:
    migrations.apply(scratch, sql_dir)
    before = (history(scratch), columns(scratch, set(relations(scratch))), relations(scratch))
    with (sql_dir / "0001_stream_tables.sql").open("a") as first:
        first.write("ALTER TABLE stream_runs ADD COLUMN oops text;\n")
    (sql_dir / next_file("stream_runs_note")).write_text(
        "ALTER TABLE stream_runs ADD COLUMN note text;\n"
    )
    refused = r"0001_stream_tables\.sql.*append-only: restore it and add a new numbered file"
    with pytest.raises(migrations.MigrationChanged, match=refused):
        migrations.apply(scratch, sql_dir)
    with pytest.raises(migrations.MigrationChanged, match=refused):
        migrations.pending(scratch, sql_dir)
    after = (history(scratch), columns(scratch, set(relations(scratch))), relations(scratch))
    assert after == before


def test_an_edited_views_file_is_reapplied(scratch: psycopg.Connection, sql_dir: Path) -> None:
    migrations.apply(scratch, sql_dir)
    before = history(scratch)
    with (sql_dir / "views.sql").open("a") as views:
        views.write("\nCREATE OR REPLACE VIEW dash_migration_check AS SELECT 1 AS one;\n")
    assert migrations.apply(scratch, sql_dir) == ["views.sql"]
    assert relations(scratch)["dash_migration_check"] == "VIEW"
    after = history(scratch)
    assert after[0][:3] == (0, "views.sql", migrations.read_migrations(sql_dir)[1].checksum)
    assert after[0][2] != before[0][2]
    assert after[1:] == before[1:]
    assert migrations.apply(scratch, sql_dir) == []


def test_a_database_the_old_code_made_is_taken_over(scratch: psycopg.Connection) -> None:
    # What ensure_schema left before migrations: the same SQL, its digest table, data.
    # (Its views are left out: views.sql now reads tables of later migrations.)
    scratch.execute(NUMBERED[0].statements)
    scratch.execute("CREATE TABLE schema_applied (digest text NOT NULL, applied_at timestamptz)")
    scratch.execute("INSERT INTO schema_applied (digest) VALUES ('old')")
    scratch.execute(
        "INSERT INTO stream_runs (run_id, session_key, source) VALUES ('r1', '2023_Monaco_R', 't')"
    )
    assert migrations.apply(scratch) == ALL_FILES
    assert "schema_applied" not in relations(scratch)
    assert scratch.execute("SELECT run_id FROM stream_runs").fetchall() == [("r1",)]


def test_stored_predictions_move_into_their_samples_rows(scratch: psycopg.Connection) -> None:
    # A database as it was before 0005: predictions in a table of their own.
    for migration in NUMBERED:
        if migration.name < "0005":
            scratch.execute(migration.statements)
    for seq in (0, 1, 2):
        scratch.execute(
            "INSERT INTO telemetry_samples (run_id, session_key, driver_number, driver, seq, "
            "event_time, session_time_s, speed, rpm, gear, throttle, brake, drs_open, "
            "lap_number, is_in_lap, is_out_lap, resampled, is_late, topic_partition, "
            "kafka_offset) VALUES ('r1', 's', 44, 'HAM', %s, now(), %s, 200, 11000, 6, 100, "
            "0, false, 7, false, false, false, false, 0, %s)",
            (seq, float(seq), seq),
        )
    # seq 0 scored before in_domain existed, seq 1 outside the domain, seq 2 never scored.
    scratch.execute(
        "INSERT INTO telemetry_predictions (run_id, session_key, driver_number, seq, "
        "event_time, pit_stop_p, pit_stop_version, lap_number, in_domain) VALUES "
        "('r1', 's', 44, 0, now(), 0.25, 3, 7, NULL), ('r1', 's', 44, 1, now(), NULL, 3, 7, false)"
    )
    migrations.apply(scratch)
    assert relations(scratch)["telemetry_predictions"] == "VIEW"
    rows = scratch.execute(
        "SELECT seq, in_domain, lap_number, pit_stop_p, pit_stop_version, driver "
        "FROM telemetry_predictions WHERE run_id = 'r1' ORDER BY seq"
    ).fetchall()
    assert rows == [(0, True, 7, 0.25, 3, "HAM"), (1, False, 7, None, 3, "HAM")]
    unscored = scratch.execute(
        "SELECT in_domain, pit_stop_p FROM telemetry_samples WHERE run_id = 'r1' AND seq = 2"
    ).fetchone()
    assert unscored == (None, None)

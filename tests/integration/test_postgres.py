from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from pipeline.settings import Settings


def test_writer_writes_reader_reads_and_reader_cannot_insert(stack: Settings) -> None:
    table = sql.Identifier(f"roles_check_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(stack.postgres_url("telemetry")) as writer:
        writer.execute(sql.SQL("CREATE TABLE {} (driver int, speed real)").format(table))
        with (
            writer.cursor() as cur,
            cur.copy(sql.SQL("COPY {} (driver, speed) FROM STDIN").format(table)) as copy,
        ):
            for row in [(1, 291.0), (16, 288.5)]:
                copy.write_row(row)
    try:
        with psycopg.connect(stack.postgres_url("telemetry_reader")) as reader:
            rows = reader.execute(
                sql.SQL("SELECT driver, speed FROM {} ORDER BY driver").format(table)
            ).fetchall()
            assert rows == [(1, 291.0), (16, 288.5)]
        with (
            psycopg.connect(stack.postgres_url("telemetry_reader")) as reader,
            pytest.raises(
                (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction)
            ),
        ):
            reader.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(table), [44, 1.0])
    finally:
        with psycopg.connect(stack.postgres_url("telemetry")) as writer:
            writer.execute(sql.SQL("DROP TABLE {}").format(table))


@pytest.mark.parametrize("role", ["airflow", "mlflow", "superset", "telemetry"])
def test_each_role_owns_its_database_and_no_other(stack: Settings, role: str) -> None:
    with psycopg.connect(stack.postgres_url(role)) as conn:
        assert conn.execute("SELECT current_database(), current_user").fetchone() == (role, role)
    other = "telemetry" if role != "telemetry" else "airflow"
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(stack.postgres_url(role, database=other)).close()

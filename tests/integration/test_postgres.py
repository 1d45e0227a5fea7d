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


def test_the_sinks_binary_copy_stores_what_the_columns_hold(stack: Settings) -> None:
    """`_copy` as the consumer writes a batch (binary COPY from Arrow), from `Columns`
    and from a DataFrame of the same rows: nullable integers stay integers, NULL
    and the empty string stay apart, naive times are UTC, lists become arrays,
    each value in its column's width (a TEMP table, gone with the connection)."""
    import datetime as dt

    import numpy as np

    from pipeline.processing.columns import Columns
    from pipeline.sinks import telemetry_db

    table = f"binary_copy_check_{uuid.uuid4().hex[:8]}"
    batch = Columns(
        {
            "lap": np.array([1.0, np.nan, 3.0]),  # a nullable integer, float with NaN
            "driver": np.array(["VER", None, ""], dtype=object),
            "at": np.array([0, 1_000_000, 2_500_000]).astype("datetime64[us]"),
            "speed": np.array([291.5, 0.0, 1.25]),
            "seq": np.array([7, 8, 2**40]),
            "flag": np.array([True, False, None], dtype=object),
            "reasons": np.array([["rpm_outlier", "sample_gap"], None, []], dtype=object),
        },
        3,
        frozenset({"lap"}),
    )
    columns = list(batch.columns)
    utc = dt.UTC
    expected = [
        (1, "VER", dt.datetime(1970, 1, 1, tzinfo=utc), 291.5, 7, True,
         ["rpm_outlier", "sample_gap"]),
        (None, None, dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=utc), 0.0, 8, False, None),
        (3, "", dt.datetime(1970, 1, 1, 0, 0, 2, 500_000, tzinfo=utc), 1.25, 2**40, None, []),
    ]  # fmt: skip
    with telemetry_db.connect(stack, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE {} (lap smallint, driver text, at timestamptz, speed real, "
                "seq bigint, flag boolean, reasons text[])"
            ).format(sql.Identifier(table))
        )
        for rows in (batch, batch.to_pandas()):
            with conn.transaction():
                telemetry_db._copy(conn, table, columns, rows)
            stored = conn.execute(
                sql.SQL("DELETE FROM {} RETURNING *").format(sql.Identifier(table))
            ).fetchall()
            assert sorted(stored, key=lambda row: row[2]) == expected


def test_a_batch_commits_its_metrics_and_live_notice_with_its_rows_or_none(
    stack: Settings,
) -> None:
    """The metrics row and the NOTIFY are in the batch's transaction: committed with
    it, and gone with it when the batch is fenced (a scratch group, topic and
    channel; their rows removed afterwards)."""
    from pipeline.sinks import telemetry_db

    group, topic = f"test-sink-{uuid.uuid4().hex[:8]}", f"test-sink-{uuid.uuid4().hex[:8]}"
    channel = f"test_sink_{uuid.uuid4().hex[:8]}"
    asked: list[dict[str, int]] = []

    def metrics(skipped: dict[str, int]) -> tuple[dict[str, object], bytes]:
        asked.append(skipped)
        row = {
            "group_id": group, "consumer": "test", "partitions": [0], "messages": 0,
            "samples": 0, "duplicates": 0, "late": 0, "anomalies": 0, "windows": 0,
            "dead_letters": 0, "batch_seconds": 0.001, "messages_per_s": 0.0,
        }  # fmt: skip
        return row, f'{{"batch": {len(asked)}}}'.encode()

    def commit(conn: psycopg.Connection, epoch: int) -> None:
        telemetry_db.commit_batch(
            conn, group_id=group, topic=topic, rows=telemetry_db.batch_rows(), run_ends=[],
            partitions=[telemetry_db.PartitionCommit(0, len(asked) + 1, epoch, b"")],
            metrics=metrics, live_channel=channel,
        )  # fmt: skip

    def stored(conn: psycopg.Connection) -> int:
        row = conn.execute("SELECT count(*) FROM stream_metrics WHERE group_id = %s", (group,))
        return int(row.fetchone()[0])  # type: ignore[index]

    with (
        telemetry_db.connect(stack, autocommit=True) as conn,
        telemetry_db.connect(stack, autocommit=True) as listener,
    ):
        try:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            first = telemetry_db.claim_partitions(conn, group, topic, [0])[0].epoch
            commit(conn, first)
            assert stored(conn) == 1 and asked == [{}]
            heard = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
            assert heard == ['{"batch": 1}']

            telemetry_db.claim_partitions(conn, group, topic, [0])  # another owner now
            with pytest.raises(telemetry_db.Fenced):
                commit(conn, first)
            assert stored(conn) == 1  # the fenced batch left no metrics row
            assert list(listener.notifies(timeout=1)) == []  # and told nobody
        finally:
            conn.execute("DELETE FROM stream_metrics WHERE group_id = %s", (group,))
            conn.execute("DELETE FROM consumer_offsets WHERE group_id = %s", (group,))

"""The telemetry database: batch writes with COPY (its schema: pipeline/sinks/sql).

The consumer's rows, its Kafka offsets and its per-car state are written in one
transaction (`commit_batch`). Each partition's offset row carries an epoch that
the owner bumps when it is assigned the partition; a commit whose epoch is no
longer current (a consumer that was presumed dead and replaced) is rolled back,
so two processes can never both write the same messages.

A row whose key is already stored (offsets lost, a car's state forgotten or
split over two partitions) never fails the batch: on a key clash the whole
transaction is rolled back and written again, the rows through staging tables
with `ON CONFLICT DO NOTHING`. The stored row wins, the skipped ones are counted
(samples as duplicates), and exactly once still holds. Clashes are rare, so the
fast path stays plain COPYs, with no savepoint.

Partitions are always claimed and committed in ascending order, so two
consumers' transactions cannot wait on each other's rows in a cycle.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import sql

from pipeline import faults
from pipeline.settings import Settings, get_settings
from pipeline.sinks import migrations

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import psycopg

    from pipeline.processing.columns import Columns

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = (
    "run_id", "session_key", "driver_number", "driver", "seq", "event_time", "session_time_s",
    "speed", "rpm", "gear", "throttle", "brake", "drs_open", "lap_number", "stint", "compound",
    "tyre_life", "position", "last_lap_s", "gap_ahead_s", "race_laps", "is_in_lap", "is_out_lap",
    "track_status", "resampled", "is_late", "anomalies", "topic_partition", "kafka_offset",
    "produced_at",
)  # fmt: skip
# The models' columns of a scored sample's row (`pipeline.ml.serving`; 0005 moved
# them from a table of their own into the sample's row: one row per message).
PREDICTION_COLUMNS = (
    "in_domain", "predicted_lap",
    *(f"{label}{column}" for label in ("pit_stop", "tire_failure", "crash_risk")
      for column in ("_p", "_version", "_alert", "_challenger_p", "_challenger_version")),
)  # fmt: skip
WINDOW_COLUMNS = (
    "run_id", "session_key", "driver_number", "driver", "window_start", "window_end", "samples",
    "speed_min", "speed_avg", "speed_max", "rpm_min", "rpm_avg", "rpm_max",
    "throttle_full_share", "brake_share", "gear_changes", "drs_open_share",
)  # fmt: skip
EVENT_COLUMNS = (
    "run_id", "session_key", "driver_number", "driver", "seq", "event_time", "reason", "value",
)  # fmt: skip
DEAD_LETTER_COLUMNS = (
    "consumer", "topic", "topic_partition", "kafka_offset", "message_key", "error_class",
    "reason", "payload_bytes", "payload_head",
)  # fmt: skip


IDLE_IN_TRANSACTION_MS = 20_000


class Fenced(RuntimeError):
    """Another consumer owns the partition now; this batch must not be committed."""


def connect(settings: Settings | None = None, *, autocommit: bool = False) -> psycopg.Connection:
    import psycopg

    settings = settings or get_settings()
    # A process paused inside a transaction (SIGSTOP, a stalled host) would hold
    # its partitions' offset rows locked, and its successor's claim would wait.
    return psycopg.connect(
        settings.postgres_url("telemetry"),
        autocommit=autocommit,
        options=f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
    )


def ensure_schema(settings: Settings | None = None) -> None:
    """Bring the tables and the dashboards' views up to date: the SQL files in
    pipeline/sinks/sql, applied by `migrations.apply`. Only SELECTs when nothing is
    pending, so every producer and consumer calls it on start. The reader role sees
    what it creates through the default privileges set when the database was
    provisioned."""
    with connect(settings, autocommit=True) as conn:
        migrations.apply(conn)


@dataclass
class PartitionClaim:
    """A partition as this consumer took it over: where to resume, with what state."""

    partition: int
    next_offset: int | None
    epoch: int
    state: bytes | None


def claim_partitions(
    conn: psycopg.Connection, group_id: str, topic: str, partitions: Sequence[int]
) -> dict[int, PartitionClaim]:
    """Take ownership: bump each partition's epoch (fencing the previous owner)
    and return the stored offset and state, per partition.

    A previous owner that stalled inside its commit keeps the offset rows locked.
    Stalled between statements, the server ends its session after
    IDLE_IN_TRANSACTION_MS; stalled in the middle of a COPY, its session is
    "active", waiting on the client, and no server timeout ever ends it (a query
    cancel is not acted on while the server reads COPY data). So the claim waits
    that long for the rows, then ends the session that holds them: Kafka has
    already given the partitions to us, and its transaction, rolled back, had
    committed nothing."""
    import psycopg

    try:
        return _claim(conn, group_id, topic, partitions, lock_timeout_ms=IDLE_IN_TRANSACTION_MS)
    except psycopg.errors.LockNotAvailable:
        ended = end_stalled_owners(conn, group_id, topic, partitions)
        log.warning("ended %d stalled session(s) holding partitions %s of %s: %s",
                    len(ended), list(partitions), topic, ended)  # fmt: skip
        return _claim(conn, group_id, topic, partitions, lock_timeout_ms=0)  # 0: no limit


def _claim(
    conn: psycopg.Connection,
    group_id: str,
    topic: str,
    partitions: Sequence[int],
    *,
    lock_timeout_ms: int,
) -> dict[int, PartitionClaim]:
    claims = {}
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        for partition in sorted(partitions):  # one order for everybody: no deadlock
            row = conn.execute(
                "INSERT INTO consumer_offsets (group_id, topic, topic_partition) "
                "VALUES (%s, %s, %s) ON CONFLICT (group_id, topic, topic_partition) "
                "DO UPDATE SET epoch = consumer_offsets.epoch + 1 "
                "RETURNING next_offset, epoch, state",
                (group_id, topic, partition),
            ).fetchone()
            assert row is not None
            claims[partition] = PartitionClaim(partition, row[0], row[1], row[2])
    return claims


def end_stalled_owners(
    conn: psycopg.Connection, group_id: str, topic: str, partitions: Sequence[int]
) -> list[dict[str, Any]]:
    """End the sessions whose open transactions hold these partitions' offset rows
    (a row's xmax names the transaction that locked it; that transaction's own
    lock names its session). Returns what was ended: pid, application, query."""
    rows = conn.execute(
        "SELECT l.pid, a.application_name, left(a.query, 60), pg_terminate_backend(l.pid, 10000) "
        "FROM consumer_offsets o "
        "JOIN pg_locks l ON l.locktype = 'transactionid' AND l.transactionid = o.xmax "
        " AND l.mode = 'ExclusiveLock' AND l.granted "
        "JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE o.group_id = %s AND o.topic = %s AND o.topic_partition = ANY(%s) "
        " AND l.pid <> pg_backend_pid()",
        (group_id, topic, list(partitions)),
    ).fetchall()
    return [{"pid": pid, "application": app, "query": query} for pid, app, query, _ in rows]


_column_types: dict[str, dict[str, str]] = {}  # table -> column -> format_type


@dataclass(frozen=True)
class Encoded:
    """A table's rows as binary COPY data, encoded ahead of the transaction."""

    data: bytes
    rows: int

    def __len__(self) -> int:
        return self.rows


def _copy(conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Any) -> None:
    """COPY `rows` into `table`: columns (a `Columns` or a DataFrame, or `Encoded`)
    in PostgreSQL's binary format, encoded from Arrow in one call (no Python per
    row: psycopg's write_row was most of a batch, and Arrow's CSV a fifth of the
    consumer's CPU); a short list of tuples row by row."""
    if isinstance(rows, list):
        with conn.cursor().copy(_copy_statement(table, tuple(columns), binary=False)) as copy:
            for row in rows:
                copy.write_row(row)
        return
    if not isinstance(rows, Encoded):
        rows = _encode(rows, columns, table_types(conn, table))
    with conn.cursor().copy(_copy_statement(table, tuple(columns), binary=True)) as copy:
        faults.point(get_settings(), faults.IN_COPY)
        copy.write(rows.data)


@functools.cache
def _copy_statement(table: str, columns: tuple[str, ...], *, binary: bool) -> sql.SQL:
    # Composed once per table: composing it cost ~70 µs of every COPY.
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    options = sql.SQL(" (FORMAT binary)" if binary else "")
    statement = sql.SQL("COPY {} ({}) FROM STDIN{}").format(sql.Identifier(table), names, options)
    return sql.SQL(statement.as_string())


def table_types(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """Each column's type as PostgreSQL names it, read from the catalog once per
    table and process (the migrations own the schema; a consumer started after
    one reads the new types)."""
    if table not in _column_types:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        ).fetchall()
        _column_types[table] = dict(rows)
    return _column_types[table]


def binary_copy(
    frame: pd.DataFrame | Columns, columns: Sequence[str], types: Mapping[str, str]
) -> bytes:
    """The columns as PostgreSQL's binary COPY data, each column cast to its table
    type (`types`, as `table_types` gives them) and encoded by pgpq. Each column
    goes to Arrow straight from its numpy array (pandas' conversion cost
    milliseconds a batch)."""
    import pyarrow as pa
    from pgpq import ArrowToPostgresBinaryEncoder

    ints: frozenset[str] = getattr(frame, "int_columns", frozenset())
    arrays = [_arrow(frame[name], name, ints, _arrow_type(types[name], name)) for name in columns]
    table = pa.Table.from_arrays(arrays, names=list(columns))
    encoder = ArrowToPostgresBinaryEncoder(table.schema)
    parts = [encoder.write_header()]
    parts += [encoder.write_batch(batch) for batch in table.to_batches()]
    parts.append(encoder.finish())
    return b"".join(parts)


def _cast(array: Any, target: Any) -> Any:
    # A cast costs tens of microseconds even to the same type: most columns of a
    # small batch would pay more for it than for their values.
    return array if array.type == target else array.cast(target)


@functools.cache
def _arrow_type(pg_type: str, column: str) -> Any:
    """The Arrow type binary COPY needs for a PostgreSQL type: binary COPY carries
    each value in its column's exact width, unconverted."""
    import pyarrow as pa

    types = {
        "smallint": pa.int16(),
        "integer": pa.int32(),
        "bigint": pa.int64(),
        "real": pa.float32(),
        "double precision": pa.float64(),
        "boolean": pa.bool_(),
        "text": pa.string(),
        "text[]": pa.list_(pa.string()),
        "bytea": pa.binary(),
        "timestamp with time zone": pa.timestamp("us", tz="UTC"),
    }
    if pg_type not in types:
        raise TypeError(
            f"column {column} is {pg_type}, which the sink cannot COPY yet: add its "
            "Arrow type to telemetry_db._arrow_type"
        )
    return types[pg_type]


def _arrow(values: Any, name: str, int_columns: frozenset[str], target: Any) -> Any:
    """One column as an Arrow array of the `target` type: `int_columns` are float
    with NaN for NULL, naive datetime64 is UTC (`pipeline.processing.columns`)."""
    import numpy as np
    import pyarrow as pa

    if not isinstance(values, np.ndarray):  # a pandas Series: Arrow knows its dtypes
        array = pa.array(values, from_pandas=True)
    elif name in int_columns:
        missing = np.isnan(values)
        whole = _narrowed(np.where(missing, 0, values).astype(np.int64), target, name)
        array = pa.array(whole, mask=missing)
    elif values.dtype.kind == "M":
        array = pa.array(values, type=pa.timestamp("us", tz="UTC"), from_pandas=True)
    elif values.dtype == object:  # text, or values with None: read as the target type
        return pa.array(values, type=target, from_pandas=True)  # (no guess first: -1/3 CPU)
    else:
        array = pa.array(_narrowed(values, target, name), from_pandas=True)
    return _cast(array, target)


def _narrowed(values: np.ndarray, target: Any, name: str) -> np.ndarray:
    """Numbers in the width of their Arrow `target` type, cast by numpy: Arrow's
    cast costs ~10 µs a column whatever its length (at 1x, most of encoding a
    batch's samples). Whole numbers out of the target's range are refused, as
    Arrow's cast refuses them."""
    import numpy as np
    import pyarrow as pa

    if not (pa.types.is_integer(target) or pa.types.is_floating(target)):
        return values
    width = np.dtype(target.to_pandas_dtype())
    if values.dtype == width:
        return values
    if width.kind in "iu" and len(values):
        bounds = np.iinfo(width)
        if values.min() < bounds.min or values.max() > bounds.max:
            outside = values[(values < bounds.min) | (values > bounds.max)]
            raise ValueError(
                f"column {name} holds {outside[0]}, outside its {target} range "
                f"{bounds.min}..{bounds.max}"
            )
    return values.astype(width)


def _copy_tables(
    conn: psycopg.Connection,
    tables: list[tuple[str, Sequence[str], Any]],
    *,
    skip_stored: bool,
) -> dict[str, int]:
    """COPY each (table, columns, rows). With `skip_stored`, rows whose key is
    already stored (or repeated within the rows: the first wins) are skipped,
    through a staging table per table; returns, per table, how many were."""
    if not skip_stored:
        for table, columns, rows in tables:
            _copy(conn, table, columns, rows)
        return {}
    skipped = {}
    for table, columns, rows in tables:
        staging = sql.Identifier(f"staging_{table}")
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS"
            ).format(staging, sql.Identifier(table))
        )
        conn.execute(sql.SQL("DELETE FROM {}").format(staging))
        _copy(conn, f"staging_{table}", columns, rows)
        inserted = conn.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
                sql.Identifier(table), names, names, staging
            )
        ).rowcount
        skipped[table] = len(rows) - inserted
    return skipped


def _with_event_time(rows: pd.DataFrame | Columns) -> Columns:
    """Rows with `date_us` (epoch microseconds), and `event_time` from it."""
    import numpy as np

    from pipeline.processing.columns import Columns

    batch = rows if isinstance(rows, Columns) else Columns.from_pandas(rows)
    batch = batch.copy()
    batch["event_time"] = np.asarray(batch["date_us"], dtype=np.int64).astype("datetime64[us]")
    return batch


def sample_rows(
    samples: pd.DataFrame | Columns, predictions: pd.DataFrame | Columns | None = None
) -> Columns:
    """Processed samples as the table's columns (times as timestamps), with the
    models' `predictions` (row for row; PREDICTION_COLUMNS) when they were scored."""
    import numpy as np

    from pipeline.processing.columns import Columns

    batch = _with_event_time(samples)
    rows = {name: batch[name] for name in SAMPLE_COLUMNS if name in batch}
    produced = np.asarray(batch["produced_at_us"], dtype=float)
    at = np.full(len(produced), np.datetime64("NaT"), dtype="datetime64[us]")
    known = ~np.isnan(produced)
    at[known] = produced[known].astype(np.int64)
    rows["produced_at"] = at
    rows["topic_partition"], rows["kafka_offset"] = batch["partition"], batch["offset"]
    table = Columns({c: rows[c] for c in SAMPLE_COLUMNS}, len(batch), batch.int_columns)
    if predictions is not None:
        scored = (
            predictions if isinstance(predictions, Columns) else Columns.from_pandas(predictions)
        )
        if len(scored) != len(table):
            raise ValueError(f"{len(scored)} predictions for {len(table)} samples")
        unknown = [name for name in scored if name not in PREDICTION_COLUMNS]
        if unknown:
            raise ValueError(f"telemetry_samples has no prediction columns {unknown}")
        for name in scored:  # a model not scored stays NULL
            table[name] = scored[name]
        table.int_columns = table.int_columns | scored.int_columns
    return table


@dataclass
class PartitionCommit:
    partition: int
    next_offset: int
    epoch: int
    state: bytes


# Given the rows skipped per table, the batch's metrics row and the live page's
# notice (None: no notice): written by the batch's own transaction.
BatchMetrics = Callable[[dict[str, int]], tuple[dict[str, Any], bytes | None]]


@dataclass
class BatchRows:
    """One batch's rows, per table (table, columns, rows), as `commit_batch` writes
    them: each encoded as binary COPY data already where this process knows the
    table's types (`table_types`, from its first write), so a consumer encodes a
    batch beside the transaction of the one before rather than inside its own."""

    tables: list[tuple[str, Sequence[str], Any]]


def batch_rows(
    *,
    samples: pd.DataFrame | Columns | None = None,
    events: pd.DataFrame | Columns | None = None,
    windows: Columns | None = None,
    dead_letters: list[tuple[Any, ...]] | None = None,
    predictions: pd.DataFrame | Columns | None = None,
) -> BatchRows:
    """A batch's processed samples (with the models' `predictions` of them, row for
    row, when scored), anomaly events, closed windows and dead letters as the
    tables' rows."""
    tables: list[tuple[str, Sequence[str], Any]] = []
    if samples is not None and len(samples):
        rows = sample_rows(samples, predictions)
        tables.append(("telemetry_samples", rows.columns, rows))
    if events is not None and len(events):
        tables.append(("anomaly_events", EVENT_COLUMNS, _with_event_time(events)))
    if windows is not None and len(windows):
        tables.append(("telemetry_windows", WINDOW_COLUMNS, _window_columns(windows)))
    if dead_letters:
        tables.append(("dead_letters", DEAD_LETTER_COLUMNS, dead_letters))
    return BatchRows(
        [(table, columns, _encoded(table, columns, rows)) for table, columns, rows in tables]
    )


def _encoded(table: str, columns: Sequence[str], rows: Any) -> Any:
    types = _column_types.get(table)
    if types is None or isinstance(rows, list):  # the COPY encodes it (and learns the types)
        return rows
    return _encode(rows, columns, types)


def _encode(rows: Any, columns: Sequence[str], types: Mapping[str, str]) -> Encoded:
    return Encoded(binary_copy(rows, columns, types), len(rows))


def commit_batch(
    conn: psycopg.Connection,
    *,
    group_id: str,
    topic: str,
    rows: BatchRows | Callable[[], BatchRows],
    run_ends: list[tuple[str, int, int]],
    partitions: list[PartitionCommit],
    new_runs: Sequence[tuple[str, str, str]] = (),
    metrics: BatchMetrics | None = None,
    live_channel: str = "",
) -> dict[str, int]:
    """Write one batch's rows (`batch_rows`), offsets and state atomically (or
    raise Fenced).
    `new_runs`: (run_id, session_key, source) of runs this consumer has not seen
    before, recorded with the topic (so scratch runs are found and removed even
    when no producer of ours registered them). `metrics` gives the batch's
    metrics row and live notice once its rows are written, and they go in the
    same transaction (one commit per batch; listeners hear of the rows as they
    become visible). Returns, per table, the rows skipped because their key was
    already stored. `conn` is in autocommit mode: the batch runs its own BEGIN
    and COMMIT, pipelined with its statements."""
    import psycopg

    if not conn.autocommit:
        raise ValueError("commit_batch needs an autocommit connection (connect(autocommit=True))")
    batch = (group_id, topic, partitions, new_runs, rows, run_ends, metrics, live_channel)
    try:
        return _write_batch(conn, *batch, skip_stored=False)
    except psycopg.errors.UniqueViolation:
        # A resend (a row already stored): the whole transaction again, the stored
        # rows winning. Rare, so the usual batch pays for no savepoint.
        return _write_batch(conn, *batch, skip_stored=True)


def _write_batch(
    conn: psycopg.Connection,
    group_id: str,
    topic: str,
    partitions: list[PartitionCommit],
    new_runs: Sequence[tuple[str, str, str]],
    rows: BatchRows | Callable[[], BatchRows],
    run_ends: list[tuple[str, int, int]],
    metrics: BatchMetrics | None,
    live_channel: str,
    *,
    skip_stored: bool,
) -> dict[str, int]:
    """One transaction in as few round trips as the protocol allows: BEGIN, the
    fences and the new runs in one pipeline; each COPY (PostgreSQL answers its
    start before taking data: two round trips each); then the run ends, the
    metrics row, the live notice and COMMIT in one pipeline. Measured at 1x, a
    batch's commit took 8 round trips with `conn.transaction()` and its own
    BEGIN and COMMIT, 6 so."""
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            # Fence first (a stale owner writes nothing), in ascending partition
            # order; rowcount is the sum over the statements, known at the sync.
            fences = sorted(partitions, key=lambda c: c.partition)
            cursor = conn.cursor()
            if fences:
                cursor.executemany(
                    "UPDATE consumer_offsets SET next_offset = %s, state = %s, "
                    "updated_at = now() WHERE group_id = %s AND topic = %s "
                    "AND topic_partition = %s AND epoch = %s",
                    [(c.next_offset, c.state, group_id, topic, c.partition, c.epoch)
                     for c in fences],
                )  # fmt: skip
            if new_runs:
                conn.cursor().executemany(
                    "INSERT INTO stream_runs (run_id, session_key, source, topic) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING",
                    [(*run, topic) for run in new_runs],
                )
        if fences and cursor.rowcount != len(fences):
            taken = [c.partition for c in fences]
            raise Fenced(f"one of partitions {taken} of {topic} was taken over")
        # Rows still being prepared (a callable) are waited for only now: their
        # scores and encoding overlap the round trip of BEGIN and the fences.
        tables = (rows() if callable(rows) else rows).tables
        skipped = _copy_tables(conn, tables, skip_stored=skip_stored) if tables else {}
        skipped = {table: n for table, n in skipped.items() if n}
        with conn.pipeline():
            if run_ends:  # a retried producer ends its run again: the latest count wins
                conn.cursor().executemany(
                    "INSERT INTO stream_run_ends (run_id, topic_partition, samples) "
                    "VALUES (%s, %s, %s) ON CONFLICT (run_id, topic_partition) "
                    "DO UPDATE SET samples = EXCLUDED.samples, committed_at = now()",
                    run_ends,
                )
            if metrics is not None:
                row, notice = metrics(skipped)
                record_metrics(conn, row, (live_channel, notice) if notice else None)
            conn.execute("COMMIT")
    except BaseException:
        _roll_back(conn)
        raise
    return skipped


def _roll_back(conn: psycopg.Connection) -> None:
    """End a failed batch's transaction, unless its connection is gone (the
    server then rolled it back by itself)."""
    import psycopg

    if conn.closed:
        return
    try:
        conn.rollback()
    except psycopg.OperationalError:
        log.warning("the connection was lost while rolling a batch back", exc_info=True)


def _window_columns(windows: Columns) -> Columns:
    """Closed windows (`pipeline.processing.batch`'s rows) as the table's columns."""
    from pipeline.processing.columns import Columns

    rows = {name: windows[name] for name in WINDOW_COLUMNS if name in windows}
    for edge in ("window_start", "window_end"):
        rows[edge] = windows[f"{edge}_us"].astype("datetime64[us]")
    return Columns({name: rows[name] for name in WINDOW_COLUMNS}, len(windows))


def record_metrics(
    conn: psycopg.Connection, metrics: dict[str, Any], notify: tuple[str, bytes] | None = None
) -> None:
    """Store one batch's metrics; with `notify` (channel, payload), also tell the
    listeners (the live page) in the same statement: one round trip per batch."""
    columns = tuple(metrics)
    values = [metrics[c] for c in columns]
    if notify is None:
        conn.execute(_metrics_statement(columns, notify=False), values)
    else:
        conn.execute(
            _metrics_statement(columns, notify=True), [*values, notify[0], notify[1].decode()]
        )


@functools.cache
def _metrics_statement(columns: tuple[str, ...], *, notify: bool) -> sql.SQL:
    # Composed once: composing it cost ~80 µs of every batch.
    insert = sql.SQL("INSERT INTO stream_metrics ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
    if notify:
        insert = sql.SQL(
            "WITH stored AS ({} RETURNING 1) SELECT pg_notify(%s, %s) FROM stored"
        ).format(insert)
    return sql.SQL(insert.as_string())


RUN_TABLES = (
    "telemetry_samples", "telemetry_windows", "anomaly_events", "stream_run_ends",
    "live_model_scores",
)  # fmt: skip


def delete_stream_data(
    conn: psycopg.Connection, *, topic: str, dead_letter_topic: str, group_id: str
) -> int:
    """Remove what the runs produced to `topic` and the consumer group stored
    (the scratch data of tests and benchmarks, so dashboards show real replays).
    Returns the number of runs removed."""
    with conn.transaction():
        runs = [
            row[0]
            for row in conn.execute("SELECT run_id FROM stream_runs WHERE topic = %s", (topic,))
        ]
        for table in (*RUN_TABLES, "stream_runs"):
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE run_id = ANY(%s)").format(sql.Identifier(table)),
                (runs,),
            )
        conn.execute("DELETE FROM stream_metrics WHERE group_id = %s", (group_id,))
        conn.execute("DELETE FROM consumer_offsets WHERE group_id = %s", (group_id,))
        conn.execute(
            "DELETE FROM dead_letters WHERE topic = ANY(%s)", ([topic, dead_letter_topic],)
        )
    if runs and conn.autocommit:
        # A purge leaves dead rows and stale statistics until autovacuum comes by; a
        # dashboard query planned on them meanwhile took over a minute (a chart timed
        # out in CI right after tests purged their runs). Clean both now.
        for table in (*RUN_TABLES, "stream_runs"):
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
    return len(runs)


def partitions_ended(conn: psycopg.Connection, run_id: str) -> int:
    """Partitions whose end marker for the run is committed: what a consumer
    waiting for the run checks every second (an index lookup; counting the
    run's stored rows each time grew with the run)."""
    row = conn.execute(
        "SELECT count(*) FROM stream_run_ends WHERE run_id = %s", (run_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def run_completion(conn: psycopg.Connection, run_id: str) -> tuple[int, int, int]:
    """(partitions whose end marker is committed, samples the producer says it
    delivered to them, sample rows stored for the run)."""
    ends = conn.execute(
        "SELECT count(*), coalesce(sum(samples), 0) FROM stream_run_ends WHERE run_id = %s",
        (run_id,),
    ).fetchone()
    stored = conn.execute(
        "SELECT count(*) FROM telemetry_samples WHERE run_id = %s", (run_id,)
    ).fetchone()
    assert ends is not None and stored is not None
    return int(ends[0]), int(ends[1]), int(stored[0])

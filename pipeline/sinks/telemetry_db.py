"""The telemetry database: its tables, and batch writes with COPY.

The consumer's rows, its Kafka offsets and its per-car state are written in one
transaction (`commit_batch`). Each partition's offset row carries an epoch that
the owner bumps when it is assigned the partition; a commit whose epoch is no
longer current (a consumer that was presumed dead and replaced) is rolled back,
so two processes can never both write the same messages.

A row whose key is already stored (offsets lost, a car's state forgotten or
split over two partitions) never fails the batch: the COPYs run in one
savepoint, and on a key clash the batch's rows are written again through
staging tables with `ON CONFLICT DO NOTHING`. The stored row wins, the skipped ones are counted
(samples as duplicates), and exactly once still holds. Clashes are rare, so the
fast path stays a plain COPY.

Partitions are always claimed and committed in ascending order, so two
consumers' transactions cannot wait on each other's rows in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import sql

from pipeline.settings import Settings, get_settings
from pipeline.sinks import dashboard_views

if TYPE_CHECKING:
    import pandas as pd
    import psycopg

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS stream_runs (
    run_id text PRIMARY KEY,
    session_key text NOT NULL,
    source text NOT NULL,
    speed double precision,                  -- session seconds per wall second; NULL unpaced
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    samples_planned bigint,
    samples_delivered bigint,
    delivery_failures bigint,
    intended_rate_hz double precision,
    achieved_rate_hz double precision,
    stopped_early boolean
);
CREATE TABLE IF NOT EXISTS stream_run_ends (
    run_id text NOT NULL,
    topic_partition integer NOT NULL,
    samples bigint NOT NULL,                 -- what the producer delivered to the partition
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, topic_partition)
);
CREATE TABLE IF NOT EXISTS telemetry_samples (
    run_id text NOT NULL,
    session_key text NOT NULL,
    driver_number smallint NOT NULL,
    driver text NOT NULL,
    seq integer NOT NULL,
    event_time timestamptz NOT NULL,
    session_time_s double precision NOT NULL,
    speed real NOT NULL,
    rpm real NOT NULL,
    gear smallint NOT NULL,
    throttle real NOT NULL,
    brake real NOT NULL,
    drs_open boolean NOT NULL,
    lap_number smallint,
    stint smallint,
    compound text,
    tyre_life real,
    position smallint,
    is_in_lap boolean NOT NULL,
    is_out_lap boolean NOT NULL,
    track_status text,
    resampled boolean NOT NULL,
    is_late boolean NOT NULL,
    anomalies text[],
    topic_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    produced_at timestamptz,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, driver_number, seq)
);
CREATE INDEX IF NOT EXISTS telemetry_samples_session_time
    ON telemetry_samples (session_key, event_time);
CREATE TABLE IF NOT EXISTS telemetry_windows (
    run_id text NOT NULL,
    session_key text NOT NULL,
    driver_number smallint NOT NULL,
    driver text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end timestamptz NOT NULL,
    samples integer NOT NULL,
    speed_min real, speed_avg real, speed_max real,
    rpm_min real, rpm_avg real, rpm_max real,
    throttle_full_share real,
    brake_share real,
    gear_changes integer,
    drs_open_share real,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, driver_number, window_start)
);
CREATE TABLE IF NOT EXISTS anomaly_events (
    run_id text NOT NULL,
    session_key text NOT NULL,
    driver_number smallint NOT NULL,
    driver text NOT NULL,
    seq integer NOT NULL,
    event_time timestamptz NOT NULL,
    reason text NOT NULL,
    value double precision,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, driver_number, seq, reason)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id bigserial PRIMARY KEY,
    consumer text NOT NULL,
    topic text NOT NULL,
    topic_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    message_key text,
    error_class text NOT NULL,
    reason text NOT NULL,
    payload_bytes integer NOT NULL,
    payload_head bytea,                      -- the first KiB, for a look
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic, topic_partition, kafka_offset)
);
CREATE TABLE IF NOT EXISTS stream_metrics (
    id bigserial PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    group_id text NOT NULL,
    consumer text NOT NULL,
    partitions integer[] NOT NULL,
    messages integer NOT NULL,
    samples integer NOT NULL,
    duplicates integer NOT NULL,
    late integer NOT NULL,
    anomalies integer NOT NULL,
    windows integer NOT NULL,
    dead_letters integer NOT NULL,
    lag bigint,
    latency_p50_ms real,
    latency_p95_ms real,
    latency_p99_ms real,
    batch_seconds real NOT NULL,
    messages_per_s real NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry_predictions (
    run_id text NOT NULL,
    session_key text NOT NULL,
    driver_number smallint NOT NULL,
    seq integer NOT NULL,
    event_time timestamptz NOT NULL,
    pit_stop_p real,                         -- NULL: no champion served for the model
    pit_stop_version integer,
    tire_failure_p real,
    tire_failure_version integer,
    crash_risk_p real,
    crash_risk_version integer,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, driver_number, seq)
);
-- Added after the first release: databases made before get them here.
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS driver text;
-- Models worth trusting: the lap-level models' domain and alerts at each version's threshold.
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS in_domain boolean;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS lap_number smallint;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS pit_stop_alert boolean;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS tire_failure_alert boolean;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS crash_risk_alert boolean;
-- Each model's challenger, scored in shadow beside its champion (NULL: none, or the same).
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS pit_stop_challenger_p real;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS pit_stop_challenger_version integer;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS tire_failure_challenger_p real;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS tire_failure_challenger_version integer;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS crash_risk_challenger_p real;
ALTER TABLE telemetry_predictions ADD COLUMN IF NOT EXISTS crash_risk_challenger_version integer;
ALTER TABLE stream_metrics ADD COLUMN IF NOT EXISTS session_key text;
ALTER TABLE telemetry_samples ADD COLUMN IF NOT EXISTS last_lap_s real;
ALTER TABLE telemetry_samples ADD COLUMN IF NOT EXISTS gap_ahead_s real;
ALTER TABLE telemetry_samples ADD COLUMN IF NOT EXISTS race_laps smallint;
ALTER TABLE stream_runs ADD COLUMN IF NOT EXISTS topic text;
ALTER TABLE stream_metrics ADD COLUMN IF NOT EXISTS broker_errors integer NOT NULL DEFAULT 0;
ALTER TABLE stream_metrics ADD COLUMN IF NOT EXISTS clashes integer NOT NULL DEFAULT 0;
ALTER TABLE stream_metrics ADD COLUMN IF NOT EXISTS state_resets integer NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS stream_metrics_recorded_at ON stream_metrics (recorded_at);
-- Served predictions scored once their outcome is known (pipeline.ml.live_scores).
CREATE TABLE IF NOT EXISTS live_model_scores (
    run_id text NOT NULL,
    session_key text NOT NULL,
    label text NOT NULL,
    role text NOT NULL,                      -- champion (served) | challenger (in shadow)
    version integer NOT NULL,
    horizon_laps smallint NOT NULL,
    laps integer NOT NULL,                   -- laps whose outcome is known so far
    positives integer NOT NULL,
    base_rate double precision NOT NULL,
    pr_auc double precision,                 -- NULL: no positive (or no negative) lap yet
    brier double precision NOT NULL,
    alerts integer NOT NULL,                 -- laps at or above the version's threshold
    alert_hits integer NOT NULL,
    alert_precision double precision,
    calibration jsonb NOT NULL,              -- quantile bins: mean p, observed rate, laps
    outcomes_from text NOT NULL,             -- lap table (a cached race) | stream (a game)
    scored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, label, role, version)
);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    group_id text NOT NULL,
    topic text NOT NULL,
    topic_partition integer NOT NULL,
    next_offset bigint,                      -- NULL: nothing consumed yet
    epoch integer NOT NULL DEFAULT 0,
    state bytea,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, topic_partition)
);
"""

SAMPLE_COLUMNS = (
    "run_id", "session_key", "driver_number", "driver", "seq", "event_time", "session_time_s",
    "speed", "rpm", "gear", "throttle", "brake", "drs_open", "lap_number", "stint", "compound",
    "tyre_life", "position", "last_lap_s", "gap_ahead_s", "race_laps", "is_in_lap", "is_out_lap",
    "track_status", "resampled", "is_late", "anomalies", "topic_partition", "kafka_offset",
    "produced_at",
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
    """Create the tables and the dashboards' views (idempotent). The reader role
    sees them through the default privileges set when the database was provisioned.

    Applied only when the definitions changed (their digest is stored): `ALTER
    TABLE` and `CREATE OR REPLACE VIEW` take exclusive locks, and every producer
    and consumer calls this while dashboards and other consumers are busy."""
    import hashlib

    wanted = hashlib.sha256((SCHEMA_SQL + dashboard_views.VIEWS_SQL).encode()).hexdigest()
    with connect(settings) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('f1_telemetry_schema'))")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_applied "
            "(digest text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = conn.execute("SELECT digest FROM schema_applied").fetchone()
        if applied is not None and applied[0] == wanted:
            return
        conn.execute(SCHEMA_SQL)
        conn.execute(dashboard_views.VIEWS_SQL)
        conn.execute("DELETE FROM schema_applied")
        conn.execute("INSERT INTO schema_applied (digest) VALUES (%s)", (wanted,))


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
    and return the stored offset and state, per partition."""
    claims = {}
    with conn.transaction():
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


def _copy(
    conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with conn.cursor().copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _copy_tables(
    conn: psycopg.Connection, tables: list[tuple[str, Sequence[str], list[Any]]]
) -> dict[str, int]:
    """COPY each (table, columns, rows), skipping rows whose key is already
    stored (or repeated within the rows: the first wins). Returns, per table,
    how many were skipped. One savepoint for all of them: a clash undoes only
    the COPYs, which are then written again through staging tables."""
    import psycopg

    try:
        with conn.transaction():
            for table, columns, rows in tables:
                _copy(conn, table, columns, rows)
        return {}
    except psycopg.errors.UniqueViolation:
        pass
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


def _timestamps(micros: Any) -> Any:
    import pandas as pd

    return pd.to_datetime(micros, unit="us", utc=True)


def sample_rows(samples: pd.DataFrame) -> Iterable[Sequence[Any]]:
    """The COPY rows of processed samples (nulls as None, times as datetimes)."""
    frame = samples.assign(
        event_time=_timestamps(samples["date_us"]),
        produced_at=_timestamps(samples["produced_at_us"]),
        topic_partition=samples["partition"],
        kafka_offset=samples["offset"],
    )
    return plain_rows(frame[list(SAMPLE_COLUMNS)])


def plain_rows(frame: pd.DataFrame) -> Iterable[Sequence[Any]]:
    """Rows of Python values for COPY (numpy scalars and NaN become plain values/None)."""
    plain = frame.astype(object)
    return plain.where(plain.notna(), None).itertuples(index=False, name=None)


@dataclass
class PartitionCommit:
    partition: int
    next_offset: int
    epoch: int
    state: bytes


def commit_batch(
    conn: psycopg.Connection,
    *,
    group_id: str,
    topic: str,
    samples: pd.DataFrame,
    events: pd.DataFrame,
    windows: list[dict[str, Any]],
    dead_letters: list[tuple[Any, ...]],
    run_ends: list[tuple[str, int, int]],
    partitions: list[PartitionCommit],
    extra_tables: dict[str, pd.DataFrame] | None = None,
    new_runs: Sequence[tuple[str, str, str]] = (),
) -> dict[str, int]:
    """Write one batch's rows, offsets and state atomically (or raise Fenced).
    `new_runs`: (run_id, session_key, source) of runs this consumer has not seen
    before, recorded with the topic (so scratch runs are found and removed even
    when no producer of ours registered them). Returns, per table, the rows
    skipped because their key was already stored."""
    skipped: dict[str, int] = {}
    with conn.transaction():
        # Fence first (a stale owner writes nothing), in ascending partition order.
        for commit in sorted(partitions, key=lambda c: c.partition):
            updated = conn.execute(
                "UPDATE consumer_offsets SET next_offset = %s, state = %s, updated_at = now() "
                "WHERE group_id = %s AND topic = %s AND topic_partition = %s AND epoch = %s",
                (commit.next_offset, commit.state, group_id, topic, commit.partition, commit.epoch),
            ).rowcount
            if updated != 1:
                raise Fenced(f"partition {commit.partition} of {topic} was taken over")
        if new_runs:
            conn.cursor().executemany(
                "INSERT INTO stream_runs (run_id, session_key, source, topic) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING",
                [(*run, topic) for run in new_runs],
            )
        tables: list[tuple[str, Sequence[str], list[Any]]] = []
        if len(samples):
            tables.append(("telemetry_samples", SAMPLE_COLUMNS, list(sample_rows(samples))))
        if len(events):
            frame = events.assign(event_time=_timestamps(events["date_us"]))
            rows = list(frame[list(EVENT_COLUMNS)].itertuples(index=False, name=None))
            tables.append(("anomaly_events", EVENT_COLUMNS, rows))
        if windows:
            tables.append(
                ("telemetry_windows", WINDOW_COLUMNS, [_window_values(w) for w in windows])
            )
        if dead_letters:
            tables.append(("dead_letters", DEAD_LETTER_COLUMNS, dead_letters))
        for table, frame in (extra_tables or {}).items():  # e.g. the models' predictions
            if len(frame):
                tables.append((table, list(frame.columns), list(plain_rows(frame))))
        if tables:
            skipped = _copy_tables(conn, tables)
        if run_ends:  # a retried producer ends its run again: the latest count wins
            conn.cursor().executemany(
                "INSERT INTO stream_run_ends (run_id, topic_partition, samples) "
                "VALUES (%s, %s, %s) ON CONFLICT (run_id, topic_partition) "
                "DO UPDATE SET samples = EXCLUDED.samples, committed_at = now()",
                run_ends,
            )
    return {table: n for table, n in skipped.items() if n}


def _window_values(window: dict[str, Any]) -> tuple[Any, ...]:
    import datetime as dt

    start = dt.datetime.fromtimestamp(window["window_start_us"] / 1e6, tz=dt.UTC)
    end = dt.datetime.fromtimestamp(window["window_end_us"] / 1e6, tz=dt.UTC)
    values = {**window, "window_start": start, "window_end": end}
    return tuple(values[c] for c in WINDOW_COLUMNS)


def record_metrics(
    conn: psycopg.Connection, metrics: dict[str, Any], notify: tuple[str, bytes] | None = None
) -> None:
    """Store one batch's metrics; with `notify` (channel, payload), also tell the
    listeners (the live page) in the same statement: one round trip per batch."""
    columns = list(metrics)
    insert = sql.SQL("INSERT INTO stream_metrics ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
    values = [metrics[c] for c in columns]
    if notify is None:
        conn.execute(insert, values)
    else:
        conn.execute(
            sql.SQL("WITH stored AS ({} RETURNING 1) SELECT pg_notify(%s, %s) FROM stored").format(
                insert
            ),
            [*values, notify[0], notify[1].decode()],
        )


RUN_TABLES = (
    "telemetry_samples", "telemetry_windows", "anomaly_events", "telemetry_predictions",
    "stream_run_ends", "live_model_scores",
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
    return len(runs)


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

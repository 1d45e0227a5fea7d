-- The stream's tables, as they were when the schema moved out of telemetry_db.py
-- (its SCHEMA_SQL). Every statement is idempotent (IF NOT EXISTS), so a database
-- the old code made takes this file without harm. The role `telemetry` owns the
-- tables and the default privileges set when the database was provisioned give
-- `telemetry_reader` (the dashboards) SELECT on them.
--
-- Applied files are never edited (migrations.py checks their checksums): change the
-- schema in a new numbered file.

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

-- Views the Superset dashboards read (through the read-only role).
--
-- A repeatable file: migrations.py re-applies it whenever its checksum changes (and
-- after any numbered migration), so edit it in place. The role `telemetry` owns the
-- views and the default privileges give `telemetry_reader` SELECT on them.
-- CREATE OR REPLACE VIEW only appends columns: to rename, drop or reorder one, drop
-- the view (and the views built on it) first, in a numbered migration.
--
-- Dashboards show *each session's latest replay*: the most recently started run in
-- stream_runs of each session_key that has stored samples. Tests, benchmarks and
-- demos replay the same race many times, so counting every run of a session would
-- double the anomalies, draw two replays of a car as one line and average predictions
-- of different model versions. Everything below starts from dash_latest_runs.
--
-- Every view has session_key (and driver where its rows are per car): the columns
-- the dashboards' native filters target. Each reaches a run's rows through primary keys
-- that start with run_id, so its cost follows the latest replay's size, never the
-- number of replays (timings in superset/README.md).

-- The models' predictions, one row per scored sample, as the table of that name had
-- them (0005 moved them into the samples' rows): what the dashboards' views below, the
-- live scores (pipeline.ml.live_scores) and ad-hoc SQL read. in_domain is NULL on a
-- sample stored while no models were served.
CREATE OR REPLACE VIEW telemetry_predictions AS
SELECT run_id, session_key, driver_number, seq, event_time,
       pit_stop_p, pit_stop_version, tire_failure_p, tire_failure_version,
       crash_risk_p, crash_risk_version, committed_at, driver, in_domain,
       predicted_lap AS lap_number, pit_stop_alert, tire_failure_alert, crash_risk_alert,
       pit_stop_challenger_p, pit_stop_challenger_version,
       tire_failure_challenger_p, tire_failure_challenger_version,
       crash_risk_challenger_p, crash_risk_challenger_version
FROM telemetry_samples
WHERE in_domain IS NOT NULL;

CREATE OR REPLACE VIEW dash_latest_runs AS
SELECT DISTINCT ON (r.session_key)
       r.run_id, r.session_key, r.started_at, r.finished_at, r.speed, r.samples_delivered
FROM stream_runs AS r
-- A probe per run, not EXISTS: with one run stored (the demo's), the planner turned
-- EXISTS into a hash of the samples' every run_id, and each view below that filters
-- on a session paid a scan of the whole table (dash_latest_samples 116 ms, 0.4 so).
WHERE (SELECT true FROM telemetry_samples AS s WHERE s.run_id = r.run_id LIMIT 1)
ORDER BY r.session_key, r.started_at DESC, r.run_id;

-- Each car's latest sample in each latest run. The cars come from a skip scan over the
-- primary key (run_id, driver_number, seq): ~20 index probes, where DISTINCT would read
-- the run's 800k rows. Then one backward index step per car.
CREATE OR REPLACE VIEW dash_latest_samples AS
SELECT lr.session_key, lr.run_id, s.driver, car.driver_number, s.seq, s.event_time,
       s.session_time_s, s.lap_number, s.position, s.speed, s.gear, s.rpm, s.throttle,
       s.brake, s.drs_open, s.compound, s.tyre_life
FROM dash_latest_runs AS lr
CROSS JOIN LATERAL (
    WITH RECURSIVE cars (driver_number) AS (
        SELECT min(s.driver_number) FROM telemetry_samples AS s WHERE s.run_id = lr.run_id
        UNION ALL
        SELECT (SELECT min(s.driver_number) FROM telemetry_samples AS s
                WHERE s.run_id = lr.run_id AND s.driver_number > cars.driver_number)
        FROM cars WHERE cars.driver_number IS NOT NULL
    )
    SELECT driver_number FROM cars WHERE driver_number IS NOT NULL
) AS car
CROSS JOIN LATERAL (
    SELECT * FROM telemetry_samples AS s
    WHERE s.run_id = lr.run_id AND s.driver_number = car.driver_number
    ORDER BY s.seq DESC LIMIT 1
) AS s;

-- The table of cars: latest sample plus latest predictions (NULL: no champion served,
-- or the sample is outside the models' domain).
CREATE OR REPLACE VIEW dash_car_latest AS
SELECT c.*, p.pit_stop_p, p.tire_failure_p, p.crash_risk_p,
       greatest(p.pit_stop_p, p.tire_failure_p, p.crash_risk_p) AS max_risk_p,
       p.event_time AS predicted_at,
       p.pit_stop_alert, p.tire_failure_alert, p.crash_risk_alert  -- at each version's threshold
FROM dash_latest_samples AS c
LEFT JOIN LATERAL (
    SELECT * FROM telemetry_predictions AS p
    WHERE p.run_id = c.run_id AND p.driver_number = c.driver_number
    ORDER BY p.seq DESC LIMIT 1
) AS p ON true;

-- The last 2 minutes of event time of each latest run, for traces. event_time is the
-- real race date, so a dashboard's relative time range cannot say "recent": this does.
-- seq grows with event_time per car, so the slice is a primary-key range starting at
-- the car's last sample before the cut (found by a short backward scan).
CREATE OR REPLACE VIEW dash_recent_samples AS
SELECT c.session_key, c.run_id, c.driver, c.driver_number, s.seq, s.event_time,
       s.lap_number, s.speed, s.throttle, s.brake, s.rpm, s.gear, s.drs_open
FROM (
    SELECT run_id, session_key, driver, driver_number,
           max(event_time) OVER (PARTITION BY run_id) - interval '2 minutes' AS since
    FROM dash_latest_samples
) AS c
CROSS JOIN LATERAL (
    SELECT * FROM telemetry_samples AS s
    WHERE s.run_id = c.run_id AND s.driver_number = c.driver_number
      AND s.event_time >= c.since
      AND s.seq > coalesce((
          SELECT b.seq FROM telemetry_samples AS b
          WHERE b.run_id = c.run_id AND b.driver_number = c.driver_number
            AND b.event_time < c.since
          ORDER BY b.seq DESC LIMIT 1), -1)
) AS s;

CREATE OR REPLACE VIEW dash_windows AS
SELECT w.session_key, w.run_id, w.driver, w.driver_number, w.window_start, w.window_end,
       w.samples, w.speed_min, w.speed_avg, w.speed_max, w.rpm_min, w.rpm_avg, w.rpm_max,
       w.throttle_full_share, w.brake_share, w.gear_changes, w.drs_open_share
FROM dash_latest_runs AS lr
JOIN telemetry_windows AS w ON w.run_id = lr.run_id;

-- driver from the run's car list: rows written before telemetry_predictions.driver
-- existed have it NULL.
CREATE OR REPLACE VIEW dash_predictions AS
SELECT p.session_key, p.run_id, c.driver, p.driver_number, p.seq, p.event_time,
       p.pit_stop_p, p.tire_failure_p, p.crash_risk_p,
       greatest(p.pit_stop_p, p.tire_failure_p, p.crash_risk_p) AS max_risk_p,
       p.pit_stop_version, p.tire_failure_version, p.crash_risk_version,
       p.pit_stop_alert, p.tire_failure_alert, p.crash_risk_alert, p.in_domain
FROM dash_latest_samples AS c
JOIN telemetry_predictions AS p
  ON p.run_id = c.run_id AND p.driver_number = c.driver_number;

-- Which model version scored how much of each latest run. NULL version: the model had
-- no champion, so its probabilities are NULL for those samples.
CREATE OR REPLACE VIEW dash_model_versions AS
WITH served AS (  -- group by the three versions first: few groups, then unpivot them
    SELECT p.session_key, p.run_id, p.pit_stop_version, p.tire_failure_version,
           p.crash_risk_version, count(*) AS predictions,
           min(p.event_time) AS first_event_time, max(p.event_time) AS last_event_time
    FROM dash_latest_runs AS lr
    JOIN telemetry_predictions AS p ON p.run_id = lr.run_id
    GROUP BY 1, 2, 3, 4, 5
)
SELECT s.session_key, s.run_id, m.model, m.version,
       coalesce('v' || m.version, 'no champion served') AS serving,
       sum(s.predictions)::bigint AS predictions,
       min(s.first_event_time) AS first_event_time, max(s.last_event_time) AS last_event_time
FROM served AS s
CROSS JOIN LATERAL (VALUES ('pit_stop', s.pit_stop_version),
                           ('tire_failure', s.tire_failure_version),
                           ('crash_risk', s.crash_risk_version)) AS m (model, version)
GROUP BY 1, 2, 3, 4;

-- Live scores (pipeline.ml.live_scores) of each latest run: per model, role (champion
-- as served, challenger in shadow) and version, the laps whose outcome is known so far.
-- No rows until the run is scored; pr_auc NULL: no positive (or no negative) lap yet.
CREATE OR REPLACE VIEW dash_live_scores AS
SELECT s.session_key, s.run_id, s.label, s.role, s.version,
       format('%s v%s (%s)', s.label, s.version, s.role) AS model,
       s.horizon_laps, s.laps, s.positives, s.base_rate, s.pr_auc, s.brier,
       s.alerts, s.alert_hits, s.alert_precision, s.outcomes_from, s.scored_at
FROM dash_latest_runs AS lr
JOIN live_model_scores AS s ON s.run_id = lr.run_id;

CREATE OR REPLACE VIEW dash_anomalies AS
SELECT a.session_key, a.run_id, a.driver, a.driver_number, a.seq, a.event_time,
       a.reason, a.value
FROM dash_latest_runs AS lr
JOIN anomaly_events AS a ON a.run_id = lr.run_id;

-- Consumer batches since each session's latest replay started (stream_metrics has no
-- run_id). A batch without samples (only dead letters or end markers) has no
-- session_key: it counts for each session its consumer group read in that time.
CREATE OR REPLACE VIEW dash_pipeline AS
WITH batches AS (
    SELECT lr.session_key AS replayed, lr.run_id, m.*
    FROM dash_latest_runs AS lr
    JOIN stream_metrics AS m ON m.recorded_at >= lr.started_at
),
groups AS (
    SELECT DISTINCT replayed, group_id FROM batches WHERE session_key = replayed
)
SELECT b.replayed AS session_key, b.run_id, b.id, b.recorded_at, b.group_id, b.consumer,
       b.messages, b.samples, b.duplicates, b.late, b.anomalies, b.windows,
       b.dead_letters, b.lag, b.latency_p50_ms, b.latency_p95_ms, b.latency_p99_ms,
       b.batch_seconds, b.messages_per_s
FROM batches AS b
WHERE b.session_key = b.replayed
   OR (b.session_key IS NULL AND (b.replayed, b.group_id) IN (TABLE groups));

-- The points of the latest *complete* scaling experiment (pipeline.bench.scaling:
-- `f1 bench scaling`, DAG f1_scaling), for the Pipeline health dashboard. Complete:
-- at least 3 consumer counts for both weak and strong scaling, so a smoke run with
-- fewer points never replaces the real one. Latest: by when its points were stored.
-- The one view without session_key: an experiment replays its own streams on scratch
-- topics, no session's latest replay, so the dashboard's Session and Consumer filters
-- leave its charts out (their scope's `excluded`). busiest_partition_pct is the share
-- as a percent; series (`weak (host, N cores)`) names a chart's line.
CREATE OR REPLACE VIEW dash_scaling_latest AS
WITH latest AS (
    SELECT experiment_id
    FROM bench_scaling
    GROUP BY experiment_id
    HAVING count(DISTINCT consumers) FILTER (WHERE experiment = 'weak') >= 3
       AND count(DISTINCT consumers) FILTER (WHERE experiment = 'strong') >= 3
    ORDER BY max(measured_at) DESC, experiment_id DESC
    LIMIT 1
)
SELECT b.experiment_id, b.measured_at, b.host, b.cores, b.experiment, b.streams,
       b.consumers, b.offered_msgs_per_s, b.throughput_msgs_per_s, b.latency_p50_ms,
       b.latency_p99_ms, b.max_lag, b.cpu_per_consumer_pct, b.busiest_partition_share,
       100 * b.busiest_partition_share AS busiest_partition_pct, b.partitions,
       format('%s (%s, %s cores)', b.experiment, b.host, b.cores) AS series
FROM latest AS l
JOIN bench_scaling AS b ON b.experiment_id = l.experiment_id;

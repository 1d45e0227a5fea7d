-- The models' predictions move into the row of the sample they score. They were a
-- second table of one row per sample (the same key, the same transaction): a second
-- heap row, key and index entry for PostgreSQL per message, which made the whole path
-- with the models a quarter slower than without (f1 bench all --only consumer).
-- `telemetry_predictions` stays, as a view of the scored samples (views.sql), with
-- the columns it had, so the dashboards, the live scores and ad-hoc SQL read it as
-- before.
--
-- in_domain: NULL when no models were served as the sample was stored (not scored),
-- else whether it was inside the models' domain. predicted_lap: the lap the features
-- are of (a sample straggling from an earlier lap takes the current lap's).
ALTER TABLE telemetry_samples
    ADD COLUMN IF NOT EXISTS in_domain boolean,
    ADD COLUMN IF NOT EXISTS predicted_lap smallint,
    ADD COLUMN IF NOT EXISTS pit_stop_p real,
    ADD COLUMN IF NOT EXISTS pit_stop_version integer,
    ADD COLUMN IF NOT EXISTS pit_stop_alert boolean,
    ADD COLUMN IF NOT EXISTS pit_stop_challenger_p real,
    ADD COLUMN IF NOT EXISTS pit_stop_challenger_version integer,
    ADD COLUMN IF NOT EXISTS tire_failure_p real,
    ADD COLUMN IF NOT EXISTS tire_failure_version integer,
    ADD COLUMN IF NOT EXISTS tire_failure_alert boolean,
    ADD COLUMN IF NOT EXISTS tire_failure_challenger_p real,
    ADD COLUMN IF NOT EXISTS tire_failure_challenger_version integer,
    ADD COLUMN IF NOT EXISTS crash_risk_p real,
    ADD COLUMN IF NOT EXISTS crash_risk_version integer,
    ADD COLUMN IF NOT EXISTS crash_risk_alert boolean,
    ADD COLUMN IF NOT EXISTS crash_risk_challenger_p real,
    ADD COLUMN IF NOT EXISTS crash_risk_challenger_version integer;

-- What is stored moves over: every prediction row was committed with its sample's.
-- Rows from before the domain existed (in_domain NULL) were scored whole. This runs
-- once, in the first process to start after the upgrade, and rewrites each scored
-- sample's row while the table is locked: dashboards and other starting processes
-- wait for it. A consumer of the old code still running then fails its next batch
-- (no table to COPY into), committing nothing; restarted on this code (make up, or
-- Airflow's retry of its task) it reads that batch again.
UPDATE telemetry_samples AS s
SET in_domain = coalesce(p.in_domain, true),
    predicted_lap = coalesce(p.lap_number, s.lap_number),
    pit_stop_p = p.pit_stop_p, pit_stop_version = p.pit_stop_version,
    pit_stop_alert = p.pit_stop_alert,
    pit_stop_challenger_p = p.pit_stop_challenger_p,
    pit_stop_challenger_version = p.pit_stop_challenger_version,
    tire_failure_p = p.tire_failure_p, tire_failure_version = p.tire_failure_version,
    tire_failure_alert = p.tire_failure_alert,
    tire_failure_challenger_p = p.tire_failure_challenger_p,
    tire_failure_challenger_version = p.tire_failure_challenger_version,
    crash_risk_p = p.crash_risk_p, crash_risk_version = p.crash_risk_version,
    crash_risk_alert = p.crash_risk_alert,
    crash_risk_challenger_p = p.crash_risk_challenger_p,
    crash_risk_challenger_version = p.crash_risk_challenger_version
FROM telemetry_predictions AS p
WHERE p.run_id = s.run_id AND p.driver_number = s.driver_number AND p.seq = s.seq;

-- The dashboards' views on the table go with it; views.sql, applied after this file,
-- makes them again on the view of the same name.
DROP TABLE telemetry_predictions CASCADE;

-- telemetry_samples (session_key, event_time) served no query: every view, the live
-- scores and the run deletes reach a run's rows through primary keys that start with
-- run_id (views.sql). It cost each stored sample a second index insert on the
-- consumer's hot path: dropping it took the whole path with the models from 59,000
-- to 75,000 messages a second in one consumer (f1 bench all --only consumer, 2 cores).
-- A query by session and time range goes through stream_runs (session -> run_ids).
DROP INDEX IF EXISTS telemetry_samples_session_time;

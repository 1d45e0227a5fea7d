-- The scaling experiment's points (pipeline.bench.scaling): one row per point,
-- one experiment_id per `f1 bench scaling` / f1_scaling run.
CREATE TABLE IF NOT EXISTS bench_scaling (
    experiment_id text NOT NULL,
    measured_at timestamptz NOT NULL DEFAULT now(),
    host text NOT NULL,
    cores integer NOT NULL,                  -- usable by this process (sched_getaffinity)
    experiment text NOT NULL CHECK (experiment IN ('weak', 'strong')),
    streams integer NOT NULL,                -- replays side by side
    consumers integer NOT NULL,              -- consumer processes in the group
    partitions integer NOT NULL,
    speed double precision NOT NULL,         -- each replay's pace (x real time)
    offered_msgs_per_s double precision NOT NULL,
    messages bigint NOT NULL,
    throughput_msgs_per_s double precision NOT NULL,
    latency_p50_ms double precision NOT NULL,  -- produce to commit
    latency_p95_ms double precision NOT NULL,
    latency_p99_ms double precision NOT NULL,
    max_lag bigint NOT NULL,
    cpu_per_consumer_pct double precision NOT NULL,  -- % of one core
    cpu_total_pct double precision NOT NULL,
    seconds double precision NOT NULL,
    busiest_partition_share double precision NOT NULL,
    per_partition jsonb NOT NULL,            -- messages per partition
    PRIMARY KEY (experiment_id, experiment, consumers)
);

"""The scaling experiment (`f1 bench scaling`, DAG `f1_scaling`).

Each point runs `streams` replays of the demo race side by side (paced at
`speed`, each its own run, from the race start so every car is on track) into
a topic of its own, and `consumers` consumer processes (`f1 consume`) in a group
of their own reading it, then measures:

- throughput: messages committed per second, from the first produce to the
  last commit (it equals the offered load while the consumers keep up);
- produce-to-commit latency p50/p95/p99 over every message;
- lag: messages on the topic not yet committed, sampled every second (max);
- CPU: each consumer's CPU seconds over its busy time, as % of one core;
- the spread: messages per partition (the producer deals cars round-robin).

Weak scaling: k streams over k consumers (each consumer's share stays the
same). Strong scaling: a fixed load (STRONG_STREAMS streams) over k consumers.
Results go to the `bench_scaling` table (the Pipeline health dashboard reads
the latest experiment), to an MLflow run (params, metrics, the plot), and to a
PNG plot.

On a machine with C cores, consumers past C share the cores: throughput stops
rising there, and latency rises once the offered load passes what C cores can
carry. The producers and the broker run on the same cores too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench.stream_bench import ConsumerProcess, percentiles, wait_for_claims
from pipeline.kafka.producer import ProduceReport, produce_session
from pipeline.kafka.topics import scratch_topics
from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.sinks import telemetry_db

COUNTS = (1, 2, 4)
STRONG_STREAMS = 4
RACE_START_S = 3600.0  # into the export: the race start, all cars on track
DRAIN_LIMIT_S = 300.0  # the most a point waits for its consumers to catch up


@dataclass(frozen=True)
class Point:
    experiment: str  # "weak" or "strong"
    streams: int
    consumers: int


def points(counts: Sequence[int] = COUNTS) -> list[Point]:
    weak = [Point("weak", k, k) for k in counts]
    strong = [Point("strong", max(counts), k) for k in counts]
    return weak + strong


@dataclass
class PointResult:
    experiment: str
    streams: int
    consumers: int
    partitions: int
    speed: float
    offered_msgs_per_s: float
    messages: int
    throughput_msgs_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    max_lag: int
    cpu_per_consumer_pct: float  # mean over the consumers, % of one core
    cpu_total_pct: float
    seconds: float
    busiest_partition_share: float
    per_partition: dict[int, int] = field(default_factory=dict)


def run_point(
    settings: Settings, export_folder: Path, point: Point, *, speed: float, seconds: float
) -> PointResult:
    """One point on topics and a group of its own (removed afterwards)."""
    with scratch_topics(settings, "scaling") as scratch, ExitStack() as processes:
        consumers = [
            processes.enter_context(
                ConsumerProcess(scratch, f"scaling-c{i}", claim=False, report=True)
            )
            for i in range(point.consumers)
        ]
        lag = _LagWatch(scratch)
        try:
            wait_for_claims(scratch, consumers)
            lag.start()
            produced = _produce_streams(scratch, export_folder, point.streams, speed, seconds)
            runs = [p.run_id for p in produced]
            _wait_for(
                lambda: _runs_complete(scratch, runs),
                DRAIN_LIMIT_S,
                "the consumers to commit every run",
            )
            began, last_commit = _first_produce_last_commit(scratch, runs)
        finally:
            lag.stop()
            for process in consumers:
                process.stop()  # a clean stop: the report is written
        consumed = [process.report() for process in consumers]
    return _result(point, scratch, produced, consumed, lag.max, last_commit - began, speed)


def _result(
    point: Point,
    settings: Settings,
    produced: list[ProduceReport],
    consumed: list[dict[str, Any]],
    max_lag: int,
    wall_s: float,
    speed: float,
) -> PointResult:
    messages = sum(p.delivered for p in produced)
    latencies = [ms for c in consumed for ms in c["latencies_ms"]]
    per_partition: Counter[int] = Counter()
    for p in produced:
        per_partition.update(p.per_partition)
    cpu = [c["cpu_seconds"] / c["busy_seconds"] for c in consumed if c["busy_seconds"]]
    figures = percentiles(latencies)
    return PointResult(
        experiment=point.experiment,
        streams=point.streams,
        consumers=point.consumers,
        partitions=settings.telemetry_partitions,
        speed=speed,
        offered_msgs_per_s=sum(p.intended_rate_hz or 0.0 for p in produced),
        messages=messages,
        throughput_msgs_per_s=messages / wall_s if wall_s > 0 else 0.0,
        latency_p50_ms=figures["p50_ms"],
        latency_p95_ms=figures["p95_ms"],
        latency_p99_ms=figures["p99_ms"],
        max_lag=max_lag,
        cpu_per_consumer_pct=100 * sum(cpu) / len(cpu) if cpu else 0.0,
        cpu_total_pct=100 * sum(cpu),
        seconds=wall_s,
        busiest_partition_share=max(per_partition.values()) / messages if messages else 0.0,
        per_partition=dict(sorted(per_partition.items())),
    )


def _produce_streams(
    settings: Settings, export_folder: Path, streams: int, speed: float, seconds: float
) -> list[ProduceReport]:
    """`streams` replays at once (threads: pacing waits, and the produce calls are
    C), `seconds` of wall time each."""
    reports: list[ProduceReport | None] = [None] * streams
    errors: list[BaseException] = []

    def replay(i: int) -> None:
        try:
            reports[i] = produce_session(
                export_folder,
                speed=speed,
                run_id=f"scaling-{uuid.uuid4().hex[:8]}-{i}",
                start_offset_s=RACE_START_S,
                duration_s=seconds * speed,
                settings=settings,
            )
        except BaseException as err:  # re-raised below, on the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=replay, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for r in reports if r is not None]


class _LagWatch(threading.Thread):
    """Messages on the topic the group has not committed (offsets live in
    PostgreSQL), every second."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.max = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from pipeline.kafka.client import base_config

        group = f"{self.settings.consumer_group}-lag"  # never joins: reads watermarks only
        reader = Consumer({**base_config(self.settings), "group.id": group})
        topic = self.settings.telemetry_topic
        try:
            with telemetry_db.connect(self.settings, autocommit=True) as conn:
                while not self._stop_event.wait(1.0):
                    ends = sum(
                        reader.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                        for p in range(self.settings.telemetry_partitions)
                    )
                    row = conn.execute(
                        "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
                        "WHERE group_id = %s AND topic = %s",
                        (self.settings.consumer_group, topic),
                    ).fetchone()
                    self.max = max(self.max, ends - int(row[0] if row else 0))
        finally:
            reader.close()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(10)


def _runs_complete(settings: Settings, runs: list[str]) -> bool:
    with telemetry_db.connect(settings, autocommit=True) as conn:
        ended = [telemetry_db.partitions_ended(conn, run) for run in runs]
    return all(n >= settings.telemetry_partitions for n in ended)


def _first_produce_last_commit(settings: Settings, runs: list[str]) -> tuple[float, float]:
    """The span throughput is measured over: from the first sample's produce (its
    header, stored with it; loading the export beforehand is left out) to the
    group's last commit."""
    with telemetry_db.connect(settings, autocommit=True) as conn:
        first = conn.execute(
            "SELECT extract(epoch FROM min(produced_at)) FROM telemetry_samples "
            "WHERE run_id = ANY(%s)",
            (runs,),
        ).fetchone()
        last = conn.execute(
            "SELECT extract(epoch FROM max(recorded_at)) FROM stream_metrics WHERE group_id = %s",
            (settings.consumer_group,),
        ).fetchone()
    assert first is not None and last is not None and None not in (first[0], last[0])
    return float(first[0]), float(last[0])


def _wait_for(condition: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {limit_s:g} s waiting for {what}")
        time.sleep(0.5)


@dataclass
class Experiment:
    experiment_id: str
    host: str
    cores: int
    results: list[PointResult]


def run(
    settings: Settings,
    export_folder: Path,
    *,
    counts: Sequence[int] = COUNTS,
    speed: float = 20.0,
    seconds: float = 60.0,
    on_point: Callable[[PointResult], None] = lambda result: None,
) -> Experiment:
    """Every point of the experiment, one after the other."""
    experiment = Experiment(
        experiment_id=f"scaling-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}",
        host=socket.gethostname(),
        cores=len(os.sched_getaffinity(0)),
        results=[],
    )
    done: dict[tuple[int, int], PointResult] = {}
    for point in points(counts):
        # Weak at the largest k and strong at the largest k are the same load.
        same = done.get((point.streams, point.consumers))
        result = same or run_point(settings, export_folder, point, speed=speed, seconds=seconds)
        if same:
            result = PointResult(**{**asdict(same), "experiment": point.experiment})
        done[(point.streams, point.consumers)] = result
        experiment.results.append(result)
        on_point(result)
    return experiment


def store(settings: Settings, experiment: Experiment) -> None:
    """The experiment's points into `bench_scaling` (one row each)."""
    columns = [
        "experiment_id",
        "host",
        "cores",
        "experiment",
        "streams",
        "consumers",
        "partitions",
        "speed",
        "offered_msgs_per_s",
        "messages",
        "throughput_msgs_per_s",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "max_lag",
        "cpu_per_consumer_pct",
        "cpu_total_pct",
        "seconds",
        "busiest_partition_share",
        "per_partition",
    ]
    rows = []
    for r in experiment.results:
        values = {**asdict(r), "per_partition": json.dumps(r.per_partition)}
        values.update(
            experiment_id=experiment.experiment_id, host=experiment.host, cores=experiment.cores
        )
        rows.append([values[c] for c in columns])
    from psycopg import sql

    insert = sql.SQL("INSERT INTO bench_scaling ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
    telemetry_db.ensure_schema(settings)
    with telemetry_db.connect(settings) as conn:
        conn.cursor().executemany(insert, rows)


def plot(experiment: Experiment, path: Path) -> Path:
    """Throughput, p99 latency and CPU against consumers, weak and strong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [
        ("throughput_msgs_per_s", "committed messages / s"),
        ("latency_p99_ms", "produce-to-commit p99 (ms)"),
        ("cpu_total_pct", "consumers' CPU (% of one core)"),
    ]
    for axis, (metric, label) in zip(axes, panels, strict=True):
        for kind, marker in (("weak", "o"), ("strong", "s")):
            rows = [r for r in experiment.results if r.experiment == kind]
            axis.plot(
                [r.consumers for r in rows],
                [getattr(r, metric) for r in rows],
                marker=marker,
                label=f"{kind} scaling",
            )
        if metric == "throughput_msgs_per_s":
            weak = [r for r in experiment.results if r.experiment == "weak"]
            axis.plot(
                [r.consumers for r in weak],
                [r.offered_msgs_per_s for r in weak],
                linestyle=":",
                color="grey",
                label="weak: offered load",
            )
        axis.axvline(experiment.cores, color="red", linewidth=0.8, linestyle="--")
        axis.set_xlabel("consumer processes")
        axis.set_ylabel(label)
        axis.set_xticks(sorted({r.consumers for r in experiment.results}))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    first = experiment.results[0]
    fig.suptitle(
        f"Scaling on {experiment.host}: {experiment.cores} cores (red line), "
        f"{first.partitions} partitions, streams at {first.speed:g}x"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_mlflow(settings: Settings, experiment: Experiment, plot_path: Path, name: str) -> str:
    """One MLflow run per experiment: params, each point's figures, the plot."""
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(name)
    first = experiment.results[0]
    with mlflow.start_run(run_name=experiment.experiment_id) as run:
        mlflow.log_params(
            {
                "host": experiment.host,
                "cores": experiment.cores,
                "partitions": first.partitions,
                "speed": first.speed,
                "points": len(experiment.results),
            }
        )
        for r in experiment.results:
            prefix = f"{r.experiment}_k{r.consumers}"
            mlflow.log_metrics(
                {
                    f"{prefix}_throughput": r.throughput_msgs_per_s,
                    f"{prefix}_p99_ms": r.latency_p99_ms,
                    f"{prefix}_max_lag": r.max_lag,
                    f"{prefix}_cpu_total_pct": r.cpu_total_pct,
                    f"{prefix}_busiest_partition_share": r.busiest_partition_share,
                }
            )
        mlflow.log_artifact(str(plot_path))
        mlflow.log_dict({"points": [asdict(r) for r in experiment.results]}, "points.json")
        return str(run.info.run_id)


PLOT = PROJECT_ROOT / "docs" / "img" / "scaling.png"
MLFLOW_EXPERIMENT = "f1-scaling"


def run_and_record(
    settings: Settings,
    export_folder: Path,
    *,
    counts: Sequence[int] = COUNTS,
    speed: float = 20.0,
    seconds: float = 60.0,
    plot_path: Path = PLOT,
    mlflow_experiment: str = MLFLOW_EXPERIMENT,
    on_point: Callable[[PointResult], None] = lambda result: None,
) -> tuple[Experiment, str]:
    """The experiment, stored, plotted and logged (what the CLI and the DAG run).
    Returns it with its MLflow run id."""
    experiment = run(
        settings, export_folder, counts=counts, speed=speed, seconds=seconds, on_point=on_point
    )
    store(settings, experiment)
    plot(experiment, plot_path)
    return experiment, log_to_mlflow(settings, experiment, plot_path, mlflow_experiment)


def table(experiment: Experiment) -> str:
    """The points as a Markdown table."""
    lines = [
        "| scaling | streams | consumers | offered msg/s | committed msg/s | p50 ms | p99 ms "
        "| max lag | CPU per consumer | busiest partition |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in experiment.results:
        lines.append(
            f"| {r.experiment} | {r.streams} | {r.consumers} | {r.offered_msgs_per_s:,.0f} "
            f"| {r.throughput_msgs_per_s:,.0f} | {r.latency_p50_ms:,.0f} "
            f"| {r.latency_p99_ms:,.0f} | {r.max_lag:,} | {r.cpu_per_consumer_pct:.0f} % "
            f"| {100 * r.busiest_partition_share:.0f} % |"
        )
    return "\n".join(lines)

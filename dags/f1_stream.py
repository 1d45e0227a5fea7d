"""
### f1_stream

Replays an exported session into Kafka and analyses it as it arrives: one
producer task and N consumer tasks (one consumer group) run side by side, then
`verify` checks that every delivered sample is stored exactly once. Beside them,
`score_live` scores the served predictions as their laps end (every 60 s while
the producer runs); `score_final` scores the complete run after `verify`.

- **Session**: an export under `EXPORT_DIR` (run `f1_export` first).
- **Speed**: 1 is real time (about 80 samples/s for 20 cars); 0 is as fast as possible.
- **Duration**: session seconds to replay; empty for the whole session.

Consumers stop when the run is complete (every partition's end marker is
committed) or after the idle timeout, so the DAG also completes under
`airflow dags test`, which runs tasks one after another; `verify` then drains
whatever the consumers left. A retried producer reuses the run's name, and the
consumers skip the samples they already hold. Stopping a task (mark it failed)
sends SIGTERM: it finishes its batch, commits and leaves.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

# The longest replay: a two-hour race at 1x, with margin.
LONG_RUNNING = pendulum.duration(hours=4)


@dag(
    dag_id="f1_stream",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["f1", "stream"],
    params={
        "session": Param(
            "2023_Monaco_R", type="string", title="Session",
            description="Export to replay, e.g. 2023_Monaco_R (see f1_export).",
        ),
        "speed": Param(
            1.0, type="number", minimum=0, title="Speed",
            description="Session seconds per wall second: 1 real time, 10, 100; 0 unpaced.",
        ),
        "duration_s": Param(
            None, type=["null", "number"], exclusiveMinimum=0, title="Duration (s)",
            description="Session time to replay from the start offset; empty for all of it.",
        ),
        "start_offset_s": Param(
            0, type="number", minimum=0, title="Start offset (s)",
            description="Skip this much session time first.",
        ),
        "consumers": Param(
            2, type="integer", minimum=1, maximum=8, title="Consumers",
            description="Consumer processes in the group (at most the topic's partitions help).",
        ),
        "idle_timeout_s": Param(
            120, type="number", minimum=1, title="Consumer idle timeout (s)",
            description="A consumer stops after this long without a message.",
        ),
    },
)  # fmt: skip
def f1_stream() -> None:
    @task
    def start_run(params: dict | None = None, run_id: str | None = None) -> dict:  # type: ignore[type-arg]
        """Name the stream run after this DAG run, so a retried producer reuses it."""
        from pipeline.kafka.client import check_reachable
        from pipeline.settings import get_settings
        from pipeline.sinks.telemetry_db import ensure_schema
        from pipeline.sources.export import read_manifest

        params = params or {}
        session = params["session"]
        if read_manifest(session) is None:
            raise ValueError(f"no export named {session!r}: run f1_export for it first.")
        check_reachable(get_settings())
        ensure_schema()
        members = [f"{run_id}-consumer-{i + 1}" for i in range(int(params["consumers"]))]
        return {"stream_run": f"{session}@{run_id}", "members": members}

    @task(execution_timeout=LONG_RUNNING, retries=1, retry_delay=pendulum.duration(seconds=10))
    def produce(run: dict, params: dict | None = None) -> dict:  # type: ignore[type-arg]
        from pipeline.kafka.client import stop_on_signals
        from pipeline.kafka.producer import produce_session
        from pipeline.settings import get_settings

        params = params or {}
        with stop_on_signals() as stop:
            report = produce_session(
                get_settings().export_dir / params["session"],
                speed=float(params["speed"]) or None,
                run_id=run["stream_run"],
                start_offset_s=float(params["start_offset_s"]),
                duration_s=params.get("duration_s"),
                stop=stop,
            )
        if report.failed:
            raise RuntimeError(f"{report.failed} deliveries failed: {dict(report.errors)}")
        return {
            "delivered": report.delivered,
            "seconds": round(report.seconds, 1),
            "achieved_rate_hz": round(report.achieved_rate_hz, 1),
            "stopped_early": report.stopped_early,
        }

    @task
    def members(run: dict) -> list[str]:  # type: ignore[type-arg]
        return list(run["members"])

    @task(
        execution_timeout=LONG_RUNNING, retries=2, retry_delay=pendulum.duration(seconds=5),
        map_index_template="{{ task.op_kwargs['member'].rsplit('-', 1)[-1] }}",
    )  # fmt: skip
    def consume(member: str, run: dict, params: dict | None = None) -> dict:  # type: ignore[type-arg]
        from pipeline.kafka.client import stop_on_signals
        from pipeline.kafka.consumer import StreamConsumer

        params = params or {}
        with stop_on_signals() as stop:
            report = StreamConsumer(member, stop=stop).run(
                until_run=run["stream_run"], idle_timeout_s=float(params["idle_timeout_s"])
            )
        return report.summary()

    @task(execution_timeout=LONG_RUNNING)
    def verify(run: dict, produced: dict, consumed: list) -> dict:  # type: ignore[type-arg]
        """Drain what is left, then check: every delivered sample stored once."""
        from pipeline.kafka.consumer import verify_run

        return verify_run(run["stream_run"], delivered=int(produced["delivered"]))

    @task(execution_timeout=LONG_RUNNING, retries=1)
    def score_live(run: dict) -> int:  # type: ignore[type-arg]
        """Score every served prediction once its lap is over, while the run streams."""
        from pipeline.kafka.client import stop_on_signals
        from pipeline.ml.live_scores import score_while_running

        with stop_on_signals() as stop:
            return len(score_while_running(run["stream_run"], stop=stop))

    @task
    def score_final(run: dict) -> dict:  # type: ignore[type-arg]
        """The complete run's live scores: champion and challenger, per version."""
        from pipeline.ml.live_scores import score_run

        rows = score_run(run["stream_run"])
        return {f"{r['label']} {r['role']} v{r['version']}": r["pr_auc"] for r in rows}

    run = start_run()
    produced = produce(run)
    consumed = consume.partial(run=run).expand(member=members(run))
    verify(run, produced, consumed) >> score_final(run)
    score_live(run)


f1_stream()

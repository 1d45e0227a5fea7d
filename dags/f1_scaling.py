"""
### f1_scaling

The scaling experiment: weak scaling (k replayed streams over k consumer
processes) and strong scaling (a fixed load over k consumers), k = 1, 2, 4 by
default. Each point runs on a topic and a consumer group of its own, removed
afterwards, so the demo's data is left alone (its CPU is shared, though: the
figures are those of a busy machine).

Per point: committed messages per second, produce-to-commit p50/p95/p99, the
largest lag, the consumers' CPU and the messages per partition. Results go to
the `bench_scaling` table (the Pipeline health dashboard's scaling chart), to an
MLflow run in the `f1-scaling` experiment (with the plot), and to the plot in
`STACK_DIR/bench/scaling.png`. The logic is `pipeline.bench.scaling`, also
`f1 bench scaling`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task


@dag(
    dag_id="f1_scaling",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["f1", "benchmark"],
    params={
        "session": Param("2023_Monaco_R", type="string", title="Export each stream replays"),
        "speed": Param(20.0, type="number", exclusiveMinimum=0, title="Pace of each stream (x)"),
        "seconds": Param(60.0, type="number", exclusiveMinimum=0, title="Wall seconds per point"),
        "counts": Param(
            [1, 2, 4], type="array", items={"type": "integer", "minimum": 1},
            title="Consumer counts",
        ),
    },
)  # fmt: skip
def f1_scaling() -> None:
    @task(execution_timeout=pendulum.duration(hours=2))
    def scaling(params: dict | None = None) -> dict:  # type: ignore[type-arg]
        from pipeline.bench import scaling
        from pipeline.settings import get_settings

        params = params or {}
        settings = get_settings()
        experiment, run_id = scaling.run_and_record(
            settings, settings.export_dir / params.get("session", "2023_Monaco_R"),
            counts=params.get("counts", [1, 2, 4]), speed=float(params.get("speed", 20.0)),
            seconds=float(params.get("seconds", 60.0)),
            plot_path=settings.stack_dir / "bench" / "scaling.png",
        )  # fmt: skip
        print(scaling.table(experiment))
        return {"experiment_id": experiment.experiment_id, "mlflow_run_id": run_id}

    scaling()


f1_scaling()

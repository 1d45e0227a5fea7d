"""The scaling experiment through its DAG (f1_scaling), on a small load: its
points, its rows in bench_scaling, its MLflow run and its plot. Its scratch
topics and group are removed by the experiment itself; its rows and its MLflow
run by the test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.settings import Settings
from pipeline.sinks import telemetry_db
from pipeline.stack import airflow_server


@pytest.fixture
def scaling_run(
    stack: Settings, airflow_api: httpx.Client, race_export: Path
) -> Iterator[dict[str, Any]]:
    conf = json.dumps({"counts": [1, 2], "seconds": 4, "speed": 10})
    result = airflow_server.dags_test(stack, "f1_scaling", "--conf", conf)
    runs = airflow_api.get(
        "/dags/f1_scaling/dagRuns", params={"order_by": "-start_date", "limit": 1}
    ).json()["dag_runs"]
    returned = airflow_api.get(
        f"/dags/f1_scaling/dagRuns/{runs[0]['dag_run_id']}/taskInstances/scaling"
        "/xcomEntries/return_value"
    ).json()["value"] if runs else None  # fmt: skip
    try:
        yield {"result": result, "state": runs[0]["state"] if runs else None, **(returned or {})}
    finally:
        if returned:
            import mlflow

            with telemetry_db.connect(stack) as conn:
                conn.execute(
                    "DELETE FROM bench_scaling WHERE experiment_id = %s",
                    (returned["experiment_id"],),
                )
            mlflow.MlflowClient(stack.mlflow_tracking_uri).delete_run(returned["mlflow_run_id"])


def test_scaling_dag_measures_every_point_and_records_them(
    stack: Settings, scaling_run: dict[str, Any]
) -> None:
    import mlflow

    result = scaling_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert scaling_run["state"] == "success"
    with telemetry_db.connect(stack) as conn:
        rows = conn.execute(
            "SELECT experiment, streams, consumers, partitions, messages, throughput_msgs_per_s,"
            " latency_p50_ms, latency_p99_ms, max_lag, cpu_per_consumer_pct,"
            " busiest_partition_share, per_partition, cores"
            " FROM bench_scaling WHERE experiment_id = %s ORDER BY experiment DESC, consumers",
            (scaling_run["experiment_id"],),
        ).fetchall()
    # Weak k = 1, 2 (k streams, k consumers); strong: 2 streams over 1 and 2 consumers.
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("weak", 1, 1), ("weak", 2, 2), ("strong", 2, 1), ("strong", 2, 2),
    ]  # fmt: skip
    for (_, _, _, partitions, messages, throughput, p50, p99, lag, cpu, share,
         per_partition, cores) in rows:  # fmt: skip
        assert messages > 0 and throughput > 0 and 0 < p50 <= p99 and lag >= 0 and cpu > 0
        assert cores >= 1 and partitions == stack.telemetry_partitions
        # 20 cars dealt over 4 partitions: 5 each, each stream on its own.
        assert sum(per_partition.values()) == messages and share <= 0.30, per_partition
    run = mlflow.MlflowClient(stack.mlflow_tracking_uri).get_run(scaling_run["mlflow_run_id"])
    assert run.data.params["points"] == "4"
    assert run.data.metrics["weak_k2_throughput"] > 0
    artifacts = mlflow.MlflowClient(stack.mlflow_tracking_uri).list_artifacts(run.info.run_id)
    assert {"scaling.png", "points.json"} <= {a.path for a in artifacts}
    assert (stack.stack_dir / "bench" / "scaling.png").stat().st_size > 10_000

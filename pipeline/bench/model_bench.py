"""Inference cost of the served models: one row at a time (p50/p99 per call), a
consumer-sized batch of rows (cost per row), and that batch as the consumer scores
it (its distinct lap rows once: `serving.distinct_runs`), on one thread."""

from __future__ import annotations

import time
from typing import Any

from pipeline.ml.features import FEATURES
from pipeline.ml.labels import LABELS
from pipeline.ml.serving import distinct_runs, load_booster
from pipeline.ml.train import registered_name
from pipeline.settings import Settings


def run(
    settings: Settings, *, batch_rows: int = 5_000, single_calls: int = 2_000
) -> dict[str, Any]:
    import mlflow
    import numpy as np

    from pipeline.ml.features import race_features
    from pipeline.sources.replay import load_samples

    samples = load_samples(settings.export_dir / settings.demo_session)
    features = race_features(samples)  # the demo race's samples, as the stream scores them
    matrix = features.dropna(subset=["lap_number"])[list(FEATURES)].to_numpy(dtype="float32")
    # A consumer's batch: the samples of a stretch of the race in arrival (time)
    # order, grouped by car as `batch.process` leaves them.
    racing = samples.assign(_row=range(len(samples)))[features["lap_number"].notna().to_numpy()]
    stretch = racing.sort_values("date", kind="stable").iloc[len(racing) // 2 :][:batch_rows]
    grouped = stretch.sort_values("driver_number", kind="stable")["_row"].to_numpy()
    consumer_batch = features[list(FEATURES)].to_numpy(dtype="float32")[grouped]
    distinct_rows = len(distinct_runs(consumer_batch)[0])
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    figures: dict[str, Any] = {}
    for label in LABELS:
        name = registered_name(label, settings)
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            continue
        latest = max(versions, key=lambda v: int(v.version))
        booster = load_booster(f"models:/{name}/{latest.version}", settings)
        booster.inplace_predict(matrix[:10])  # warm up
        timings = []
        for i in range(single_calls):
            row = matrix[i : i + 1]
            start = time.perf_counter()
            booster.inplace_predict(row)
            timings.append(time.perf_counter() - start)
        batch = matrix[:batch_rows]
        start = time.perf_counter()
        for _ in range(10):
            booster.inplace_predict(batch)
        per_row = (time.perf_counter() - start) / 10 / len(batch)
        start = time.perf_counter()
        for _ in range(10):
            distinct, runs = distinct_runs(consumer_batch)
            booster.inplace_predict(distinct)[runs]
        per_row_served = (time.perf_counter() - start) / 10 / len(consumer_batch)
        ms = np.array(timings) * 1000
        figures[label] = {
            "version": latest.version,
            "single_row_p50_ms": float(np.percentile(ms, 50)),
            "single_row_p99_ms": float(np.percentile(ms, 99)),
            f"batch_{batch_rows}_us_per_row": per_row * 1e6,
            f"served_{batch_rows}_us_per_row": per_row_served * 1e6,
            "served_distinct_rows": distinct_rows,
        }
    return figures

"""Training against the real MLflow server, and serving the champions in the stream."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.kafka.consumer import StreamConsumer
from pipeline.kafka.producer import produce_session
from pipeline.kafka.topics import scratch_topics
from pipeline.ml.features import FEATURES
from pipeline.ml.labels import LABELS, label_samples, load_side_tables
from pipeline.ml.registry import scratch_models
from pipeline.ml.serving import ChampionScorer
from pipeline.ml.train import (
    CHAMPION,
    ModelResult,
    TrainConfig,
    registered_name,
    registered_versions,
    train_all,
)
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db
from pipeline.sources.export import export_session, read_manifest
from pipeline.sources.replay import load_samples
from pipeline.stack import airflow_server

# Small and quick, but the real pipeline: every 8th sample, 80 trees, 2 folds.
QUICK = TrainConfig(sample_every=8, n_estimators=80, cv_folds=2)


@pytest.fixture(scope="module")
def models(stack: Settings) -> Iterator[Settings]:
    """Models and experiments of this module's own (`test-<8 hex>-pit-stop` etc.):
    training here never registers under, or moves an alias of, the demo's `f1-*`
    models, and everything it made is deleted afterwards, pass or fail."""
    with scratch_models(stack) as settings:
        yield settings


@pytest.fixture(scope="module")
def exports(models: Settings, race_export: Path) -> Settings:
    for year in (2021, 2024):  # the training races
        if read_manifest(f"{year}_Monaco_R") is None:
            export_session(year, "Monaco", "R", formats=("parquet",))
    return models


@pytest.fixture(scope="module")
def trained(exports: Settings) -> dict[str, ModelResult]:
    return {r.label: r for r in train_all(QUICK, settings=exports)}


def test_training_tracks_runs_metrics_artifacts_and_aliases(
    trained: dict[str, ModelResult], models: Settings
) -> None:
    client = mlflow.MlflowClient(models.mlflow_tracking_uri)
    for label in LABELS:
        result = trained[label]
        run = client.get_run(str(result.run_id))
        assert run.data.metrics["val_base_rate"] == pytest.approx(
            result.base_rates["2023_Monaco_R"]
        )
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "model_card.md" in artifacts
        if result.status == "not learnable":
            assert run.data.tags["status"] == "not learnable"
            continue
        for name in ("val_pr_auc", "val_roc_auc", "val_brier", "val_f1", "baseline_val_pr_auc",
                     "cv_pr_auc", "threshold"):  # fmt: skip
            assert name in run.data.metrics, name
        assert {"confusion_matrix.png", "feature_importance.png", "calibration.png"} <= artifacts
        assert (
            run.info.experiment_id
            == client.get_experiment_by_name(registered_name(label, models)).experiment_id
        )
        version = client.get_model_version(registered_name(label, models), str(result.version))
        assert result.alias in version.aliases
        assert sum(result.confusion.values()) == len(
            load_samples(
                models.export_dir / "2023_Monaco_R",
                columns=["session_time_s", "driver_number", "lap_number"],
            )["lap_number"].dropna()
        )
    # 2021 Monaco has no attributable incident notice at all: the rate says so.
    assert trained["crash_risk"].base_rates["2021_Monaco_R"] == 0.0


def test_the_pit_model_rates_the_end_of_an_in_lap_above_mid_stint(
    trained: dict[str, ModelResult], exports: Settings
) -> None:
    from pipeline.ml import dataset

    validation = dataset.build("2023_Monaco_R", settings=exports)
    mlflow.set_tracking_uri(exports.mlflow_tracking_uri)
    booster = mlflow.xgboost.load_model(
        f"models:/{registered_name('pit_stop', exports)}/{trained['pit_stop'].version}"
    )
    p = booster.inplace_predict(validation.features[list(FEATURES)].to_numpy(dtype="float32"))
    before_pit = validation.labels["pit_stop"].to_numpy() == 1
    mid_stint = (validation.features["tyre_life"] > 5) & (validation.features["lap_elapsed_s"] < 30)
    assert p[before_pit].mean() > 2 * p[mid_stint.to_numpy() & ~before_pit].mean()


@pytest.fixture
def stream(exports: Settings) -> Any:
    """Scratch topics on top of the scratch models: the consumer serves those."""
    with scratch_topics(exports, "test-ml", model_refresh_s=0.5) as settings:
        yield settings


def test_moving_the_alias_mid_stream_switches_versions_without_losing_a_message(
    trained: dict[str, ModelResult], stream: Settings, exports: Settings
) -> None:
    client = mlflow.MlflowClient(stream.mlflow_tracking_uri)
    name = registered_name("pit_stop", stream)
    first = str(trained["pit_stop"].version)
    [again] = train_all(QUICK, labels=("pit_stop",), settings=exports)
    second = str(again.version)
    client.set_registered_model_alias(name, CHAMPION, first)
    run = f"alias-{uuid.uuid4().hex[:6]}"
    consumer = StreamConsumer("alias", settings=stream)
    reports: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: reports.update(r=consumer.run(until_run=run, idle_timeout_s=60))
    )
    thread.start()
    moved: dict[str, int] = {}

    def move_once_the_first_version_has_scored() -> None:
        # On a condition, not after a delay: the first version has scored rows of this
        # run (the consumer joined and serves it), and most of the replay is still to come.
        deadline = time.monotonic() + 120
        with telemetry_db.connect(stream, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM telemetry_predictions "
                    "WHERE run_id = %s AND pit_stop_version = %s",
                    (run, int(first)),
                ).fetchone()
                if row and row[0] >= 1_000:
                    client.set_registered_model_alias(name, CHAMPION, second)
                    moved["after_rows"] = int(row[0])
                    return
                time.sleep(0.05)

    mover = threading.Thread(target=move_once_the_first_version_has_scored)
    mover.start()
    produced = produce_session(
        stream.export_dir / "2023_Monaco_R", speed=40.0, run_id=run, start_offset_s=3000,
        duration_s=400, settings=stream,
    )  # fmt: skip
    thread.join()
    mover.join()
    assert moved, f"no row of run {run} scored by v{first} within 120 s"
    with telemetry_db.connect(stream) as conn:
        rows = pd.DataFrame(
            conn.execute(
                "SELECT committed_at, pit_stop_version, pit_stop_p FROM telemetry_predictions "
                "WHERE run_id = %s ORDER BY committed_at",
                (run,),
            ).fetchall(),
            columns=["committed_at", "version", "p"],
        )
    assert len(rows) == produced.delivered == reports["r"].samples
    assert rows["p"].notna().all()
    versions = rows["version"].astype(str).tolist()
    assert set(versions) == {first, second}
    switch = versions.index(second)
    assert set(versions[switch:]) == {second}  # once switched, never back


def test_a_model_with_other_features_is_refused_and_the_last_good_one_kept(
    trained: dict[str, ModelResult], models: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import xgboost

    client = mlflow.MlflowClient(models.mlflow_tracking_uri)
    name = registered_name("pit_stop", models)
    good = str(trained["pit_stop"].version)
    client.set_registered_model_alias(name, CHAMPION, good)
    scorer = ChampionScorer(models, labels=("pit_stop",))
    scorer.refresh(force=True)
    assert scorer.served["pit_stop"].version == good

    x = np.random.default_rng(1).random((200, 3))
    other = xgboost.DMatrix(x, label=x[:, 0] > 0.5, feature_names=["a", "b", "c"])
    odd = xgboost.train({"objective": "binary:logistic"}, other)
    mlflow.set_tracking_uri(models.mlflow_tracking_uri)
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name="wrong features"):
        info = mlflow.xgboost.log_model(odd, name="model", registered_model_name=name)
    client.set_registered_model_alias(name, CHAMPION, str(info.registered_model_version))
    try:
        with caplog.at_level(logging.ERROR):
            scorer.refresh(force=True)
        assert scorer.served["pit_stop"].version == good
        assert "expects features ['a', 'b', 'c']" in caplog.text
    finally:
        client.set_registered_model_alias(name, CHAMPION, good)


def test_training_dag_runs_under_airflow_dags_test(exports: Settings) -> None:
    before = registered_versions(exports)
    conf = '{"sample_every": 40, "trees": 20}'
    result = airflow_server.dags_test(exports, "f1_train", "--conf", conf)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "state=success" in result.stdout + result.stderr
    # Its tasks registered under the scratch names (the prefix reached them).
    assert registered_versions(exports)["pit_stop"] == before["pit_stop"] + 1


def test_labels_match_the_base_rates_logged(
    trained: dict[str, ModelResult], stack: Settings
) -> None:
    folder = stack.export_dir / "2023_Monaco_R"
    samples = load_samples(
        folder, columns=["date", "session_time_s", "driver_number", "lap_number"]
    )
    labels = label_samples(samples, load_side_tables(folder, samples))
    in_lap = samples["lap_number"].notna()
    for label in LABELS:
        assert trained[label].base_rates["2023_Monaco_R"] == pytest.approx(
            labels.loc[in_lap, label].mean()
        )

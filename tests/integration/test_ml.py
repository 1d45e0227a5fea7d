"""Training against the real MLflow server on real races' laps, the evaluation's
guarantees, the champion rule, the models' behaviour, and serving in the stream
(thresholds, domain, the challenger in shadow, live scores)."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.kafka.consumer import StreamConsumer
from pipeline.kafka.producer import produce_session
from pipeline.kafka.topics import scratch_topics
from pipeline.ml import serving
from pipeline.ml.features import FEATURES, in_domain, race_features
from pipeline.ml.labels import LABELS, lap_labels
from pipeline.ml.laps import lap_tables
from pipeline.ml.live_scores import read_scores, score_run
from pipeline.ml.registry import scratch_models
from pipeline.ml.serving import ChampionScorer
from pipeline.ml.train import (
    CHALLENGER,
    CHAMPION,
    LapData,
    ModelResult,
    RaceSplit,
    TrainConfig,
    prepare,
    registered_name,
    registered_versions,
    train_one,
)
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db
from pipeline.sources.replay import load_samples, race_start_offset_s
from pipeline.stack import airflow_server
from tests.integration.streams import F1, subprocess_env

# Small and quick, but the real pipeline: 8 races of three seasons (2024's two are the
# test races), leave-one-race-out over the other six, one small XGBoost candidate.
RACES = (
    "2022_Bahrain_R", "2022_Spanish_R", "2022_Hungarian_R", "2023_Bahrain_R",
    "2023_Spanish_R", "2023_Hungarian_R", "2024_Bahrain_R", "2024_Spanish_R",
)  # fmt: skip
QUICK = TrainConfig(races=RACES, grid=((3, 60, 0.1),))


@pytest.fixture(scope="module")
def models(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Models and experiments of this module's own (`test-<8 hex>-pit-stop` etc.),
    deleted afterwards pass or fail, and lap tables in a folder of its own."""
    laps_dir = tmp_path_factory.mktemp("laps")
    with scratch_models(stack, laps_dir=laps_dir) as settings:
        yield settings


@pytest.fixture(scope="module")
def data(models: Settings) -> tuple[RaceSplit, LapData]:
    return prepare(QUICK, models)


@pytest.fixture(scope="module")
def trained(models: Settings, data: tuple[RaceSplit, LapData]) -> dict[str, ModelResult]:
    split, laps = data
    return {label: train_one(label, laps, split, QUICK, models) for label in LABELS}


def test_races_split_three_ways_and_the_demo_race_is_in_none(
    data: tuple[RaceSplit, LapData], models: Settings
) -> None:
    split, laps = data
    assert split.test == ("2024_Bahrain_R", "2024_Spanish_R")
    assert set(split.development) == set(RACES) - set(split.test)
    assert split.held_out == models.demo_session
    assert models.demo_session not in set(laps.races)
    with pytest.raises(ValueError, match="no lap data for"):
        prepare(replace(QUICK, races=("2031_Nowhere_R",)), models)


def test_training_tracks_scores_per_race_the_ablation_and_aliases(
    trained: dict[str, ModelResult], models: Settings, data: tuple[RaceSplit, LapData]
) -> None:
    split, laps = data
    client = mlflow.MlflowClient(models.mlflow_tracking_uri)
    for label in LABELS:
        result = trained[label]
        run = client.get_run(str(result.run_id))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model_card.md", "races.csv"} <= artifacts
        assert run.data.params["cv"] == "leave-one-race-out"
        assert run.data.params["held_out_race"] == models.demo_session
        test_rows = laps.races.isin(split.test).to_numpy()
        assert run.data.metrics["test_base_rate"] == pytest.approx(
            laps.labels.loc[test_rows, label].mean()
        )
        if result.status == "not learnable":
            assert run.data.tags["status"] == "not learnable"
            continue
        for name in ("cv_pr_auc", "baseline_cv_pr_auc", "test_pr_auc", "baseline_test_pr_auc",
                     "test_brier", "threshold", "ablation_without_tyres_test_pr_auc"):  # fmt: skip
            assert name in run.data.metrics, name
        assert set(result.cv_by_race) <= set(split.development)
        assert set(result.test_by_race) <= set(split.test)
        assert set(result.ablation) == {"tyres", "race", "pace", "order", "track"}
        assert {"per_race_pr_auc.png", "confusion_matrix.png", "calibration.png"} <= artifacts
        assert sum(result.confusion.values()) == int(test_rows.sum())
        version = client.get_model_version(registered_name(label, models), str(result.version))
        assert result.alias in version.aliases


def test_base_rates_logged_per_race_match_the_lap_labels(
    trained: dict[str, ModelResult], models: Settings, data: tuple[RaceSplit, LapData]
) -> None:
    split, _ = data
    from pipeline.ml.laps import available_races

    races = [r for r in available_races(models) if r.key in split.development + split.test]
    table = lap_tables(races, models)
    labels = lap_labels(table, QUICK.horizon_laps)
    features_ok = ~table["red_flag"].to_numpy(dtype=bool) & table["lap_number"].notna().to_numpy()
    for label in LABELS:
        expected = labels[features_ok].groupby(table.loc[features_ok, "race"])[label].mean()
        assert trained[label].base_rates == pytest.approx(expected.to_dict())


def test_selection_never_sees_the_test_races(
    trained: dict[str, ModelResult], models: Settings, data: tuple[RaceSplit, LapData]
) -> None:
    """The test races' labels shuffled: every choice (hyper-parameters, threshold,
    the champion score) stays the same; only the reported test score moves."""
    split, laps = data
    test = laps.races.isin(split.test).to_numpy()
    shuffled = laps.labels.copy()
    rng = np.random.default_rng(0)
    shuffled.loc[test, "pit_stop"] = rng.permutation(shuffled.loc[test, "pit_stop"].to_numpy())
    other = train_one("pit_stop", replace(laps, labels=shuffled), split, QUICK, models)
    first = trained["pit_stop"].metrics
    for name in ("cv_pr_auc", "threshold", "baseline_cv_pr_auc", "baseline_threshold"):
        assert other.metrics[name] == first[name], name
    assert other.metrics["test_pr_auc"] != first["test_pr_auc"]


def test_the_pit_model_beats_its_baseline_and_the_base_rate_on_the_test_races(
    trained: dict[str, ModelResult],
) -> None:
    m = trained["pit_stop"].metrics
    assert m["test_pr_auc"] > m["baseline_test_pr_auc"]
    assert m["test_pr_auc"] > 2 * m["test_base_rate"]


def test_a_rival_on_another_horizon_starts_a_new_line_and_the_same_line_competes(
    trained: dict[str, ModelResult], models: Settings, data: tuple[RaceSplit, LapData]
) -> None:
    split, laps = data
    client = mlflow.MlflowClient(models.mlflow_tracking_uri)
    name = registered_name("pit_stop", models)
    first = trained["pit_stop"]
    assert first.alias == CHAMPION
    client.set_registered_model_alias(name, CHAMPION, str(first.version))
    again = train_one("pit_stop", laps, split, QUICK, models)  # same line, same score
    assert again.alias == CHALLENGER
    assert f"champion v{first.version}" in again.reason
    longer = replace(QUICK, horizon_laps=2)
    _, two_laps = prepare(longer, models)
    rival = train_one("pit_stop", two_laps, split, longer, models)
    assert rival.params["comparison_line"] != first.params["comparison_line"]
    assert "new line of comparison" in rival.reason
    assert rival.alias == CHAMPION  # beats its own baseline; the old line is not its rival
    client.set_registered_model_alias(name, CHAMPION, str(first.version))
    client.set_registered_model_alias(name, CHALLENGER, str(again.version))


def test_the_pit_model_behaves_as_its_label_implies(
    trained: dict[str, ModelResult], models: Settings, data: tuple[RaceSplit, LapData]
) -> None:
    split, laps = data
    mlflow.set_tracking_uri(models.mlflow_tracking_uri)
    booster = mlflow.xgboost.load_model(
        f"models:/{registered_name('pit_stop', models)}/{trained['pit_stop'].version}"
    )
    rows = laps.features[laps.races.isin(split.test).to_numpy()]

    def p(frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(booster.inplace_predict(frame[list(FEATURES)].to_numpy("float32")))

    # More tyre age, same state: the pit probability never drops (a monotone constraint).
    older = rows.assign(tyre_life=rows["tyre_life"] + 10)
    assert (p(older) - p(rows) >= -1e-6).all()
    # A car that has just left the pits is not about to enter them again.
    out_laps = rows[rows["is_out_lap"] == 1]
    assert p(out_laps).mean() < p(rows[rows["is_out_lap"] == 0]).mean() / 3


def test_predictions_ignore_the_car_number_use_the_threshold_and_skip_the_grid(
    trained: dict[str, ModelResult], models: Settings, race_export: Path
) -> None:
    client = mlflow.MlflowClient(models.mlflow_tracking_uri)
    name = registered_name("pit_stop", models)
    client.set_registered_model_alias(name, CHAMPION, str(trained["pit_stop"].version))
    samples = load_samples(race_export)  # the grid, the race, the parade after the flag
    samples["seq"] = samples.groupby("driver_number").cumcount()
    samples = samples.assign(
        run_id="r", session_key="s", date_us=samples["date"].astype("int64") // 1000
    )
    features = race_features(samples)
    scorer = ChampionScorer(models, labels=("pit_stop",))
    scorer.refresh(force=True)
    served = scorer.served["pit_stop"]
    assert served.threshold == pytest.approx(trained["pit_stop"].metrics["threshold"])
    try:  # scoring starts the scorer's alias follower
        rows = scorer.score(samples, features).to_pandas()
        renumbered = scorer.score(
            samples.assign(driver_number=samples["driver_number"] + 100), features
        ).to_pandas()
    finally:
        scorer.stop()
    pd.testing.assert_series_equal(rows["pit_stop_p"], renumbered["pit_stop_p"])
    domain = in_domain(features)
    assert (~domain).any() and domain.any()
    assert rows.loc[~domain, "pit_stop_p"].isna().all()  # the grid before the start
    assert rows.loc[~domain, "pit_stop_alert"].isna().all()
    inside = rows[domain]
    assert (inside["pit_stop_alert"] == (inside["pit_stop_p"] >= served.threshold)).all()
    # Each lap's features predicted once (`distinct_runs`) give every sample what
    # predicting every sample gives.
    each = served.booster.inplace_predict(
        features.to_numpy(dtype="float32")[domain][:, served.columns]
    )
    np.testing.assert_array_equal(inside["pit_stop_p"].to_numpy(), each.astype(float))


@pytest.fixture
def stream(models: Settings) -> Any:
    """Scratch topics on top of the scratch models: the consumer serves those."""
    with scratch_topics(models, "test-ml", model_refresh_s=0.5) as settings:
        yield settings


def test_moving_the_alias_mid_stream_switches_versions_without_losing_a_message(
    trained: dict[str, ModelResult],
    stream: Settings,
    models: Settings,
    data: tuple[RaceSplit, LapData],
) -> None:
    split, laps = data
    client = mlflow.MlflowClient(stream.mlflow_tracking_uri)
    name = registered_name("pit_stop", stream)
    first = str(trained["pit_stop"].version)
    second = str(train_one("pit_stop", laps, split, QUICK, models).version)
    client.set_registered_model_alias(name, CHAMPION, first)
    client.set_registered_model_alias(name, CHALLENGER, second)
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
                    client.set_registered_model_alias(name, CHALLENGER, first)
                    moved["after_rows"] = int(row[0])
                    return
                time.sleep(0.05)

    mover = threading.Thread(target=move_once_the_first_version_has_scored)
    mover.start()
    folder = stream.export_dir / "2023_Monaco_R"
    produced = produce_session(
        folder, speed=40.0, run_id=run, start_offset_s=race_start_offset_s(folder) + 600,
        duration_s=400, settings=stream,
    )  # fmt: skip
    thread.join()
    mover.join()
    assert moved, f"no row of run {run} scored by v{first} within 120 s"
    # The consumer ended: no thread of its keeps asking the registry.
    assert not [t for t in threading.enumerate() if t.name == serving.FOLLOWER]
    with telemetry_db.connect(stream) as conn:
        rows = pd.DataFrame(
            conn.execute(
                "SELECT committed_at, in_domain, pit_stop_version, pit_stop_p, "
                "pit_stop_challenger_version, pit_stop_challenger_p FROM telemetry_predictions "
                "WHERE run_id = %s ORDER BY committed_at",
                (run,),
            ).fetchall(),
            columns=["committed_at", "in_domain", "version", "p", "shadow_version", "shadow_p"],
        )
    assert len(rows) == produced.delivered == reports["r"].samples
    assert rows["in_domain"].all()  # 10 minutes into the race: every sample is scored
    assert rows["p"].notna().all()
    # The challenger scored in shadow beside it, the other version; not in the moment
    # the two aliases point at the same version (they move one after the other).
    shadowed = rows["shadow_version"].notna()
    assert shadowed.mean() > 0.9
    assert rows.loc[shadowed, "shadow_p"].notna().all()
    assert rows.loc[~shadowed, "shadow_p"].isna().all()
    assert (rows.loc[shadowed, "shadow_version"] != rows.loc[shadowed, "version"]).all()
    versions = rows["version"].astype(str).tolist()
    assert set(versions) == {first, second}
    switch = versions.index(second)
    assert set(versions[switch:]) == {second}  # once switched, never back

    # Live scores of both, per version, from the race's own lap table.
    scored = pd.DataFrame(score_run(run, stream))
    assert set(scored["role"]) == {"champion", "challenger"}
    assert set(scored["version"].astype(str)) == {first, second}
    assert (scored["outcomes_from"] == "lap table").all()
    assert (scored["laps"] > 0).all()
    assert len(read_scores(run, stream)) == len(scored)
    # `f1 models compare` prints the two side by side, training's scores and the run's.
    printed = subprocess.run(
        [F1, "models", "compare", "--run", run], env=subprocess_env(stream),
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in printed.splitlines()]
    lines = {row[1]: f" {' '.join(row)} " for row in rows if row and row[0] == "pit_stop"}
    assert set(lines) == {"champion", "challenger"}
    assert f" {second} " in lines["champion"] and f" {first} " in lines["challenger"]


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
        assert "expects features ['a', 'b', 'c'] the stream does not compute" in caplog.text
    finally:
        client.set_registered_model_alias(name, CHAMPION, good)


def test_training_dag_runs_under_airflow_dags_test(models: Settings) -> None:
    before = registered_versions(models)
    conf = '{"races": ["2023_Bahrain_R", "2023_Spanish_R", "2024_Bahrain_R"]}'
    result = airflow_server.dags_test(models, "f1_train", "--conf", conf)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "state=success" in result.stdout + result.stderr
    # Its tasks registered under the scratch names (the prefix reached them).
    assert registered_versions(models)["pit_stop"] == before["pit_stop"] + 1

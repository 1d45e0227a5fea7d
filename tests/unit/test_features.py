"""Features: the training path (whole race per car) and the streaming path
(batch by batch with the car's history carried over) give identical features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.kafka.producer import message_columns
from pipeline.ml.features import FEATURES, WINDOW, car_features, race_features
from pipeline.sources.replay import load_samples


@pytest.fixture(scope="module")
def race(race_export: Path) -> pd.DataFrame:
    samples = load_samples(race_export)
    samples["seq"] = samples.groupby("driver_number").cumcount()
    # The consumer sees the message schema's columns (brake in %, drs_open).
    return pd.DataFrame(message_columns(samples, "run", race_export.name))


def test_streaming_batches_give_the_training_features(race: pd.DataFrame) -> None:
    race = race.iloc[:150_000]  # all 20 cars over the first ~30 minutes
    offline = race_features(race)
    rng = np.random.default_rng(7)
    streamed = []
    histories: dict[int, dict[str, list[float]] | None] = {}
    lo = 0
    while lo < len(race):  # uneven batches across all cars, in replay order
        hi = min(lo + int(rng.integers(1, 3_000)), len(race))
        for number, car in race.iloc[lo:hi].groupby("driver_number", sort=False):
            features, histories[number] = car_features(car, histories.get(number))
            streamed.append(features)
        lo = hi
    online = pd.concat(streamed).loc[offline.index]
    assert list(online.columns) == list(FEATURES)
    pd.testing.assert_frame_equal(online, offline)


def test_features_use_only_the_past(race: pd.DataFrame) -> None:
    car = race[race["driver_number"] == 1].iloc[:200]
    full, _ = car_features(car)
    cut, _ = car_features(car.iloc[:100])
    pd.testing.assert_frame_equal(full.iloc[:100], cut)  # later samples change nothing


def test_rolling_features_cover_the_last_window(race: pd.DataFrame) -> None:
    car = race[race["driver_number"] == 1].iloc[1000:1100].reset_index(drop=True)
    features, history = car_features(car)
    i = 60
    assert features.loc[i, "speed_mean_5s"] == pytest.approx(
        car["speed"].iloc[i - WINDOW + 1 : i + 1].mean()
    )
    assert features.loc[i, "speed_min_5s"] == car["speed"].iloc[i - WINDOW + 1 : i + 1].min()
    assert features.loc[i, "speed_change"] == car["speed"].iloc[i] - car["speed"].iloc[i - 1]
    assert len(history["speed"]) == WINDOW
    assert "is_in_lap" not in features  # known only at the pit entry: it would leak


def test_saved_training_data_reads_back_identical(race_export: Path, tmp_path: Path) -> None:
    from pipeline.ml import dataset

    built = dataset.build(race_export.name, sample_every=40)
    loaded = dataset.load(dataset.save(built, tmp_path / "validation.parquet"))
    assert loaded.session_key == built.session_key
    pd.testing.assert_frame_equal(loaded.features, built.features)
    pd.testing.assert_frame_equal(loaded.labels, built.labels)
    pd.testing.assert_series_equal(loaded.groups, built.groups, check_names=False)

"""Features, on the real 2023 Monaco race: causal (the race cut at random instants
gives the features the whole race gives at those instants), and the same in the
stream (`batch.process`, uneven batches, a restart from the encoded state) as in
training (the whole race at once, or its lap table)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.kafka.producer import message_columns
from pipeline.ml.features import FEATURES, in_domain, lap_table_features, race_features
from pipeline.ml.laps import Race, build_lap_table
from pipeline.ml.serving import distinct_runs
from pipeline.processing import batch
from pipeline.processing.batch import PartitionState, WindowConfig
from pipeline.settings import SAMPLE_FASTF1_CACHE
from pipeline.sources.lap_context import LAP_FIELDS, lap_context
from pipeline.sources.replay import load_samples
from tests.unit.test_processing import consumer_frame, cut, new_states

CUT_INSTANTS = 300
# What a lap only reveals at its end: masked in the cut race until the lap is over.
KNOWN_AT_LAP_END = ("Time", "LapTime", "Position", "PitInTime", "TrackStatus",
                    "Sector1Time", "Sector2Time", "Sector3Time")  # fmt: skip


@pytest.fixture(scope="module")
def messages(race_export: Path) -> pd.DataFrame:
    """The race as the consumer decodes it (the message schema's columns, in replay order)."""
    samples = load_samples(race_export)
    samples["seq"] = samples.groupby("driver_number").cumcount()
    frame = consumer_frame(message_columns(samples, "2023_Monaco_R@features", race_export.name))
    order = np.argsort(frame["date_us"].to_numpy(), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


@pytest.fixture(scope="module")
def laps(race_export: Path) -> pd.DataFrame:
    return pd.read_parquet(race_export / "laps.parquet")


def _known_at(laps: pd.DataFrame, t: pd.Timedelta) -> pd.DataFrame:
    """The laps table as the timing feed had delivered it at session time t."""
    started = laps[laps["LapStartTime"] <= t].copy()
    running = started["Time"] > t
    for column in KNOWN_AT_LAP_END:
        started.loc[running, column] = None
    return started


def test_the_lap_context_uses_only_what_the_feed_had_delivered(laps: pd.DataFrame) -> None:
    full = lap_context(laps, race_laps=78).set_index(["driver_number", "lap_number"])
    rng = np.random.default_rng(11)
    start, end = laps["LapStartTime"].min(), laps["Time"].max()
    fields = [f for f in LAP_FIELDS if f not in ("lap_number", "is_in_lap")]  # is_in_lap: a label
    compared = 0
    for t in start + (end - start) * rng.random(CUT_INSTANTS):
        cut_race = lap_context(_known_at(laps, t), race_laps=78)
        # Each car's lap running at t: the last one it started.
        now = cut_race.sort_values("lap_start").groupby("driver_number").tail(1)
        now = now[now["lap_end"].isna()].set_index(["driver_number", "lap_number"])
        pd.testing.assert_frame_equal(now[fields], full.loc[now.index, fields], check_dtype=False)
        compared += len(now)
    assert compared > CUT_INSTANTS * 10  # most instants see most of the field mid-lap


def test_features_use_only_what_the_feed_had_delivered() -> None:
    table = build_lap_table(Race(2023, "Monaco Grand Prix", SAMPLE_FASTF1_CACHE))
    full = lap_table_features(table)
    rng = np.random.default_rng(5)
    start, end = table["lap_start"].min(), table["lap_end"].max()
    for t in start + (end - start) * rng.random(CUT_INSTANTS):
        # The race cut at t: the laps started by then, each with its context as it
        # was at its start (what a lap table row holds: the test above proves it).
        seen = table[table["lap_start"] <= t]
        pd.testing.assert_frame_equal(lap_table_features(seen), full.loc[seen.index])


def test_streaming_batches_and_a_restart_give_the_training_features(
    messages: pd.DataFrame,
) -> None:
    offline = race_features(messages)
    rng = np.random.default_rng(7)
    bounds = np.cumsum(rng.integers(1, 3_000, size=len(messages) // 1_000))
    batches = cut(messages, bounds)
    states = new_states()
    config = WindowConfig()
    streamed = []
    for i, frame in enumerate(batches):
        if i == len(batches) // 2:  # a consumer restart: the state as stored, read back
            states = {p: PartitionState.decode(s.encode()) for p, s in states.items()}
        result = batch.process(frame, states, config, with_features=True)
        assert result.features is not None  # row for row with the batch's kept samples
        keys = pd.MultiIndex.from_frame(result.samples[["driver_number", "seq"]])
        streamed.append(result.features.set_axis(keys))
    online = pd.concat(streamed)
    assert list(online.columns) == list(FEATURES)
    keys = pd.MultiIndex.from_frame(messages[["driver_number", "seq"]])
    pd.testing.assert_frame_equal(online.loc[keys], offline.set_axis(keys))


def test_the_stream_gives_each_sample_its_lap_rows_features(messages: pd.DataFrame) -> None:
    """The samples' features equal the lap table's (training on races without car
    telemetry): the track status is the one at the lap's first sample in the stream
    and at its start line in the table, a few hundred ms apart."""
    table = build_lap_table(Race(2023, "Monaco Grand Prix", SAMPLE_FASTF1_CACHE))
    by_lap = lap_table_features(table).set_axis(
        pd.MultiIndex.from_frame(table[["driver_number", "lap_number"]].astype(int))
    )
    streamed = race_features(messages)
    inside = messages["lap_number"].notna().to_numpy()
    keys = pd.MultiIndex.from_arrays(
        [messages["driver_number"][inside], messages["lap_number"][inside].astype(int)]
    )
    expected = by_lap.loc[keys].set_axis(streamed.index[inside])
    same = [f for f in FEATURES if f != "track_status_code"]
    pd.testing.assert_frame_equal(streamed.loc[inside, same], expected[same])
    agree = streamed.loc[inside, "track_status_code"] == expected["track_status_code"]
    assert agree.mean() > 0.99


def test_samples_outside_a_lap_are_outside_the_domain(messages: pd.DataFrame) -> None:
    features = race_features(messages)
    domain = in_domain(features)
    assert not domain[messages["lap_number"].isna().to_numpy()].any()  # grid, after the flag
    assert domain[messages["lap_number"].notna().to_numpy()].all()  # 2023: never stopped
    assert "is_in_lap" not in features  # known only at the pit entry: it would leak


def test_a_consumer_batchs_features_are_a_few_distinct_rows(messages: pd.DataFrame) -> None:
    """What the scorer predicts (`serving.distinct_runs`): each run of equal rows
    once. A batch comes grouped by car and a lap's samples share its features, so
    5,000 samples reduce to about one row per car and lap, and every sample gets
    back exactly its own row (bit for bit, NaN included)."""
    states, config = new_states(), WindowConfig()
    sizes = []
    for frame in cut(messages, np.arange(5_000, len(messages), 5_000)):
        result = batch.process(frame, states, config, with_features=True)
        assert result.features is not None
        matrix = result.features.to_numpy(dtype="float32")
        distinct, runs = distinct_runs(matrix)
        assert distinct[runs].tobytes() == matrix.tobytes()
        # Runs of equal rows: no two neighbours in `distinct` are the same.
        assert all(a.tobytes() != b.tobytes() for a, b in itertools.pairwise(distinct))
        sizes.append((len(matrix), len(distinct)))
    rows, kept = map(sum, zip(*sizes, strict=True))
    assert kept < rows / 20, f"{kept} distinct rows of {rows}"  # 2023: ~4 Hz, ~75 s laps
    one, none = distinct_runs(matrix[:1]), distinct_runs(matrix[:0])
    assert one[0].tobytes() == matrix[:1].tobytes() and one[1].tolist() == [0]
    assert len(none[0]) == 0 and len(none[1]) == 0

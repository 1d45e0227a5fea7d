"""The FastF1 export on the real offline sample races (no services needed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.settings import SAMPLE_FASTF1_CACHE, Settings, get_settings
from pipeline.sources.export import write_export
from pipeline.sources.fastf1_session import SessionNotAvailable, load_session
from pipeline.sources.telemetry_table import CAR_CHANNELS, frequency_report, telemetry_table

pytestmark = pytest.mark.skipif(
    not SAMPLE_FASTF1_CACHE.is_dir(), reason="the offline FastF1 sample is not beside the project"
)
logging.getLogger("fastf1").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def monaco_2023() -> Any:
    return load_session(2023, "Monaco", "R")


@pytest.fixture(scope="module")
def table(monaco_2023: Any) -> pd.DataFrame:
    return telemetry_table(monaco_2023)


def test_rows_and_drivers_match_the_session(monaco_2023: Any, table: pd.DataFrame) -> None:
    assert len(table) == sum(len(v) for v in monaco_2023.car_data.values()) == 797_840
    assert set(table["driver_number"]) == {int(n) for n in monaco_2023.car_data}
    assert table["driver"].notna().all() and table["team"].notna().all()
    assert not table["resampled"].any()


def test_every_sample_keeps_its_values(monaco_2023: Any, table: pd.DataFrame) -> None:
    for number, samples in monaco_2023.car_data.items():
        mine = table[table["driver_number"] == int(number)].reset_index(drop=True)
        theirs = samples.reset_index(drop=True)
        assert (mine["date"].dt.tz_localize(None) == theirs["Date"]).all()
        for source, column in CAR_CHANNELS.items():
            assert (mine[column].to_numpy() == theirs[source].to_numpy()).all(), (number, column)


def test_lap_context_switches_exactly_at_lap_boundaries(
    monaco_2023: Any, table: pd.DataFrame
) -> None:
    laps = monaco_2023.laps.pick_drivers("1").dropna(subset=["LapStartTime"])
    car = table[table["driver_number"] == 1]
    checked = 0
    for _, lap in laps.iloc[1:].iterrows():
        start = lap["LapStartTime"].total_seconds()
        after = car[car["session_time_s"] >= start].iloc[0]
        before = car[car["session_time_s"] < start].iloc[-1]
        assert after["lap_number"] == lap["LapNumber"]
        assert before["lap_number"] == lap["LapNumber"] - 1
        assert after["compound"] == lap["Compound"] and after["stint"] == lap["Stint"]
        checked += 1
    assert checked == len(laps) - 1 > 70
    in_laps = set(car.loc[car["is_in_lap"], "lap_number"].dropna())
    assert in_laps == set(laps.loc[laps["PitInTime"].notna(), "LapNumber"])


def test_frequency_report_shows_the_real_rate(table: pd.DataFrame) -> None:
    report = frequency_report(table)
    assert len(report) == 20
    assert 1 / report["median_interval_s"].median() == pytest.approx(4.17, abs=0.01)
    assert report["mean_rate_hz"].mean() == pytest.approx(3.77, abs=0.01)
    assert (report["gaps_over_1s"] > 0).all()  # the feed has real dropouts


def test_export_is_atomic_and_repeatable(tmp_path: Path, table: pd.DataFrame) -> None:
    sample = table[table["driver_number"].isin([1, 14])].groupby("driver_number").head(2500)
    side = {"results": pd.DataFrame({"driver_number": [1, 14]})}
    first = write_export("t", sample, side, export_dir=tmp_path, extra_manifest={})
    checksum = json.loads((first / "manifest.json").read_text())["checksum_sha256"]
    again = write_export("t", sample, side, export_dir=tmp_path, extra_manifest={})
    assert json.loads((again / "manifest.json").read_text())["checksum_sha256"] == checksum
    back = pd.read_parquet(again / "telemetry")
    assert len(back) == 5000 and set(back["driver_number"].astype(int)) == {1, 14}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temporary folder left


def test_empty_session_leaves_nothing_behind(tmp_path: Path, table: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="no telemetry samples"):
        write_export("empty", table.head(0), {}, export_dir=tmp_path, extra_manifest={})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("year", "event", "session", "message"),
    [
        (2023, "Monacco", "R", r"no event 'Monacco' in the 2023 calendar\. Did you mean 'Monaco'"),
        (2019, "Monaco", "R", r"no 2019 calendar in the offline cache"),
        (2023, "Monaco", "Q", r"not in the offline FastF1 cache.*FASTF1_OFFLINE=false"),
    ],
)
def test_bad_input_gets_one_clear_error(year: int, event: str, session: str, message: str) -> None:
    settings: Settings = get_settings()
    assert settings.fastf1_offline
    with pytest.raises(SessionNotAvailable, match=message):
        load_session(year, event, session, settings=settings)


@pytest.mark.parametrize(
    ("year", "rows", "median_hz"),
    [(2021, 673_520, 4.17), (2023, 797_840, 4.17), (2024, 907_080, 4.17)],
)
def test_each_sample_race_has_all_its_cars_and_rows(year: int, rows: int, median_hz: float) -> None:
    session = load_session(year, "Monaco", "R")
    table = telemetry_table(session)
    assert len(table) == rows
    assert set(table["driver_number"]) == {int(n) for n in session.results["DriverNumber"]}
    assert table.groupby("driver_number").size().nunique() == 1  # all cars on one clock
    report = frequency_report(table)
    assert 1 / report["median_interval_s"].median() == pytest.approx(median_hz, abs=0.01)
    assert table["lap_number"].max() == session.laps["LapNumber"].max()


def test_resampling_is_asked_for_and_flagged(monaco_2023: Any, table: pd.DataFrame) -> None:
    resampled = telemetry_table(monaco_2023, resample="100ms")
    car = resampled[resampled["driver_number"] == 1]
    assert car["session_time_s"].diff().median() == pytest.approx(0.1, abs=1e-6)
    # Flagged exactly where FastF1 interpolated; grid points that were real samples are not.
    assert (resampled["resampled"] == resampled["source"].eq("interpolation")).all()
    original = car[~car["resampled"]].merge(table, on=["driver_number", "date"])
    assert len(original) > 0
    assert (original["speed_x"] == original["speed_y"]).all()
    assert 1 / frequency_report(resampled)["median_interval_s"].median() == pytest.approx(10)


def test_a_bad_resample_rule_is_refused_before_loading() -> None:
    from pipeline.sources.export import export_session

    with pytest.raises(ValueError, match="not a fixed interval"):
        export_session(2023, "Monaco", "R", resample="monthly")

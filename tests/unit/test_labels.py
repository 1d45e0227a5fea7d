"""Labels on the real 2023 Monaco race: each is 1 exactly in the horizon before its events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.ml.labels import (
    CLIFF_LOSS,
    SideTables,
    incidents,
    label_samples,
    load_side_tables,
    pit_entries,
    tyre_cliffs,
)
from pipeline.sources.replay import load_samples

HORIZON = 60.0


@pytest.fixture(scope="module")
def race(race_export: Path) -> tuple[pd.DataFrame, SideTables]:
    samples = load_samples(race_export, columns=["date", "session_time_s", "driver_number"])
    return samples, load_side_tables(race_export, samples)


def test_pit_stop_is_one_exactly_in_the_horizon_before_each_pit_entry(
    race: tuple[pd.DataFrame, SideTables],
) -> None:
    samples, side = race
    labels = label_samples(samples, side, HORIZON)
    entries = pit_entries(side.laps)
    assert len(entries) == 38
    car = entries["driver_number"].iloc[0]
    mine = samples["driver_number"] == car
    t = samples.loc[mine, "session_time_s"].to_numpy()
    expected = np.zeros(len(t), dtype=bool)
    for entry in entries.loc[entries["driver_number"] == car, "time_s"]:
        expected |= (t < entry) & (t >= entry - HORIZON)
    assert (labels.loc[mine, "pit_stop"].to_numpy() == expected).all()
    assert labels["pit_stop"].sum() > 0


def test_crash_risk_events_are_on_track_incidents_naming_cars(
    race: tuple[pd.DataFrame, SideTables],
) -> None:
    _, side = race
    cars = set(incidents(side)["driver_number"])
    # 2023 notices: 27/2 and 55/31 collisions, 11/18 leaving the track, 20/18, 63/11 rejoin.
    assert cars == {2, 27, 31, 55, 11, 18, 20, 63}
    # Procedural notices are not incidents: 23 (track limits), 63 alone (grid position).
    assert 23 not in cars


def test_a_tyre_cliff_lap_is_slower_than_its_stint_reference(
    race: tuple[pd.DataFrame, SideTables],
) -> None:
    _, side = race
    cliffs = tyre_cliffs(side.laps)
    assert len(cliffs) > 0
    laps = side.laps.assign(start_s=side.laps["LapStartTime"].dt.total_seconds())
    for _, cliff in cliffs.head(10).iterrows():
        lap = laps[(laps["DriverNumber"].astype(int) == cliff["driver_number"])
                   & np.isclose(laps["start_s"], cliff["time_s"])].iloc[0]  # fmt: skip
        stint = laps[(laps["DriverNumber"] == lap["DriverNumber"]) & (laps["Stint"] == lap["Stint"])
                     & (laps["LapNumber"] < lap["LapNumber"]) & laps["PitInTime"].isna()
                     & laps["PitOutTime"].isna() & (laps["TrackStatus"] == "1")
                     & (laps["LapNumber"] > 1) & laps["LapTime"].notna()]  # fmt: skip
        reference = stint["LapTime"].dt.total_seconds().iloc[-3:].median()
        assert lap["LapTime"].total_seconds() > reference * (1 + CLIFF_LOSS)

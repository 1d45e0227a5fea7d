"""Lap labels on real races: each is 1 exactly on the laps its events happen in
(or within the horizon's laps before them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.ml.labels import CLIFF_LOSS, FUEL_EFFECT_S, lap_labels, tyre_cliffs
from pipeline.ml.laps import Race, available_races, build_lap_table
from pipeline.settings import SAMPLE_FASTF1_CACHE


@pytest.fixture(scope="module")
def monaco() -> pd.DataFrame:
    return build_lap_table(Race(2023, "Monaco Grand Prix", SAMPLE_FASTF1_CACHE))


def test_pit_stop_is_one_on_the_in_lap_and_with_two_laps_on_the_lap_before(
    monaco: pd.DataFrame,
) -> None:
    one, two = lap_labels(monaco, 1), lap_labels(monaco, 2)
    assert one["pit_stop"].sum() == monaco["is_in_lap"].sum() == 38  # 2023: rain, many stops
    assert (one["pit_stop"] == monaco["is_in_lap"].astype(int)).all()
    in_laps = monaco[monaco["is_in_lap"]]
    before = monaco.set_index(["driver_number", "lap_number"])
    keys = list(zip(in_laps["driver_number"], in_laps["lap_number"] - 1, strict=True))
    rows = before.index.get_indexer(keys)
    assert (two["pit_stop"].to_numpy()[rows[rows >= 0]] == 1).all()
    assert two["pit_stop"].sum() > one["pit_stop"].sum()


def test_red_flag_pit_entries_are_not_pit_stops() -> None:
    # 2024 Monaco was stopped on lap 1: every car entered the pit lane, none made a stop.
    table = build_lap_table(Race(2024, "Monaco Grand Prix", SAMPLE_FASTF1_CACHE))
    stopped = table["red_flag"] & table["is_in_lap"]
    assert stopped.sum() >= 15
    assert lap_labels(table, 1)["pit_stop"][stopped].sum() == 0


def test_crash_risk_events_are_on_track_incidents_naming_cars(monaco: pd.DataFrame) -> None:
    cars = set(monaco.loc[monaco["crash_risk"], "driver_number"])
    # 2023 notices: 27/2 and 55/31 collisions, 11/18 leaving the track, 20/18, 63/11 rejoin.
    assert cars == {2, 27, 31, 55, 11, 18, 20, 63}
    # Procedural notices are not incidents: 23 (track limits), 63 alone (grid position).
    assert 23 not in cars


def test_the_lap_tables_cliff_laps_are_the_cliffs_found(monaco: pd.DataFrame) -> None:
    cliffs = tyre_cliffs(_fastf1_laps(Race(2023, "Monaco Grand Prix", SAMPLE_FASTF1_CACHE)))
    found = set(zip(cliffs["driver_number"], cliffs["time_s"].round(3), strict=True))
    marked = monaco[monaco["tire_failure"]]
    starts = marked["lap_start"].dt.total_seconds().round(3)
    assert set(zip(marked["driver_number"], starts, strict=True)) == found
    assert len(found) > 0


def _fastf1_laps(race: Race) -> pd.DataFrame:
    import fastf1

    fastf1.Cache.configure(cache_dir=str(race.cache_dir))
    fastf1.Cache.offline_mode(True)
    session = fastf1.get_session(race.year, race.event, "R")
    session.load(laps=True, telemetry=False, weather=False, messages=False)
    return session.laps


def test_cliff_laps_lose_the_stated_share_against_the_stints_fuel_corrected_laps() -> None:
    [race] = [r for r in available_races() if r.key == "2021_Monaco_R"]
    laps = _fastf1_laps(race)
    cliffs = tyre_cliffs(laps)
    assert len(cliffs) > 0
    start = laps["LapStartTime"].dt.total_seconds()
    for _, cliff in cliffs.head(10).iterrows():
        lap = laps[(laps["DriverNumber"].astype(int) == cliff["driver_number"])
                   & np.isclose(start, cliff["time_s"])].iloc[0]  # fmt: skip
        stint = laps[(laps["DriverNumber"] == lap["DriverNumber"]) & (laps["Stint"] == lap["Stint"])
                     & (laps["LapNumber"] < lap["LapNumber"]) & laps["PitInTime"].isna()
                     & laps["PitOutTime"].isna() & (laps["TrackStatus"] == "1")
                     & (laps["LapNumber"] > 1) & laps["LapTime"].notna()]  # fmt: skip
        corrected = stint["LapTime"].dt.total_seconds() + FUEL_EFFECT_S * stint["LapNumber"]
        reference = corrected.iloc[-3:].median()
        mine = lap["LapTime"].total_seconds() + FUEL_EFFECT_S * lap["LapNumber"]
        assert mine > reference * (1 + CLIFF_LOSS)

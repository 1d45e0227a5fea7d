"""The lap context of each lap, as the timing feed had delivered it when the lap began.

FastF1's laps table describes a lap once it is over: its `Position` is the
place at the line at the lap's *end*, its `LapTime` is known at the end. A
sample inside lap n may only carry what was known at lap n's start, so:

- `position`: the place at the end of lap n-1 (null on lap 1: no grid order offline);
- `last_lap_s`: lap n-1's time; `gap_ahead_s`: the interval to the car one place
  ahead when both crossed the line to end lap n-1 (null for the leader);
- `is_out_lap`: lap n-1 ended in the pits (or the car starts the race from them);
- `stint`, `compound`, `tyre_life`: known at the line; on an out-lap, once the new
  tyres are on, which the timing shows during the stop (the pit exit is ~20 s into
  the lap: the one thing the cut test in tests/unit/test_features.py grants);
- `race_laps`: the scheduled race distance, known before the start.

`is_in_lap` (the car enters the pits at the end of lap n) and `red_flag` (the
race was stopped during it) are only known at the lap's end: they are for the
record and for labels, never model features.
One implementation serves the replay's telemetry table and the lap-level
training data of races without car telemetry (`pipeline.ml.laps`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

LAP_FIELDS = (
    "lap_number", "stint", "compound", "tyre_life", "position", "last_lap_s", "gap_ahead_s",
    "race_laps", "is_in_lap", "is_out_lap",
)  # fmt: skip


def lap_context(laps: pd.DataFrame, race_laps: int | None) -> pd.DataFrame:
    """One row per lap with a start time: driver_number, lap_start and lap_end
    (session timedeltas) and LAP_FIELDS, each as known when the lap started."""
    import numpy as np
    import pandas as pd

    frame = laps.dropna(subset=["LapStartTime"]).copy()
    frame["driver_number"] = frame["DriverNumber"].astype(int)
    frame = frame.sort_values(["driver_number", "LapNumber"], kind="stable")
    # Interval to the car one place ahead at the line ending each lap (same lap number).
    by_lap = frame.dropna(subset=["Position", "Time"]).sort_values(["LapNumber", "Position"])
    ahead = by_lap.groupby("LapNumber")["Time"].diff().dt.total_seconds()
    consecutive = by_lap.groupby("LapNumber")["Position"].diff() == 1
    frame["gap_at_end"] = ahead.where(consecutive)
    previous = frame.groupby("driver_number")
    previous_lap = previous["LapNumber"].shift(1)
    follows = previous_lap == frame["LapNumber"] - 1  # lap n-1 is there to read from
    context = pd.DataFrame(
        {
            "driver_number": frame["driver_number"],
            "lap_start": frame["LapStartTime"],
            "lap_end": frame["Time"],
            "lap_number": frame["LapNumber"],
            "stint": frame["Stint"],
            "compound": frame["Compound"],
            "tyre_life": frame["TyreLife"],
            "position": previous["Position"].shift(1).where(follows),
            "last_lap_s": previous["LapTime"].shift(1).dt.total_seconds().where(follows),
            "gap_ahead_s": previous["gap_at_end"].shift(1).where(follows),
            "race_laps": np.nan if race_laps is None else float(race_laps),
            "is_in_lap": frame["PitInTime"].notna(),
            # The car crossed the line in the pit lane: lap n-1 ended in the pits (the
            # pit exit itself comes later in the lap), or it starts the race from the pits.
            "is_out_lap": (previous["PitInTime"].shift(1).notna() & follows)
            | ((frame["LapNumber"] == 1) & frame["PitOutTime"].notna()),
            # Stopped during the lap (status 5): every car enters the pits, no pit stops.
            "red_flag": frame["TrackStatus"].astype("string").str.contains("5").fillna(False),
        }
    )
    return context.reset_index(drop=True)

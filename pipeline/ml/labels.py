"""Labels from real timing, one per model, per lap.

Each label marks a lap 1 when an event of the car happens during that lap or
the next `horizon_laps - 1` laps (horizon 1: during this lap). The models
predict it at the lap's start, from what the feed had delivered by then
(`pipeline.ml.features`). What each event is, honestly:

- pit_stop: the car enters the pits at the end of the lap (FastF1's `PitInTime`
  on it). Exact, from timing. A lap under a red flag is no pit stop (every car
  enters the pit lane when the race is stopped) and is out of the models' domain.
- tire_failure: the feed has no tyre-failure signal. The proxy is a
  *degradation cliff*: a green-flag racing lap (not an in- or out-lap, track
  status all clear) slower than the median of the same stint's previous three
  such laps by more than CLIFF_LOSS (3 %), lap times corrected to the same fuel
  load (FUEL_EFFECT_S per lap of fuel burnt). It measures a sudden loss of pace
  within a stint, which worn tyres cause, but so do traffic and small mistakes;
  it does not see punctures or failures.
- crash_risk: race control's first notice of an on-track incident names the
  car ("... INCIDENT INVOLVING CARS 27 (HUL) AND 2 (SAR) NOTED - CAUSING A
  COLLISION", a spin, a stopped car, a crash). Procedural notices (pit-lane
  speeding, starting position, track limits, penalties served) and the
  stewards' follow-ups (under investigation, reviewed, penalty) are not events.
  The event time is the onset of a yellow/SC/VSC/red track status that began
  up to INCIDENT_LOOKBACK_S before the notice, if any, else the notice time
  (notices lag the incident). It measures "involved in an incident race
  control noted", not only crashes; an incident notice naming no car (2024's
  lap-1 crash) cannot be attributed and is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

LABELS = ("pit_stop", "tire_failure", "crash_risk")
DEFINITIONS = {
    "pit_stop": "The car enters the pits at the end of the lap (FastF1 laps: PitInTime), within "
    "the horizon's laps. Exact, from timing; red-flag laps are out of the domain.",
    "tire_failure": "Proxy: a degradation cliff lap within the horizon: a green-flag racing "
    "lap (no pit in/out, track clear) over 3 % slower, fuel-corrected, than the median of the "
    "same stint's previous three such laps. Measures a sudden loss of pace in a stint; worn "
    "tyres cause it, but so do traffic and small mistakes. It does not see punctures.",
    "crash_risk": "Race control's first notice of an on-track incident names the car during "
    "the horizon's laps (collisions, unsafe rejoins, leaving the track, spins, stopped cars), "
    "timed at the onset of the yellow/SC/VSC/red that preceded the notice by up to 60 s. "
    "Procedural notices and the stewards' follow-ups are not events; a notice naming no car "
    "is left out.",
}
DEFAULT_HORIZON_LAPS = 1
CLIFF_LOSS = 0.03
FUEL_EFFECT_S = 0.06  # lap time per lap of fuel on board (~1.7 kg/lap at ~0.035 s/kg)
CLIFF_REFERENCE_LAPS = 3
INCIDENT_LOOKBACK_S = 60.0
INCIDENT_NOTICE = re.compile(r"INCIDENT .*NOTED|SPUN|STOPPED ON TRACK|CRASH", re.IGNORECASE)
NOT_ON_TRACK = re.compile(
    r"PIT LANE|STARTING LOCATION|SERVING PENALTY|TRACK LIMIT|UNDER INVESTIGATION|REVIEWED|"
    r"PENALTY FOR|BLUE FLAG",
    re.IGNORECASE,
)
CAR_NUMBER = re.compile(r"CARS?\s+(\d+)|AND\s+(\d+)\s+\(", re.IGNORECASE)
NON_GREEN_STATUS = {"2", "4", "5", "6", "7"}  # yellow, SC, red, VSC deployed/ending


@dataclass(frozen=True)
class SideTables:
    laps: pd.DataFrame
    race_control: pd.DataFrame
    track_status: pd.DataFrame
    session_start_utc: pd.Timestamp  # date of session time 0 (t0), to place messages


def pd_events(drivers: object, times_s: object) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {"driver_number": pd.Series(drivers).astype(int).to_numpy(),
         "time_s": pd.Series(times_s).astype(float).to_numpy()}
    )  # fmt: skip


def tyre_cliffs(laps: pd.DataFrame) -> pd.DataFrame:
    """(driver_number, time_s: lap start) of cliff laps (see the module docstring)."""

    clean = laps[
        laps["LapTime"].notna()
        & laps["LapStartTime"].notna()
        & laps["PitInTime"].isna()
        & laps["PitOutTime"].isna()
        & (laps["TrackStatus"].astype("string") == "1")
        & (laps["LapNumber"] > 1)
    ].sort_values(["DriverNumber", "Stint", "LapNumber"])
    # Corrected to an empty tank: a lap later in the race carries less fuel.
    seconds = clean["LapTime"].dt.total_seconds() + FUEL_EFFECT_S * clean["LapNumber"]
    reference = seconds.groupby([clean["DriverNumber"], clean["Stint"]]).transform(
        lambda s: (
            s.shift(1).rolling(CLIFF_REFERENCE_LAPS, min_periods=CLIFF_REFERENCE_LAPS).median()
        )
    )
    cliff = clean[seconds > reference * (1 + CLIFF_LOSS)]
    return pd_events(cliff["DriverNumber"], cliff["LapStartTime"].dt.total_seconds())


def incidents(side: SideTables) -> pd.DataFrame:
    """(driver_number, time_s) of every incident race control attributes to a car."""
    import numpy as np
    import pandas as pd

    rc = side.race_control
    text = rc["Message"].astype("string").fillna("")
    chosen = rc[text.str.contains(INCIDENT_NOTICE) & ~text.str.contains(NOT_ON_TRACK)]
    rows = []
    for _, message in chosen.iterrows():  # a few dozen messages per race
        numbers = {int(a or b) for a, b in CAR_NUMBER.findall(str(message["Message"]))}
        if pd.notna(message.get("RacingNumber")):
            numbers.add(int(message["RacingNumber"]))
        at = (pd.Timestamp(message["Time"]) - side.session_start_utc).total_seconds()
        rows += [(n, at) for n in numbers]
    if not rows:
        return pd_events([], [])
    events = pd.DataFrame(rows, columns=["driver_number", "time_s"])
    status = side.track_status.assign(
        time_s=side.track_status["Time"].dt.total_seconds(),
        non_green=side.track_status["Status"].astype("string").isin(NON_GREEN_STATUS),
    )
    onsets = status.loc[status["non_green"], "time_s"].to_numpy()
    # Move each event back to the onset of a non-green status just before its message.
    earlier = np.searchsorted(onsets, events["time_s"].to_numpy(), side="right") - 1
    onset = (
        np.where(earlier >= 0, onsets[np.maximum(earlier, 0)], np.nan) if len(onsets) else np.nan
    )
    recent = (events["time_s"].to_numpy() - onset) <= INCIDENT_LOOKBACK_S
    events["time_s"] = np.where(recent, onset, events["time_s"].to_numpy())
    return events.drop_duplicates()


def lap_events(laps: pd.DataFrame, context: pd.DataFrame, side: SideTables) -> pd.DataFrame:
    """Per row of `context` (`lap_context` of `laps`, with `red_flag`): whether each
    label's event happened during that lap (LABELS columns, booleans)."""
    import numpy as np
    import pandas as pd

    start = context["lap_start"].dt.total_seconds().to_numpy()
    end = context["lap_end"].dt.total_seconds().to_numpy()
    drivers = context["driver_number"].to_numpy()

    def during(events: pd.DataFrame) -> np.ndarray:
        """Rows with an event of their car in [lap start, lap end)."""
        hit = np.zeros(len(context), dtype=bool)
        for number, times in events.groupby("driver_number")["time_s"]:
            rows = np.flatnonzero(drivers == number)
            at = np.sort(times.to_numpy(dtype=float))
            first = np.searchsorted(at, start[rows], side="left")  # first event at/after start
            after = at[np.minimum(first, len(at) - 1)]
            hit[rows] = (first < len(at)) & (after < end[rows])
        return hit

    return pd.DataFrame(
        {
            "pit_stop": context["is_in_lap"].to_numpy(dtype=bool) & ~context["red_flag"],
            "tire_failure": during(tyre_cliffs(laps)),
            "crash_risk": during(incidents(side)),
        },
        index=context.index,
    )


def lap_labels(table: pd.DataFrame, horizon_laps: int = DEFAULT_HORIZON_LAPS) -> pd.DataFrame:
    """The label columns of a lap table (its LABELS event columns): 1 when the
    event happens on this lap or one of the next `horizon_laps - 1` of the car."""
    import pandas as pd

    car_keys = [c for c in ("race", "driver_number") if c in table.columns]  # a car in a race
    ordered = table.sort_values([*car_keys, "lap_number"])
    car = ordered.groupby(car_keys)
    labels = {}
    for label in LABELS:
        hit = ordered[label].astype(bool)
        for ahead in range(1, horizon_laps):
            later = car[label].shift(-ahead).astype("boolean").fillna(False).astype(bool)
            consecutive = car["lap_number"].shift(-ahead) == ordered["lap_number"] + ahead
            hit = hit | (later & consecutive)
        labels[label] = hit.astype("int8")
    return pd.DataFrame(labels).reindex(table.index)

"""Labels from the real side tables of an export, one per model.

Each label marks a sample 1 when an event of the car starts within the next
`horizon_s` seconds of session time (strictly after the sample, at most
horizon_s later). What each event is, honestly:

- pit_stop: the car crosses the pit entry (`PitInTime` of its lap in FastF1's
  laps table). Exact, from timing.
- tire_failure: the feed has no tyre-failure signal. The proxy is a
  *degradation cliff*: a green-flag racing lap (not an in- or out-lap, track
  status all clear) slower than the median of the same stint's previous three
  such laps by more than CLIFF_LOSS (3 %). It measures a sudden loss of pace
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
    from pathlib import Path

    import numpy as np
    import pandas as pd

LABELS = ("pit_stop", "tire_failure", "crash_risk")
DEFINITIONS = {
    "pit_stop": "The car crosses the pit entry within the horizon (FastF1 laps: PitInTime). "
    "Exact, from timing.",
    "tire_failure": "Proxy: a degradation cliff starts within the horizon: a green-flag racing "
    "lap (no pit in/out, track clear) over 3 % slower than the median of the same stint's "
    "previous three such laps. Measures a sudden loss of pace in a stint; worn tyres cause it, "
    "but so do traffic and small mistakes. It does not see punctures or real failures.",
    "crash_risk": "Race control's first notice of an on-track incident names the car within "
    "the horizon (collisions, unsafe rejoins, leaving the track, spins, stopped cars), timed at "
    "the onset of the yellow/SC/VSC/red that preceded the notice by up to 60 s. Procedural "
    "notices and the stewards' follow-ups are not events; a notice naming no car is left out.",
}
DEFAULT_HORIZON_S = 60.0
CLIFF_LOSS = 0.03
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


def load_side_tables(folder: Path, samples: pd.DataFrame) -> SideTables:
    """The export's laps, race control and track status tables; t0 from the samples."""
    import pandas as pd

    first = samples.iloc[0]
    t0 = first["date"].tz_convert(None) - pd.to_timedelta(first["session_time_s"], unit="s")
    return SideTables(
        laps=pd.read_parquet(folder / "laps.parquet"),
        race_control=pd.read_parquet(folder / "race_control.parquet"),
        track_status=pd.read_parquet(folder / "track_status.parquet"),
        session_start_utc=t0,
    )


def _events_ahead(samples: pd.DataFrame, events: pd.DataFrame, horizon_s: float) -> np.ndarray:
    """1 where the car (driver_number) has an event (columns driver_number,
    time_s) in (t, t + horizon_s]."""
    import numpy as np
    import pandas as pd

    label = np.zeros(len(samples), dtype=np.int8)
    if events.empty:
        return label
    left = pd.DataFrame(
        {
            "order": np.arange(len(samples)),
            "driver_number": samples["driver_number"].astype("int64").to_numpy(),
            "t": samples["session_time_s"].to_numpy(dtype=float),
        }
    ).sort_values("t", kind="stable")
    right = (
        events.astype({"driver_number": "int64", "time_s": float})
        .sort_values("time_s")
        .rename(columns={"time_s": "t_event"})
    )
    right["t"] = right["t_event"]
    # The first event strictly after the sample: forward search, equality excluded.
    joined = pd.merge_asof(
        left, right, on="t", by="driver_number", direction="forward", allow_exact_matches=False
    )
    ahead = (joined["t_event"] - joined["t"]).to_numpy()
    label[joined["order"].to_numpy()] = (ahead <= horizon_s) & np.isfinite(ahead)
    return label


def pit_entries(laps: pd.DataFrame) -> pd.DataFrame:
    entries = laps[laps["PitInTime"].notna()]
    return pd_events(entries["DriverNumber"], entries["PitInTime"].dt.total_seconds())


def pd_events(drivers: object, times_s: object) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {"driver_number": pd.Series(drivers).astype(int).to_numpy(),
         "time_s": pd.Series(times_s).astype(float).to_numpy()}
    )  # fmt: skip


def tyre_cliffs(laps: pd.DataFrame) -> pd.DataFrame:
    """Start times of cliff laps (see the module docstring)."""

    clean = laps[
        laps["LapTime"].notna()
        & laps["LapStartTime"].notna()
        & laps["PitInTime"].isna()
        & laps["PitOutTime"].isna()
        & (laps["TrackStatus"].astype("string") == "1")
        & (laps["LapNumber"] > 1)
    ].sort_values(["DriverNumber", "Stint", "LapNumber"])
    seconds = clean["LapTime"].dt.total_seconds()
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
    onset = np.where(earlier >= 0, onsets[np.maximum(earlier, 0)], np.nan)
    recent = (events["time_s"].to_numpy() - onset) <= INCIDENT_LOOKBACK_S
    events["time_s"] = np.where(recent, onset, events["time_s"].to_numpy())
    return events.drop_duplicates()


def label_samples(
    samples: pd.DataFrame, side: SideTables, horizon_s: float = DEFAULT_HORIZON_S
) -> pd.DataFrame:
    """The three label columns for `samples` (driver_number, session_time_s)."""
    import pandas as pd

    return pd.DataFrame(
        {
            "pit_stop": _events_ahead(samples, pit_entries(side.laps), horizon_s),
            "tire_failure": _events_ahead(samples, tyre_cliffs(side.laps), horizon_s),
            "crash_risk": _events_ahead(samples, incidents(side), horizon_s),
        },
        index=samples.index,
    )

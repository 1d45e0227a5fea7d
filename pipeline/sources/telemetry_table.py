"""The telemetry table: one row per car sample, with the lap context joined by time.

By default no resampling: rows are FastF1's car-data samples as they came
(~4.17 Hz per car). Asked for a rule (e.g. "100ms"), each car is resampled with
FastF1's own `Telemetry.resample_channels` onto a shared grid, and every row that
FastF1 interpolated (Source "interpolation") is flagged `resampled`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.sources.lap_context import LAP_FIELDS, lap_context

if TYPE_CHECKING:
    import pandas as pd
    from fastf1.core import Session

CAR_CHANNELS = {
    "Speed": "speed",
    "RPM": "rpm",
    "nGear": "gear",
    "Throttle": "throttle",
    "Brake": "brake",
    "DRS": "drs",
    "Source": "source",
}


def _car_samples(session: Session, resample: str | None) -> pd.DataFrame:
    import pandas as pd

    frames = []
    for number, samples in session.car_data.items():
        if samples.empty:
            raise ValueError(
                f"driver {number} has no car data in this session; the source is incomplete, "
                "so nothing is exported (reload the session into the FastF1 cache)."
            )
        if resample:
            samples = samples.resample_channels(rule=resample)
        frame = pd.DataFrame(samples[["Date", "SessionTime", *CAR_CHANNELS]])
        frame["driver_number"] = int(number)
        frames.append(frame)
    cars: pd.DataFrame = pd.concat(frames, ignore_index=True).rename(columns=CAR_CHANNELS)
    return cars.rename(columns={"Date": "date", "SessionTime": "session_time"})


def race_laps(session: Session) -> int | None:
    """The scheduled race distance in laps (FastF1's lap count), None when unknown."""
    try:
        total = session.total_laps
    except (AttributeError, ValueError, KeyError):  # no lap count in the data
        return None
    return int(total) if total else None


def telemetry_table(session: Session, *, resample: str | None = None) -> pd.DataFrame:
    """One row per car sample: UTC date, session time, driver, team, channels, and
    the context of the lap it belongs to as known when the lap began
    (`pipeline.sources.lap_context`) and the track status at that moment. Samples
    outside any lap (before the start, after the flag) keep null lap context.
    `resample`: a pandas rule such as "100ms" to resample (rows FastF1 interpolated
    are flagged `resampled`)."""
    import pandas as pd

    cars = _car_samples(session, resample).sort_values("session_time", kind="stable")
    laps = lap_context(session.laps, race_laps(session)).sort_values("lap_start", kind="stable")
    table = pd.merge_asof(
        cars, laps, left_on="session_time", right_on="lap_start", by="driver_number",
        direction="backward",
    )  # fmt: skip
    # A sample after its last lap ended belongs to no lap (e.g. after the flag).
    outside = table["lap_end"].notna() & (table["session_time"] > table["lap_end"])
    lap_columns = [f for f in LAP_FIELDS if f not in ("is_in_lap", "is_out_lap")]
    table.loc[outside, lap_columns] = None
    table.loc[outside, ["is_in_lap", "is_out_lap"]] = False
    for flag in ("is_in_lap", "is_out_lap"):  # no lap: not an in- or out-lap
        table[flag] = table[flag].astype("boolean").fillna(False).astype(bool)

    status = session.track_status[["Time", "Status"]].rename(
        columns={"Time": "session_time", "Status": "track_status"}
    )
    table = pd.merge_asof(table, status.sort_values("session_time"), on="session_time")

    drivers = session.results[["DriverNumber", "Abbreviation", "TeamName"]].copy()
    drivers["driver_number"] = drivers.pop("DriverNumber").astype(int)
    table = table.merge(
        drivers.rename(columns={"Abbreviation": "driver", "TeamName": "team"}),
        on="driver_number", how="left", validate="many_to_one",
    )  # fmt: skip
    table["date"] = table["date"].dt.tz_localize("UTC")
    table["session_time_s"] = table.pop("session_time").dt.total_seconds()
    table["resampled"] = table["source"].eq("interpolation").to_numpy()
    columns = [
        "date", "session_time_s", "driver_number", "driver", "team", *CAR_CHANNELS.values(),
        *LAP_FIELDS, "track_status", "resampled",
    ]  # fmt: skip
    return (
        table[columns]
        .astype(
            {
                "lap_number": "Int16",
                "stint": "Int8",
                "position": "Int8",
                "race_laps": "Int16",
                "gear": "int16",
            }
        )
        .sort_values(["driver_number", "session_time_s"], kind="stable")
        .reset_index(drop=True)
    )


def frequency_report(table: pd.DataFrame, *, gap_s: float = 1.0) -> pd.DataFrame:
    """Per driver and channel: samples, median interval, mean rate, gaps over `gap_s`.
    All car channels share FastF1's car-data timestamps, so they share one row."""
    import pandas as pd

    step = table.groupby("driver_number")["session_time_s"].diff()
    per_driver = pd.DataFrame({"driver_number": table["driver_number"], "step": step})
    grouped = per_driver.groupby("driver_number")["step"]
    span = table.groupby("driver_number")["session_time_s"].agg(lambda s: s.max() - s.min())
    report = pd.DataFrame(
        {
            "channel": "car_data",
            "samples": table.groupby("driver_number").size(),
            "median_interval_s": grouped.median(),
            "mean_rate_hz": (table.groupby("driver_number").size() - 1) / span,
            "gaps_over_1s": grouped.apply(lambda s: int((s > gap_s).sum())),
        }
    )
    return report.reset_index()

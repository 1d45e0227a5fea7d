"""Model features: one implementation for training and for the stream.

Features of a sample use only the sample and its car's previous samples
(causal), over the last WINDOW samples (~5 s at 4 Hz). Training computes them
per car over a whole race; the consumer computes them per car over each batch,
prefixed by the car's last WINDOW samples kept in its state. The rolling
windows see the same samples either way, so the features are identical
(tests/unit/test_features.py feeds the same race through both paths).

Left out on purpose: `is_in_lap`. In the export it comes from the lap's
pit-in time, which is only known when the car reaches the pit entry, so it
would hand the pit-stop model its answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

WINDOW = 20
HISTORY_CHANNELS = ("speed", "rpm", "throttle", "brake", "gear")
COMPOUNDS = {"SOFT": 0, "MEDIUM": 1, "HARD": 2, "INTERMEDIATE": 3, "WET": 4}

FEATURES = (
    "speed", "rpm", "gear", "throttle", "brake", "drs_open",
    "lap_number", "stint", "tyre_life", "position", "is_out_lap", "compound_code",
    "track_status_code",
    "speed_mean_5s", "speed_min_5s", "speed_max_5s", "rpm_mean_5s", "throttle_mean_5s",
    "brake_share_5s", "gear_changes_5s", "speed_change", "lap_elapsed_s",
)  # fmt: skip

History = dict[str, list[float]]  # per channel; "lap" holds [lap number, its first time]


def _rolling(values: np.ndarray, reducer: str) -> np.ndarray:
    """Causal rolling reduction over WINDOW values (fewer at the very start).
    `values` are the car's history followed by its new samples."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.concatenate((np.full(WINDOW - 1, np.nan), values.astype(float)))
    windows = sliding_window_view(padded, WINDOW)
    return getattr(np, f"nan{reducer}")(windows, axis=1)  # type: ignore[no-any-return]


def car_features(car: pd.DataFrame, history: History | None = None) -> tuple[pd.DataFrame, History]:
    """Features of one car's samples (in order), given the samples before them
    (`history`: the last WINDOW values per channel, or None at the start).
    Returns the features and the history for the next call."""
    import numpy as np
    import pandas as pd

    history = history or {**{c: [] for c in HISTORY_CHANNELS}, "lap": []}
    kept = len(history["speed"])
    full = {c: np.concatenate((np.asarray(history[c], dtype=float), car[c].to_numpy(dtype=float)))
            for c in HISTORY_CHANNELS}  # fmt: skip
    new = slice(kept, None)
    gear = full["gear"]
    # The oldest history value's change is unknown, but no window of a new
    # sample reaches it: the history holds WINDOW values, windows reach back WINDOW - 1.
    changed = np.concatenate(([0.0], (gear[1:] != gear[:-1]).astype(float)))
    speed = full["speed"]
    speed_change = np.concatenate(([0.0], np.diff(speed)))
    compound = car["compound"].astype("string").str.upper().map(COMPOUNDS)
    status = pd.to_numeric(car["track_status"].astype("string").str[:1], errors="coerce")
    lap_elapsed, lap_state = _lap_elapsed(car, history["lap"])
    features = pd.DataFrame(
        {
            "speed": car["speed"].to_numpy(dtype=float),
            "rpm": car["rpm"].to_numpy(dtype=float),
            "gear": car["gear"].to_numpy(dtype=float),
            "throttle": car["throttle"].to_numpy(dtype=float),
            "brake": car["brake"].to_numpy(dtype=float),
            "drs_open": car["drs_open"].to_numpy(dtype=float),
            "lap_number": pd.to_numeric(car["lap_number"], errors="coerce").to_numpy(dtype=float),
            "stint": pd.to_numeric(car["stint"], errors="coerce").to_numpy(dtype=float),
            "tyre_life": pd.to_numeric(car["tyre_life"], errors="coerce").to_numpy(dtype=float),
            "position": pd.to_numeric(car["position"], errors="coerce").to_numpy(dtype=float),
            "is_out_lap": car["is_out_lap"].to_numpy(dtype=float),
            "compound_code": compound.to_numpy(dtype=float, na_value=np.nan),
            "track_status_code": status.to_numpy(dtype=float, na_value=np.nan),
            "speed_mean_5s": _rolling(speed, "mean")[new],
            "speed_min_5s": _rolling(speed, "min")[new],
            "speed_max_5s": _rolling(speed, "max")[new],
            "rpm_mean_5s": _rolling(full["rpm"], "mean")[new],
            "throttle_mean_5s": _rolling(full["throttle"], "mean")[new],
            "brake_share_5s": _rolling((full["brake"] >= 50).astype(float), "mean")[new],
            "gear_changes_5s": _rolling(changed, "sum")[new],
            "speed_change": speed_change[new],
            "lap_elapsed_s": lap_elapsed,
        },
        index=car.index,
    )
    next_history = {**{c: full[c][-WINDOW:].tolist() for c in HISTORY_CHANNELS}, "lap": lap_state}
    return features[list(FEATURES)], next_history


def _lap_elapsed(car: pd.DataFrame, lap_state: list[float]) -> tuple[np.ndarray, list[float]]:
    """Seconds since the car's first sample of its current lap (NaN outside laps):
    how far into the lap it is, which the position data would have told."""
    import numpy as np
    import pandas as pd

    lap = pd.to_numeric(car["lap_number"], errors="coerce").to_numpy(dtype=float)
    times = car["session_time_s"].to_numpy(dtype=float)
    previous = np.concatenate(([lap_state[0] if lap_state else np.nan], lap[:-1]))
    starts = ~((lap == previous) | (np.isnan(lap) & np.isnan(previous)))
    start_time = np.where(starts, times, np.nan)
    if not starts[0] and lap_state:
        start_time[0] = lap_state[1]
    start_time = pd.Series(start_time).ffill().to_numpy()
    elapsed = np.where(np.isnan(lap), np.nan, times - start_time)
    return elapsed, [float(lap[-1]), float(start_time[-1])] if len(lap) else lap_state


def race_features(samples: pd.DataFrame) -> pd.DataFrame:
    """Features of a whole race (the training path): each car from its start."""
    import pandas as pd

    parts = [car_features(car)[0] for _, car in samples.groupby("driver_number", sort=False)]
    return pd.concat(parts).loc[samples.index]

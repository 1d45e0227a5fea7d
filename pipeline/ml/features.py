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

from collections.abc import Sequence
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


def _sample_features(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Features of each sample alone, vectorized over the whole frame."""
    import numpy as np
    import pandas as pd

    def numeric(column: str) -> np.ndarray:
        values = pd.to_numeric(frame[column], errors="coerce")
        return np.asarray(values.to_numpy(dtype=float, na_value=np.nan))

    compound = frame["compound"].astype("string").str.upper().map(COMPOUNDS)
    status = pd.to_numeric(frame["track_status"].astype("string").str[:1], errors="coerce")
    return {
        **{
            c: numeric(c)
            for c in (
                "speed",
                "rpm",
                "gear",
                "throttle",
                "brake",
                "lap_number",
                "stint",
                "tyre_life",
                "position",
            )
        },
        "drs_open": frame["drs_open"].to_numpy(dtype=float),
        "is_out_lap": frame["is_out_lap"].to_numpy(dtype=float),
        "compound_code": compound.to_numpy(dtype=float, na_value=np.nan),
        "track_status_code": status.to_numpy(dtype=float, na_value=np.nan),
        "session_time_s": frame["session_time_s"].to_numpy(dtype=float),
    }


def _car_rolling(
    values: dict[str, np.ndarray], history: History | None
) -> tuple[dict[str, np.ndarray], History]:
    """The history-dependent features of one car's new samples (numpy only)."""
    import numpy as np

    history = history or {**{c: [] for c in HISTORY_CHANNELS}, "lap": []}
    kept = len(history["speed"])
    full = {c: np.concatenate((np.asarray(history[c], dtype=float), values[c]))
            for c in HISTORY_CHANNELS}  # fmt: skip
    new = slice(kept, None)
    gear = full["gear"]
    # The oldest history value's change is unknown, but no window of a new
    # sample reaches it: the history holds WINDOW values, windows reach back WINDOW - 1.
    changed = np.concatenate(([0.0], (gear[1:] != gear[:-1]).astype(float)))
    speed = full["speed"]
    lap_elapsed, lap_state = _lap_elapsed(values["lap_number"], values["session_time_s"],
                                          history["lap"])  # fmt: skip
    rolled = {
        "speed_mean_5s": _rolling(speed, "mean")[new],
        "speed_min_5s": _rolling(speed, "min")[new],
        "speed_max_5s": _rolling(speed, "max")[new],
        "rpm_mean_5s": _rolling(full["rpm"], "mean")[new],
        "throttle_mean_5s": _rolling(full["throttle"], "mean")[new],
        "brake_share_5s": _rolling((full["brake"] >= 50).astype(float), "mean")[new],
        "gear_changes_5s": _rolling(changed, "sum")[new],
        "speed_change": np.concatenate(([0.0], np.diff(speed)))[new],
        "lap_elapsed_s": lap_elapsed,
    }
    next_history = {**{c: full[c][-WINDOW:].tolist() for c in HISTORY_CHANNELS}, "lap": lap_state}
    return rolled, next_history


def batch_features(
    frame: pd.DataFrame, cars: Sequence[tuple[np.ndarray, History | None]]
) -> tuple[pd.DataFrame, list[History]]:
    """Features of the rows of `frame` listed per car (`cars`: each car's row
    positions in order, with its history). Per-sample features are computed
    once for the frame; only the rolling part runs per car. Returns the
    features (indexed by row position) and each car's next history."""
    import numpy as np
    import pandas as pd

    sample = _sample_features(frame)
    columns = {name: np.full(len(frame), np.nan) for name in FEATURES}
    for name in FEATURES:
        if name in sample:
            columns[name] = sample[name]
    histories = []
    for rows, history in cars:
        rolled, next_history = _car_rolling({k: v[rows] for k, v in sample.items()}, history)
        for name, values in rolled.items():
            columns[name][rows] = values
        histories.append(next_history)
    chosen = np.concatenate([rows for rows, _ in cars]) if cars else np.array([], dtype=int)
    features = pd.DataFrame({name: columns[name][chosen] for name in FEATURES}, index=chosen)
    return features, histories


def car_features(car: pd.DataFrame, history: History | None = None) -> tuple[pd.DataFrame, History]:
    """Features of one car's samples (in order), given the samples before them
    (`history`: the last WINDOW values per channel, or None at the start).
    Returns the features (indexed like `car`) and the history for the next call."""
    import numpy as np

    features, [next_history] = batch_features(car, [(np.arange(len(car)), history)])
    return features.set_axis(car.index), next_history


def _lap_elapsed(
    lap: np.ndarray, times: np.ndarray, lap_state: list[float]
) -> tuple[np.ndarray, list[float]]:
    """Seconds since the car's first sample of its current lap (NaN outside laps):
    how far into the lap it is, which the position data would have told."""
    import numpy as np

    previous = np.concatenate(([lap_state[0] if lap_state else np.nan], lap[:-1]))
    starts = ~((lap == previous) | (np.isnan(lap) & np.isnan(previous)))
    start_time = np.where(starts, times, np.nan)
    if len(lap) and not starts[0] and lap_state:
        start_time[0] = lap_state[1]
    known = np.where(~np.isnan(start_time), np.arange(len(start_time)), 0)
    start_time = start_time[np.maximum.accumulate(known)] if len(lap) else start_time  # ffill
    elapsed = np.where(np.isnan(lap), np.nan, times - start_time)
    return elapsed, [float(lap[-1]), float(start_time[-1])] if len(lap) else lap_state


def race_features(samples: pd.DataFrame) -> pd.DataFrame:
    """Features of a whole race (the training path): each car from its start."""
    import numpy as np

    positions = np.arange(len(samples))
    driver = samples["driver_number"].to_numpy()
    cars = [(positions[driver == number], None) for number in dict.fromkeys(driver.tolist())]
    features, _ = batch_features(samples, cars)
    return features.sort_index().set_axis(samples.index)

"""Model features: lap-level, one implementation for training and for the stream.

A sample's features are those of the lap it is in, computed from what the
feed had delivered when the lap began: the lap context every message carries
(`pipeline.sources.lap_context`: tyres, stint, the previous lap's time, place
and gap, the race distance), the track status at the lap's first sample, and
the car's earlier laps of the same stint (pace against the stint's best, the
trend over its last three laps). Nothing a lap only reveals at its end (the
in-lap flag, the lap's own time or finishing place) is an input, so every
feature of a sample at time t uses only what was known by t
(tests/unit/test_features.py cuts real races at random instants to prove it).

Why lap-level: the pit, tyre and incident calls are lap-level decisions, and
lap timing exists for every race of 2021-2024 (`pipeline.ml.laps`), while car
telemetry exists for three. Training reads one row per lap (`lap_table_features`);
the stream gives each sample its lap's row, computed once, when the car's first
sample of the lap arrives (`batch_features`, state kept per car across batches
and restarts). Both call `_lap_row`, so they agree by construction; the tests
check it on whole races through the consumer's code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.processing.columns import Columns

COMPOUNDS = {"SOFT": 0, "MEDIUM": 1, "HARD": 2, "INTERMEDIATE": 3, "WET": 4}
RED_FLAG = 5.0  # FastF1 track status: the race is stopped (not a racing lap)

# Feature groups: what the ablation in the model card removes one at a time.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "tyres": ("stint", "tyre_life", "compound_code", "is_out_lap"),
    "race": ("lap_number", "laps_remaining", "race_progress"),
    "pace": ("last_lap_s", "pace_vs_stint_best", "pace_trend_3"),
    "order": ("position", "gap_ahead_s"),
    "track": ("track_status_code",),
}
FEATURES: tuple[str, ...] = tuple(f for group in FEATURE_GROUPS.values() for f in group)

# The lap row: the fields of a lap's first sample (or of the lap table) features come from.
ROW_FIELDS = (
    "lap_number", "stint", "compound_code", "tyre_life", "position", "last_lap_s",
    "gap_ahead_s", "race_laps", "is_out_lap", "track_status_code",
)  # fmt: skip
# A stint's first two rows carry the in-lap of the stint before and the out-lap (or
# lap 1's standing start): not laps to judge the stint's pace by.
UNREPRESENTATIVE_ROWS = 2

History = dict[str, list[float]]  # a car's state: see `_lap_row`


def row_fields(frame: pd.DataFrame | Columns) -> dict[str, np.ndarray]:
    """ROW_FIELDS of every row of `frame` (messages' columns, or the lap table's) as
    floats. Plain Python over the text columns, not pandas string methods: those
    cost more than the rest of a small stream batch."""
    import numpy as np

    fields = {
        c: _numeric(frame, c)
        for c in ("lap_number", "stint", "tyre_life", "position", "last_lap_s", "gap_ahead_s",
                  "race_laps")
    }  # fmt: skip
    fields["is_out_lap"] = np.asarray(frame["is_out_lap"], dtype=float)
    texts = np.asarray(frame["compound"], dtype=object)
    fields["compound_code"] = np.array([_compound_code(v) for v in texts], dtype=float)
    statuses = np.asarray(frame["track_status"], dtype=object)
    fields["track_status_code"] = np.array([_status_code(v) for v in statuses], dtype=float)
    return fields


def _numeric(frame: pd.DataFrame | Columns, column: str) -> np.ndarray:
    """A column as floats (NaN where missing or not a number)."""
    import numpy as np
    import pandas as pd

    values = frame[column]
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        return values.astype(float)  # the stream's columns are typed already
    numbers = pd.to_numeric(pd.Series(values), errors="coerce")
    return np.asarray(numbers.to_numpy(dtype=float, na_value=np.nan))


def _compound_code(value: object) -> float:
    return float(COMPOUNDS.get(value.upper(), math.nan)) if isinstance(value, str) else math.nan


_DIGITS = frozenset("0123456789")


def _status_code(value: object) -> float:
    """FastF1's track status holds the current status first (e.g. "12"): its first digit."""
    import pandas as pd

    if not isinstance(value, str):
        if value is None or bool(pd.isna(value)):  # type: ignore[call-overload]
            return math.nan
        value = str(value)
    first = value[:1]
    return float(first) if first in _DIGITS else math.nan


def _lap_row(row: Sequence[float], history: History) -> list[float]:
    """The features of one lap (`row`: ROW_FIELDS values) given the car's earlier
    laps; updates `history` in place: `stint`, `rows` (the stint's rows so far),
    `times` (its representative lap times), `lap` (this lap's number) and
    `current` (this lap's features, for the samples that follow)."""
    values = dict(zip(ROW_FIELDS, map(float, row), strict=True))  # plain floats: state is msgpack
    stint = values["stint"]
    if history.get("stint") != [stint]:
        history.update(stint=[stint], rows=[0.0], times=[])
    in_stint = int(history["rows"][0])
    history["rows"] = [in_stint + 1.0]
    last = values["last_lap_s"]
    times = history["times"]
    representative = in_stint >= UNREPRESENTATIVE_ROWS and math.isfinite(last)
    trend = last - sorted(times[-3:])[1] if representative and len(times) >= 3 else math.nan
    if representative:
        times.append(last)
        del times[:-50]  # bounded: a stint's best lies among its recent laps anyway
    best = min(times) if representative else math.nan
    laps, total = values["lap_number"], values["race_laps"]
    features = {
        "stint": stint,
        "tyre_life": values["tyre_life"],
        "compound_code": values["compound_code"],
        "is_out_lap": values["is_out_lap"],
        "lap_number": laps,
        "laps_remaining": total - laps,
        "race_progress": laps / total if total else math.nan,
        "last_lap_s": last,
        "pace_vs_stint_best": last / best - 1 if representative else math.nan,
        "pace_trend_3": trend,
        "position": values["position"],
        "gap_ahead_s": values["gap_ahead_s"],
        "track_status_code": values["track_status_code"],
    }
    history["current"] = [float(features[f]) for f in FEATURES]
    return history["current"]


def _fresh_history(history: History | None) -> History:
    # `lap`: the highest lap seen. A state written by an older feature set starts afresh.
    return history if history and "current" in history else {"lap": [math.nan]}


def batch_features(
    frame: pd.DataFrame | Columns, cars: Sequence[tuple[np.ndarray, History | None]]
) -> tuple[pd.DataFrame, list[History]]:
    """Features of the rows of `frame` listed per car (`cars`: each car's row
    positions in arrival order, one or more, with its state). A lap's features
    are computed at its first sample, only there (a handful per batch); the
    lap's other samples take them over. Samples outside a lap get none (NaN).
    Returns the features (indexed by row position) and each car's next state."""
    import numpy as np
    import pandas as pd

    from pipeline.processing.columns import running_max_before

    histories = [_fresh_history(previous) for _, previous in cars]
    if not cars:
        return pd.DataFrame(np.zeros((0, len(FEATURES))), columns=list(FEATURES)), histories
    rows = np.concatenate([car_rows for car_rows, _ in cars])
    counts = [len(car_rows) for car_rows, _ in cars]
    car_starts = np.cumsum([0, *counts[:-1]], dtype=np.int64)
    car = np.repeat(np.arange(len(cars)), counts)
    # Lap numbers are counts: -1 stands for none (a sample outside a lap, or no lap seen).
    laps = _numeric(frame, "lap_number")[rows]
    lap_or_none = np.where(np.isnan(laps), -1, laps).astype(np.int64)
    seen = np.array([-1 if math.isnan(h["lap"][0]) else h["lap"][0] for h in histories], np.int64)
    # A lap starts at the first sample past the highest lap seen; a straggler from
    # an earlier lap takes the current lap's features (it cannot go back).
    seen_before, newest = running_max_before(lap_or_none, car_starts, seen)
    starts = lap_or_none > seen_before
    # The lap rows' fields only where laps start (a handful per batch): reading
    # the text fields takes Python per row, a tenth of composing a whole batch.
    fields = row_fields(_rows_of(frame, rows[starts]))
    matrix = iter(np.column_stack([fields[f] for f in ROW_FIELDS]).tolist() if starts.any() else [])
    # Each car's lap rows: the lap it was in, then each lap starting here, in order.
    lap_rows: list[list[float]] = []
    first_lap_row = []
    for history, started in zip(
        histories, np.bincount(car[starts], minlength=len(cars)).tolist(), strict=True
    ):
        first_lap_row.append(len(lap_rows))
        lap_rows.append(history.get("current", [math.nan] * len(FEATURES)))
        lap_rows += [list(_lap_row(next(matrix), history)) for _ in range(started)]
    # A sample's lap row: its car's first, one further per lap started up to it.
    started_so_far = np.cumsum(starts)
    before_car: np.ndarray = started_so_far[car_starts] - starts[car_starts]
    which = np.asarray(first_lap_row, dtype=np.int64)[car] + started_so_far - before_car[car]
    out = np.asarray(lap_rows, dtype=float).reshape(-1, len(FEATURES))[which]
    out[np.isnan(laps)] = np.nan
    for history, lap in zip(histories, newest.tolist(), strict=True):
        history["lap"] = [math.nan if lap < 0 else float(lap)]
    features = pd.DataFrame(out, columns=list(FEATURES), index=rows)
    return features, histories


def _rows_of(frame: pd.DataFrame | Columns, at: np.ndarray) -> pd.DataFrame | Columns:
    """The rows of `frame` at positions `at` (`row_fields` reads either kind)."""
    return frame.iloc[at] if hasattr(frame, "iloc") else frame.take(at)


def race_features(samples: pd.DataFrame) -> pd.DataFrame:
    """Features of a whole race of samples (each car from its start), indexed like `samples`."""
    import numpy as np

    positions = np.arange(len(samples))
    driver = samples["driver_number"].to_numpy()
    cars = [(positions[driver == number], None) for number in dict.fromkeys(driver.tolist())]
    features, _ = batch_features(samples, cars)
    return features.sort_index().set_axis(samples.index)


def lap_table_features(laps: pd.DataFrame) -> pd.DataFrame:
    """Features of a lap table (one row per lap: race, driver_number and the lap
    context columns, with the track status at the lap's start), indexed like `laps`."""
    import numpy as np
    import pandas as pd

    fields = row_fields(laps)
    matrix = np.column_stack([fields[f] for f in ROW_FIELDS])
    out = np.full((len(laps), len(FEATURES)), np.nan)
    car_keys = [c for c in ("race", "driver_number") if c in laps.columns]  # one car in one race
    order = laps.assign(_at=np.arange(len(laps))).sort_values([*car_keys, "lap_number"])
    for _, car in order.groupby(car_keys, sort=False):
        history = _fresh_history(None)
        for at in car["_at"].to_numpy():
            out[at] = _lap_row(matrix[at], history)
    return pd.DataFrame(out, columns=list(FEATURES), index=laps.index)


def in_domain(features: pd.DataFrame) -> np.ndarray:
    """Samples the models were trained for: inside a racing lap. The grid, the
    garage, the parade after the flag (no lap) and a stopped race are not."""
    import numpy as np

    laps = features["lap_number"].to_numpy()
    status = features["track_status_code"].to_numpy()
    return np.asarray(~np.isnan(laps) & (status != RED_FLAG))

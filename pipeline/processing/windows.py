"""3-second tumbling windows per car on event time, with a watermark.

A car's watermark is the latest event time seen for it minus the allowed
lateness. A window [start, start + W) closes, and is written once, when the
watermark passes its end. A sample whose window has already closed is late: it
is stored with `is_late` and counted, never folded into a written window.
Windows are aligned on the UTC epoch, so any process recomputes the same ones.

Partial aggregates survive batch boundaries (and restarts: they are part of the
state stored with the offsets), so a window spanning two batches is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.processing.columns import Columns

WINDOW_COLUMNS = (
    "samples", "speed_min", "speed_avg", "speed_max", "rpm_min", "rpm_avg", "rpm_max",
    "throttle_full_share", "brake_share", "gear_changes", "drs_open_share",
)  # fmt: skip


class WindowPartial(msgspec.Struct, array_like=True):
    """Running aggregate of one car's window (mergeable across batches)."""

    start_us: int
    samples: int
    speed_sum: float
    speed_min: float
    speed_max: float
    rpm_sum: float
    rpm_min: float
    rpm_max: float
    throttle_full: int
    brake_on: int
    drs_open: int
    gear_changes: int
    first_gear: int
    last_gear: int

    def merge(self, later: WindowPartial) -> None:
        """Fold in the same window's samples that arrived after these."""
        self.gear_changes += later.gear_changes + int(self.last_gear != later.first_gear)
        self.samples += later.samples
        self.speed_sum += later.speed_sum
        self.speed_min = min(self.speed_min, later.speed_min)
        self.speed_max = max(self.speed_max, later.speed_max)
        self.rpm_sum += later.rpm_sum
        self.rpm_min = min(self.rpm_min, later.rpm_min)
        self.rpm_max = max(self.rpm_max, later.rpm_max)
        self.throttle_full += later.throttle_full
        self.brake_on += later.brake_on
        self.drs_open += later.drs_open
        self.last_gear = later.last_gear

    def row(self, window_us: int) -> dict[str, float | int]:
        n = self.samples
        return {
            "window_start_us": self.start_us,
            "window_end_us": self.start_us + window_us,
            "samples": n,
            "speed_min": self.speed_min,
            "speed_avg": self.speed_sum / n,
            "speed_max": self.speed_max,
            "rpm_min": self.rpm_min,
            "rpm_avg": self.rpm_sum / n,
            "rpm_max": self.rpm_max,
            "throttle_full_share": self.throttle_full / n,
            "brake_share": self.brake_on / n,
            "gear_changes": self.gear_changes,
            "drs_open_share": self.drs_open / n,
        }


def window_starts(date_us: np.ndarray, window_us: int) -> np.ndarray:
    return (date_us // window_us) * window_us


def partials(samples: pd.DataFrame | Columns, window_us: int) -> dict[int, list[WindowPartial]]:
    """Aggregate on-time samples per car (its `car_group`) and window. `samples` is
    grouped by partition and car (`car_group`, a number per group), each car's
    rows in arrival order.

    Plain numpy over the batch (a sort, bincount and reduceat): pandas' groupby
    cost several milliseconds per batch whatever its size, most of a consumer's
    work at 1x, where a batch is one burst of ~20 samples."""
    import numpy as np

    if samples.empty:
        return {}
    start = window_starts(np.asarray(samples["date_us"]), window_us)
    group = np.asarray(samples["car_group"])
    new_car = np.ones(len(samples), dtype=bool)
    new_car[1:] = group[1:] != group[:-1]
    car_code = np.cumsum(new_car) - 1  # rows are grouped by (partition, car)
    window_index = start // window_us
    key = car_code * (2**31) + (window_index - window_index.min())
    groups, inverse = np.unique(key, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # each group's rows in arrival order
    bounds = np.flatnonzero(np.diff(inverse[order], prepend=-1))
    last = np.append(bounds[1:], len(order)) - 1

    gear = np.asarray(samples["gear"])
    throttle = np.asarray(samples["throttle"])
    # A gear change counts between consecutive samples of the same car and window.
    changed = np.zeros(len(samples), dtype=np.int64)
    changed[1:] = (gear[1:] != gear[:-1]) & (start[1:] == start[:-1]) & ~new_car[1:]
    speed = np.asarray(samples["speed"], dtype=float)
    rpm = np.asarray(samples["rpm"], dtype=float)

    def total(values: np.ndarray) -> list[float]:
        sums: list[float] = np.bincount(inverse, weights=values, minlength=len(groups)).tolist()
        return sums

    def reduced(ufunc: np.ufunc, values: np.ndarray) -> list[float]:
        extremes: list[float] = ufunc.reduceat(values[order], bounds).tolist()
        return extremes

    columns = [
        np.bincount(inverse, minlength=len(groups)).tolist(),
        total(speed), reduced(np.minimum, speed), reduced(np.maximum, speed),
        total(rpm), reduced(np.minimum, rpm), reduced(np.maximum, rpm),
        [round(x) for x in total(((throttle >= 99) & (throttle <= 100)).astype(float))],
        [round(x) for x in total((np.asarray(samples["brake"]) >= 50).astype(float))],
        [round(x) for x in total(np.asarray(samples["drs_open"]).astype(float))],
        [round(x) for x in total(changed.astype(float))],
        gear[order[bounds]].tolist(), gear[order[last]].tolist(),
    ]  # fmt: skip
    first_row = order[bounds]
    by_car: dict[int, list[WindowPartial]] = {}
    for i, row in enumerate(first_row.tolist()):
        by_car.setdefault(int(group[row]), []).append(
            WindowPartial(int(start[row]), *(column[i] for column in columns))
        )
    return by_car

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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.processing.columns import Columns


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


def window_starts(date_us: np.ndarray, window_us: int) -> np.ndarray:
    return (date_us // window_us) * window_us


def partials(samples: pd.DataFrame | Columns, window_us: int) -> Columns:
    """Aggregate on-time samples per car (its `car_group`) and window: one row per
    (car, window), its `car_group` and WindowPartial's fields, by car then start.
    `samples` is grouped by partition and car (`car_group`, a number per group),
    each car's rows in arrival order.

    Plain numpy over the batch (a sort, bincount and reduceat): pandas' groupby
    cost several milliseconds per batch whatever its size, most of a consumer's
    work at 1x, where a batch is one burst of ~20 samples. Columns, not a
    WindowPartial per window: a batch of 5,000 samples holds ~400 windows, and
    objects for them were a quarter of the batch's processing."""
    import numpy as np

    from pipeline.processing.columns import Columns

    if samples.empty:
        return from_partials([], np.zeros(0, dtype=np.int64))
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
    changed = np.zeros(len(samples), dtype=bool)
    changed[1:] = (gear[1:] != gear[:-1]) & (start[1:] == start[:-1]) & ~new_car[1:]
    speed = np.asarray(samples["speed"], dtype=float)
    rpm = np.asarray(samples["rpm"], dtype=float)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=values, minlength=len(groups))

    def count(where: np.ndarray) -> np.ndarray:
        return np.bincount(inverse[where], minlength=len(groups))

    def reduced(ufunc: np.ufunc, values: np.ndarray) -> np.ndarray:
        return ufunc.reduceat(values[order], bounds)

    first_row = order[bounds]
    columns = {
        "car_group": group[first_row],
        "start_us": start[first_row],
        "samples": np.bincount(inverse, minlength=len(groups)),
        "speed_sum": total(speed), "speed_min": reduced(np.minimum, speed),
        "speed_max": reduced(np.maximum, speed),
        "rpm_sum": total(rpm), "rpm_min": reduced(np.minimum, rpm),
        "rpm_max": reduced(np.maximum, rpm),
        "throttle_full": count((throttle >= 99) & (throttle <= 100)),
        "brake_on": count(np.asarray(samples["brake"]) >= 50),
        "drs_open": count(np.asarray(samples["drs_open"], dtype=bool)),
        "gear_changes": count(changed),
        "first_gear": gear[first_row], "last_gear": gear[order[last]],
    }  # fmt: skip
    return Columns(columns, len(groups))


def partial_fields(windows: Columns) -> list[list[Any]]:
    """`partials`' WindowPartial fields as lists, for `partial`: made once per
    batch, as reading numpy scalars one by one cost more than the list of all."""
    return [windows[name].tolist() for name in PARTIAL_FIELDS]


def partial(fields: list[list[Any]], row: int) -> WindowPartial:
    """One row of `partials` (its `partial_fields`) as the WindowPartial a car's
    state keeps open."""
    return WindowPartial(*(column[row] for column in fields))


def from_partials(windows: Sequence[WindowPartial], car_group: np.ndarray) -> Columns:
    """WindowPartials (a car's state's) as `partials` columns, with their `car_group`."""
    import numpy as np

    from pipeline.processing.columns import Columns

    rows = [msgspec.structs.astuple(w) for w in windows]
    columns = {"car_group": np.asarray(car_group, dtype=np.int64)}
    for i, name in enumerate(PARTIAL_FIELDS):
        columns[name] = np.array([row[i] for row in rows], dtype=PARTIAL_DTYPES[name])
    return Columns(columns, len(windows))


def table_rows(windows: Columns, window_us: int) -> dict[str, np.ndarray]:
    """`partials` columns as the window table's aggregates (shares, averages)."""
    n = windows["samples"]
    start = windows["start_us"]
    return {
        "window_start_us": start,
        "window_end_us": start + window_us,
        "samples": n,
        "speed_min": windows["speed_min"],
        "speed_avg": windows["speed_sum"] / n,
        "speed_max": windows["speed_max"],
        "rpm_min": windows["rpm_min"],
        "rpm_avg": windows["rpm_sum"] / n,
        "rpm_max": windows["rpm_max"],
        "throttle_full_share": windows["throttle_full"] / n,
        "brake_share": windows["brake_on"] / n,
        "gear_changes": windows["gear_changes"],
        "drs_open_share": windows["drs_open"] / n,
    }


PARTIAL_FIELDS: tuple[str, ...] = WindowPartial.__struct_fields__
PARTIAL_DTYPES = {
    name: "float64" if name.endswith(("_sum", "_min", "_max")) else "int64"
    for name in PARTIAL_FIELDS
}

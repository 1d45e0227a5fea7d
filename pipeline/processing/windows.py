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


def partials(samples: pd.DataFrame, window_us: int) -> dict[tuple[int, str], list[WindowPartial]]:
    """Aggregate on-time samples per (partition, car) and window. `samples` is
    grouped by partition and car, each car's rows in arrival order."""
    import numpy as np

    start = window_starts(samples["date_us"].to_numpy(), window_us)
    car = (samples["car"] + "@" + samples["partition"].astype(str)).to_numpy()
    gear = samples["gear"].to_numpy()
    throttle = samples["throttle"].to_numpy()
    # A gear change counts between consecutive samples of the same car and window.
    changed = np.zeros(len(samples), dtype=np.int64)
    changed[1:] = (gear[1:] != gear[:-1]) & (start[1:] == start[:-1]) & (car[1:] == car[:-1])
    frame = samples.assign(
        start=start,
        changed=changed,
        throttle_full=(throttle >= 99) & (throttle <= 100),
        brake_on=samples["brake"].to_numpy() >= 50,
    )
    agg = frame.groupby(["partition", "car", "start"], sort=False).agg(
        samples=("speed", "size"),
        speed_sum=("speed", "sum"), speed_min=("speed", "min"), speed_max=("speed", "max"),
        rpm_sum=("rpm", "sum"), rpm_min=("rpm", "min"), rpm_max=("rpm", "max"),
        throttle_full=("throttle_full", "sum"), brake_on=("brake_on", "sum"),
        drs_open=("drs_open", "sum"), gear_changes=("changed", "sum"),
        first_gear=("gear", "first"), last_gear=("gear", "last"),
    )  # fmt: skip
    by_car: dict[tuple[int, str], list[WindowPartial]] = {}
    columns = [agg[c].tolist() for c in agg.columns]  # tolist: plain Python numbers
    for i, (partition, car_key, start_us) in enumerate(agg.index):
        by_car.setdefault((int(partition), car_key), []).append(
            WindowPartial(int(start_us), *(column[i] for column in columns))
        )
    return by_car

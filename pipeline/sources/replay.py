"""Replay an exported session: all cars merged in event-time order, paced on the
session clock at a speed factor (1x real time, 10x, ... or as fast as possible).

Rows are handed out as column batches (dict of numpy arrays), never row by row:
at a finite speed one batch is one instant of the session clock (FastF1 samples
every car at the same timestamps, so ~20 rows); as fast as possible, batches are
`max_batch` rows. Each car's samples keep exactly their order in the export.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

Batch = dict[str, "np.ndarray"]


def load_samples(export_folder: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The telemetry of one export in event-time order (car order kept within ties)."""
    import pandas as pd
    import pyarrow as pa

    if not (export_folder / "manifest.json").exists():
        raise FileNotFoundError(
            f"{export_folder} is not a finished export (no manifest.json): run `f1 export` for it."
        )
    try:
        table = pd.read_parquet(export_folder / "telemetry", columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"the export {export_folder} is damaged ({err}); export the session again "
            "with `f1 export` (it replaces the folder atomically)."
        ) from err
    table["driver_number"] = table["driver_number"].astype("int16")
    # Stable sort on time alone: per car, samples keep their exported order.
    return table.sort_values("session_time_s", kind="stable").reset_index(drop=True)


def race_start_offset_s(export_folder: Path) -> float:
    """Seconds from an export's first sample to the start of lap 1 (lights out):
    a race session's clock starts about an hour earlier, with the cars in the garage."""
    samples = load_samples(export_folder, columns=["session_time_s", "lap_number", "driver_number"])
    times = samples["session_time_s"]
    on_lap = times[samples["lap_number"].notna()]
    return float(on_lap.min() - times.min()) if len(on_lap) else 0.0


@dataclass
class PacingStats:
    """Scheduled vs actual emit time per batch, in seconds (positive = late)."""

    lateness_s: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(np.abs(self.lateness_s), q)) if self.lateness_s else 0.0


class Replay:
    """Iterate an export's samples on the session clock.

    Args:
        samples: rows in event-time order (see `load_samples`).
        speed: session seconds per wall second (1.0 real time); None for as fast as possible.
        start_offset_s: skip the first seconds of the session (relative to its first sample).
        max_batch: rows per batch when not paced.
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        *,
        speed: float | None = 1.0,
        start_offset_s: float = 0.0,
        max_batch: int = 65_536,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive (got {speed}); use None for unpaced.")
        times = samples["session_time_s"].to_numpy()
        first = times[0] if len(times) else 0.0
        start = int(times.searchsorted(first + start_offset_s, side="left"))
        self.columns: Batch = {c: samples[c].to_numpy()[start:] for c in samples.columns}
        self.times = self.columns["session_time_s"]
        self.speed = speed
        self.max_batch = max_batch
        self.pacing = PacingStats()

    def __len__(self) -> int:
        return len(self.times)

    def _slices(self) -> Iterator[tuple[int, int]]:
        import numpy as np

        n = len(self.times)
        if self.speed is None:
            for lo in range(0, n, self.max_batch):
                yield lo, min(lo + self.max_batch, n)
            return
        # One batch per distinct instant of the session clock.
        bounds = np.flatnonzero(np.diff(self.times)) + 1
        edges = np.concatenate(([0], bounds, [n]))
        yield from zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)

    def __iter__(self) -> Iterator[Batch]:
        if not len(self):
            return
        origin_session = float(self.times[0])
        origin_wall = time.perf_counter()
        for lo, hi in self._slices():
            if self.speed is not None:
                due = origin_wall + (float(self.times[lo]) - origin_session) / self.speed
                wait = due - time.perf_counter()
                if wait > 0.002:
                    time.sleep(wait - 0.001)  # sleep most of it, then spin for precision
                while time.perf_counter() < due:
                    pass
                self.pacing.lateness_s.append(time.perf_counter() - due)
            yield {name: values[lo:hi] for name, values in self.columns.items()}

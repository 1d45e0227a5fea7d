"""Replay benchmark: unpaced throughput (with and without touching every row) and
the pacing error at a finite speed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.sources.replay import Replay, load_samples


@dataclass(frozen=True)
class ReplayFigures:
    rows: int
    setup_s: float  # Replay() over the loaded table: columns to numpy arrays
    unpaced_rows_per_s: float
    unpaced_touch_rows_per_s: float  # every value of every row read once (a sum per column)
    paced_speed: float
    paced_seconds: float
    paced_rows: int
    paced_batches: int
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float


def run(export_folder: Path, *, speed: float = 1.0, seconds: float = 10.0) -> ReplayFigures:
    import numpy as np

    samples = load_samples(export_folder)
    numeric = samples.select_dtypes("number")

    started = time.perf_counter()
    full = Replay(samples, speed=None)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    rows = sum(len(batch["session_time_s"]) for batch in full)
    unpaced = rows / (time.perf_counter() - started)

    numeric_replay = Replay(numeric, speed=None)
    started = time.perf_counter()
    for batch in numeric_replay:
        for values in batch.values():
            values.sum()
    touched = rows / (time.perf_counter() - started)

    # From the race start (1 h in), where every car is running.
    replay = Replay(samples, speed=speed, start_offset_s=3600)
    started = time.perf_counter()
    paced_rows = 0
    for batch in replay:
        paced_rows += len(batch["session_time_s"])
        if time.perf_counter() - started >= seconds:
            break
    lateness = np.abs(np.array(replay.pacing.lateness_s)) * 1000
    return ReplayFigures(
        rows=rows,
        setup_s=setup,
        unpaced_rows_per_s=unpaced,
        unpaced_touch_rows_per_s=touched,
        paced_speed=speed,
        paced_seconds=seconds,
        paced_rows=paced_rows,
        paced_batches=len(lateness),
        lateness_p50_ms=float(np.percentile(lateness, 50)),
        lateness_p99_ms=float(np.percentile(lateness, 99)),
        lateness_max_ms=float(lateness.max()),
    )

"""Replay on the real 2023 Monaco samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.settings import SAMPLE_FASTF1_CACHE
from pipeline.sources.export import write_export
from pipeline.sources.fastf1_session import load_session
from pipeline.sources.replay import Replay, load_samples
from pipeline.sources.telemetry_table import telemetry_table

pytestmark = pytest.mark.skipif(not SAMPLE_FASTF1_CACHE.is_dir(), reason="no offline sample")


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    table = telemetry_table(load_session(2023, "Monaco", "R"))
    folder = write_export(
        "replay", table, {}, export_dir=tmp_path_factory.mktemp("exports"),
        extra_manifest={}, formats=("parquet",),
    )  # fmt: skip
    return load_samples(folder)


def test_unpaced_replay_keeps_every_row_and_each_cars_order(samples: pd.DataFrame) -> None:
    batches = list(Replay(samples, speed=None, max_batch=10_000))
    merged = {k: np.concatenate([b[k] for b in batches]) for k in ("driver_number", "date")}
    assert len(merged["date"]) == 797_840
    times = pd.Series(merged["date"])
    assert times.is_monotonic_increasing  # event-time order across cars
    original = telemetry_table(load_session(2023, "Monaco", "R"))
    for number, group in pd.DataFrame(merged).groupby("driver_number"):
        expected = original.loc[original["driver_number"] == number, "date"].to_numpy()
        assert (group["date"].to_numpy() == expected).all()


def test_real_time_replay_reproduces_the_rate_and_keeps_pacing(samples: pd.DataFrame) -> None:
    window_s = 3.0
    replay = Replay(samples, speed=1.0, start_offset_s=3600)
    rows, batches, first, last = 0, 0, None, None
    for batch in replay:
        t = float(batch["session_time_s"][0])
        first = t if first is None else first
        if t - first > window_s:
            break
        rows += len(batch["session_time_s"])
        batches += 1
        last = t
    assert first is not None and last is not None
    in_data = samples[(samples["session_time_s"] >= first) & (samples["session_time_s"] <= last)]
    assert rows == len(in_data)  # the dataset's own rate (~20 cars x 4.17 Hz), no more, no less
    assert 60 <= rows / window_s <= 100
    # Pacing: how late each batch left against its schedule on the session clock. How
    # late depends on the machine's load, so it is printed; that none left early is not.
    lateness = replay.pacing.lateness_s
    print(
        f"pacing lateness over {len(lateness)} batches: p50 {replay.pacing.percentile(50):.6f} s,"
        f" p99 {replay.pacing.percentile(99):.6f} s, max {max(lateness):.6f} s"
    )
    assert len(lateness) == batches + 1  # the batch past the window was paced too
    assert min(lateness) >= 0


def test_speed_must_be_positive(samples: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="speed must be positive"):
        Replay(samples, speed=0)


def test_start_offset_skips_the_beginning(samples: pd.DataFrame) -> None:
    start = samples["session_time_s"].iloc[0] + 1800
    replay = Replay(samples, speed=None, start_offset_s=1800)
    assert next(iter(replay))["session_time_s"][0] >= start
    assert len(replay) == int((samples["session_time_s"] >= start).sum())


def test_damaged_export_is_a_clear_error(samples: pd.DataFrame, tmp_path: Path) -> None:
    folder = write_export(
        "broken", samples.head(1000), {}, export_dir=tmp_path, extra_manifest={},
        formats=("parquet",),
    )  # fmt: skip
    part = next((folder / "telemetry").rglob("*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a partial file
    with pytest.raises(ValueError, match=r"export .* is damaged .*f1 export"):
        load_samples(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished export"):
        load_samples(folder)

"""The live page's per-batch update (`pipeline.live.feed`), on batches of the real
2023 Monaco race processed as the consumer processes them."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd

from pipeline.live import feed
from pipeline.processing import batch
from pipeline.processing.batch import BatchResult, WindowConfig
from tests.unit.test_processing import new_states, race  # noqa: F401  (race: a fixture)

BATCH = 5_000


def processed(frame: pd.DataFrame) -> BatchResult:
    return batch.process(frame, new_states(), WindowConfig())


def fake_predictions(samples: pd.DataFrame) -> pd.DataFrame:
    """Row-for-row predictions that say which sample they belong to."""
    return pd.DataFrame(
        {
            "pit_stop_p": samples["seq"].to_numpy() / 1e6,
            "tire_failure_p": np.nan,  # a model without a champion
            "crash_risk_p": samples["driver_number"].to_numpy() / 100.0,
        }
    )


def decode(payload: bytes | None) -> dict:  # type: ignore[type-arg]
    assert payload is not None
    update: dict = orjson.loads(payload)  # type: ignore[type-arg]
    return update


def test_each_car_gets_its_latest_sample_and_its_predictions(race: pd.DataFrame) -> None:  # noqa: F811
    result = processed(race.iloc[200_000 : 200_000 + BATCH])
    samples = result.samples
    update = decode(
        feed.batch_update(
            consumer="c1",
            samples=samples,
            predictions=fake_predictions(samples),
            alerts=result.anomalies,
            latency_ms=(12.5, 80.0),
            committed_us=1,
        )
    )
    cars = pd.DataFrame(update["cars"], columns=update["car_fields"]).set_index("driver")
    latest = samples.sort_values("date_us").groupby("driver").tail(1).set_index("driver")
    assert sorted(cars.index) == sorted(samples["driver"].unique())
    assert (cars["date_us"] == latest.loc[cars.index, "date_us"]).all()
    assert np.allclose(cars["speed"], latest.loc[cars.index, "speed"], atol=0.05)
    assert (cars["gear"] == latest.loc[cars.index, "gear"]).all()
    # The predictions of exactly that sample (pit_stop_p encodes its seq).
    assert np.allclose(cars["pit_stop_p"] * 1e6, latest.loc[cars.index, "seq"], atol=50)
    assert cars["tire_failure_p"].isna().all()
    assert update["latency_p99_ms"] == 80.0
    assert update["alerts_total"] == len(result.anomalies)
    assert len(update["alerts"]) == min(len(result.anomalies), feed.MAX_ALERTS)


def test_the_payload_fits_a_notify_and_what_is_left_out_is_counted(race: pd.DataFrame) -> None:  # noqa: F811
    # The same batch under many sessions at once: too many cars for one NOTIFY.
    part = race.iloc[300_000 : 300_000 + BATCH]
    copies = [part.assign(session_key=f"session_{i}", run_id=f"run_{i}") for i in range(8)]
    result = processed(pd.concat(copies, ignore_index=True))
    payload = feed.batch_update(
        consumer="c1",
        samples=result.samples,
        predictions=None,
        alerts=result.anomalies,
        latency_ms=(None, None),
        committed_us=1,
    )
    assert payload is not None and len(payload) <= feed.MAX_PAYLOAD_BYTES
    update = decode(payload)
    cars_in_batch = result.samples.groupby(["run_id", "driver"]).ngroups
    assert update["cars_left_out"] > 0
    assert len(update["cars"]) + update["cars_left_out"] == cars_in_batch


def test_a_batch_without_samples_sends_nothing(race: pd.DataFrame) -> None:  # noqa: F811
    result = processed(race.iloc[:0])
    assert (
        feed.batch_update(
            consumer="c1",
            samples=result.samples,
            predictions=None,
            alerts=result.anomalies,
            latency_ms=(None, None),
            committed_us=1,
        )
        is None
    )

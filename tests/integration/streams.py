"""What the stream tests share: scratch topics, consumer processes, and the two
checks every stream test ends with (each delivered sample stored exactly once;
every window equal to an independent recomputation)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.kafka.topics import scratch_topics
from pipeline.settings import PROJECT_ROOT, Settings, get_settings
from pipeline.sinks import telemetry_db
from pipeline.sources.replay import load_samples

F1 = str(PROJECT_ROOT / ".venv" / "bin" / "f1")
RACE = "2023_Monaco_R"


def round_trip(bootstrap_servers: str, topic: str, sent: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Produce `sent` (key -> value) to `topic`, read it back with a fresh group;
    what came back (a new group's first join takes a few seconds: up to a minute)."""
    from confluent_kafka import Consumer, Producer

    producer = Producer({"bootstrap.servers": bootstrap_servers, "enable.idempotence": True})
    for key, value in sent.items():
        producer.produce(topic, value=value, key=key)
    assert producer.flush(15) == 0
    consumer = Consumer(
        {"bootstrap.servers": bootstrap_servers, "group.id": f"read-{topic}",
         "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )  # fmt: skip
    consumer.subscribe([topic])
    received: dict[bytes, bytes] = {}
    try:
        for _ in range(60):
            for message in consumer.consume(num_messages=10, timeout=1.0):
                assert message.error() is None
                received[message.key()] = message.value()
            if len(received) == len(sent):
                break
    finally:
        consumer.close()
    return received


def subprocess_env(settings: Settings) -> dict[str, str]:
    """The environment of an `f1` process that uses `settings`: what differs from
    the shared settings (scratch topics and group, a private broker's port...)."""
    shared = get_settings()
    changed = {
        name.upper(): str(value)
        for name, value in settings
        if value != getattr(shared, name) and not hasattr(value, "get_secret_value")
    }
    return {**os.environ, **changed}


@pytest.fixture
def isolated(stack: Settings) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Settings and a subprocess environment with fresh topics and group. The
    test's consumers end before its scratch rows and topics go."""
    with scratch_topics(stack, "test") as settings:
        telemetry_db.ensure_schema(settings)
        try:
            yield settings, subprocess_env(settings)
        finally:
            end_spawned_consumers()


@pytest.fixture(scope="module")
def race(race_export: Path) -> pd.DataFrame:
    samples = load_samples(race_export)
    samples["seq"] = samples.groupby("driver_number").cumcount()
    return samples


_spawned: list[subprocess.Popen[str]] = []


def end_spawned_consumers() -> None:
    """Kill what `consumer_process` started and is still running (a test that
    failed midway, a consumer it paused): a stopped process would keep its
    database transaction, and its locks, past the test."""
    while _spawned:
        process = _spawned.pop()
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(timeout=30)


def consumer_process(env: dict[str, str], member: str, run: str | None, **extra_env: str) -> Any:
    """`f1 consume` until `run` is complete (None: until 15 s without a message),
    killed after the test if still running (`end_spawned_consumers`). Its output
    goes to a file (a pipe nobody reads while it runs would fill up and stall a
    chatty consumer)."""
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the test process)
    until = ["--until-run", run, "--idle-timeout", "120"] if run else ["--idle-timeout", "15"]
    process = subprocess.Popen(
        [F1, "consume", "--member", member, *until],
        env={**env, **extra_env},
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.output_file = output  # type: ignore[attr-defined]
    _spawned.append(process)
    return process


def output_of(process: Any) -> str:
    process.output_file.seek(0)
    return str(process.output_file.read())


def stored_samples(settings: Settings, run: str) -> pd.DataFrame:
    with telemetry_db.connect(settings) as conn:
        cur = conn.execute(
            "SELECT driver_number, seq, speed FROM telemetry_samples WHERE run_id = %s", (run,)
        )
        return pd.DataFrame(cur.fetchall(), columns=["driver_number", "seq", "speed"])


def stored_windows(settings: Settings, run: str) -> pd.DataFrame:
    with telemetry_db.connect(settings) as conn:
        cur = conn.execute(
            "SELECT driver_number, (extract(epoch FROM window_start) * 1e6)::bigint AS start_us,"
            " samples, speed_min, speed_avg, speed_max, rpm_min, rpm_avg, rpm_max,"
            " throttle_full_share, brake_share, gear_changes, drs_open_share"
            " FROM telemetry_windows WHERE run_id = %s",
            (run,),
        )
        return pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description or []])


def expected_windows(samples: pd.DataFrame) -> pd.DataFrame:
    """The 3 s windows recomputed from the dataset with pandas, independently."""
    cars = samples.sort_values(["driver_number", "seq"]).reset_index(drop=True)
    cars["start_us"] = (cars["date"].astype("int64") // 1000) // 3_000_000 * 3_000_000
    same_window = cars[["driver_number", "start_us"]].eq(
        cars[["driver_number", "start_us"]].shift()
    )
    cars["changed"] = (cars["gear"] != cars["gear"].shift()) & same_window.all(axis=1)
    cars["full"] = cars["throttle"].between(99, 100)
    cars["drs_on"] = cars["drs"] >= 10
    return (
        cars.groupby(["driver_number", "start_us"])
        .agg(
            samples=("speed", "size"),
            speed_min=("speed", "min"),
            speed_avg=("speed", "mean"),
            speed_max=("speed", "max"),
            rpm_min=("rpm", "min"),
            rpm_avg=("rpm", "mean"),
            rpm_max=("rpm", "max"),
            throttle_full_share=("full", "mean"),
            brake_share=("brake", "mean"),
            gear_changes=("changed", "sum"),
            drs_open_share=("drs_on", "mean"),
        )
        .reset_index()
    )


def assert_exactly_once(settings: Settings, run: str, samples: pd.DataFrame) -> None:
    stored = stored_samples(settings, run)
    assert len(stored) == len(samples)
    keys = stored.set_index(["driver_number", "seq"]).sort_index()
    assert keys.index.is_unique
    expected = samples.set_index(["driver_number", "seq"]).sort_index()
    assert keys.index.equals(expected.index)
    assert np.allclose(keys["speed"].to_numpy(), expected["speed"].to_numpy())


def assert_windows_match(settings: Settings, run: str, samples: pd.DataFrame) -> None:
    stored = stored_windows(settings, run)
    expected = expected_windows(samples)
    assert len(stored) == len(expected)
    both = expected.merge(stored, on=["driver_number", "start_us"], suffixes=("", "_db"))
    assert len(both) == len(expected)
    for column in expected.columns.drop(["driver_number", "start_us"]):
        close = np.isclose(both[column].astype(float), both[f"{column}_db"].astype(float),
                           rtol=1e-5, atol=1e-5)  # fmt: skip
        assert close.all(), f"{column}: {(~close).sum()} windows differ"


def wait_ok(process: Any, timeout: float = 600) -> str:
    """Wait for an `f1` process to end well; returns what it printed."""
    if hasattr(process, "output_file"):
        process.wait(timeout=timeout)
        output = output_of(process)
    else:
        output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return str(output)


def register_toy_champion(models: Settings, label: str = "pit_stop") -> tuple[str, int, Any]:
    """A small XGBoost model over the stream's features, registered under the
    scratch prefix of `models` and made `champion` (this is about serving, not
    skill). Returns (registered name, version, the feature matrix it was fit on)."""
    import mlflow
    import xgboost

    from pipeline.ml.features import FEATURES
    from pipeline.ml.train import CHAMPION, registered_name

    name = registered_name(label, models)
    x = np.random.default_rng(3).random((400, len(FEATURES)))
    booster = xgboost.train(
        {"objective": "binary:logistic"},
        xgboost.DMatrix(x, label=x[:, 0] > 0.5, feature_names=list(FEATURES)),
        num_boost_round=5,
    )
    mlflow.set_tracking_uri(models.mlflow_tracking_uri)
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name="toy champion"):
        info = mlflow.xgboost.log_model(booster, name="model", registered_model_name=name)
    version = int(info.registered_model_version)
    mlflow.MlflowClient(models.mlflow_tracking_uri).set_registered_model_alias(
        name, CHAMPION, str(version)
    )
    return name, version, x

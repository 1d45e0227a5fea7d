"""Faults injected into the real stack while a race streams through it.

Each test streams a slice of the real 2023 Monaco race, injects one fault, lets
the stream recover, then checks from the producer's delivery reports that
nothing was lost or doubled and that every window equals a recomputation
(`tests/integration/faults.py`); its figures go to docs/reliability.md.

The quick faults (consumers killed or paused, poison, disorder, lost offsets,
MLflow down) run in `make test` on scratch topics of the shared broker. The long
ones (a broker killed three times, PostgreSQL stopped for 30 s, and in
test_airflow_faults.py the f1_stream consume task killed) need services of their
own, never the shared ones a demo runs on, and run with `make test-faults`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest
from confluent_kafka import Producer

from pipeline import faults, schema
from pipeline.kafka.client import producer_config
from pipeline.kafka.producer import ProduceReport, message_columns, produce_session
from pipeline.kafka.topics import scratch_topics
from pipeline.processing.batch import WindowConfig
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db
from pipeline.stack.sandbox import private_services
from tests.integration.faults import (
    FaultRow,
    RegistryLink,
    delivered,
    first_commit_after,
    in_flight,
    lost_and_doubled,
    measure,
    wait_for_row,
    wait_stored,
)
from tests.integration.streams import (
    RACE,
    assert_windows_match,
    consumer_process,
    output_of,
    register_toy_champion,
    stored_samples,
    stored_windows,
    subprocess_env,
    wait_ok,
)

SLICE_S = 240.0  # session seconds per fault: ~19,000 samples of 20 cars
SMALL_BATCHES = {"STREAM_BATCH_SIZE": "200"}  # many commits, so a fault lands mid-stream

pytestmark = pytest.mark.faults
long_fault = pytest.mark.faults_long


def _slice(race: pd.DataFrame, seconds: float) -> pd.DataFrame:
    first = race["session_time_s"].iloc[0]
    return race[race["session_time_s"] < first + seconds]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Background:
    """`produce_session` in a thread (a paced replay goes on while faults strike)."""

    def __init__(self, settings: Settings, run: str, *, speed: float | None, seconds: float):
        self.report: ProduceReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(settings, run, speed, seconds), daemon=True
        )
        self._thread.start()

    def _run(self, settings: Settings, run: str, speed: float | None, seconds: float) -> None:
        try:
            self.report = produce_session(
                settings.export_dir / RACE, speed=speed, run_id=run, duration_s=seconds,
                settings=settings,
            )  # fmt: skip
        except BaseException as err:  # reraised by result()
            self.error = err

    def result(self, timeout_s: float = 600) -> ProduceReport:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the producer did not finish"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


# --- consumers killed, paused --------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "fault"),
    [
        (faults.BEFORE_COMMIT, "consumer SIGKILL after consuming, before the commit"),
        (faults.AFTER_COMMIT, "consumer SIGKILL right after a commit"),
    ],
)
def test_a_consumer_killed_around_its_commit_loses_and_doubles_nothing(
    point: str,
    fault: str,
    isolated: tuple[Settings, dict[str, str]],
    race: pd.DataFrame,
    fault_table: list[FaultRow],
) -> None:
    settings, env = isolated
    run = f"kill-{point}-{uuid.uuid4().hex[:6]}"
    report = produce_session(
        settings.export_dir / RACE, speed=None, run_id=run, duration_s=SLICE_S, settings=settings
    )
    victim = consumer_process(env, "victim", run, FAULT_AT=f"{point}:8", **SMALL_BATCHES)
    assert victim.wait(timeout=300) == -signal.SIGKILL, output_of(victim)[-3000:]
    killed_at, flying = _now(), in_flight(settings)
    assert 0 < len(stored_samples(settings, run)) < report.delivered
    successor = consumer_process(env, "successor", run)
    recovery = first_commit_after(settings, killed_at)
    wait_ok(successor)
    lost, doubled = measure(settings, run, delivered(report, _slice(race, SLICE_S)))
    fault_table.append(
        FaultRow(fault, f"`FAULT_AT={point}:8` (pipeline/faults.py), then a successor",
                 flying, lost, doubled, recovery)
    )  # fmt: skip


def test_a_consumer_killed_while_joining_a_rebalance(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    settings, env = isolated
    run = f"rebalance-{uuid.uuid4().hex[:6]}"
    producer = Background(settings, run, speed=8.0, seconds=SLICE_S)  # ~30 s of wall time
    first = consumer_process(env, "first", run, **SMALL_BATCHES)
    wait_stored(settings, run, 2_000)
    # It claims its partitions (fencing `first` on them), then dies before reading.
    joiner = consumer_process(env, "joiner", run, FAULT_AT=f"{faults.ASSIGNED}:1")
    assert joiner.wait(timeout=120) == -signal.SIGKILL, output_of(joiner)[-3000:]
    killed_at, flying = _now(), in_flight(settings)
    restarted = consumer_process(env, "joiner-again", run)
    report = producer.result()
    wait_ok(first)
    wait_ok(restarted)
    recovery = first_commit_after(settings, killed_at)
    lost, doubled = measure(settings, run, delivered(report, _slice(race, SLICE_S)))
    fault_table.append(
        FaultRow("consumer SIGKILL during a rebalance (a second one joining)",
                 f"`FAULT_AT={faults.ASSIGNED}:1` in the joiner, then restarted",
                 flying, lost, doubled, recovery)
    )  # fmt: skip


def test_a_consumer_paused_past_its_session_is_fenced_and_rejoins(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    settings, env = isolated
    run = f"pause-{uuid.uuid4().hex[:6]}"
    producer = Background(settings, run, speed=8.0, seconds=SLICE_S)
    paused = consumer_process(env, "paused", run, **SMALL_BATCHES)
    wait_stored(settings, run, 2_000)
    paused.send_signal(signal.SIGSTOP)
    stopped_at, flying = _now(), in_flight(settings)
    successor = consumer_process(env, "successor", run)
    # The successor owns every partition once the paused one's session (10 s) ends.
    recovery = first_commit_after(settings, stopped_at + dt.timedelta(seconds=1))
    _wait_commits(settings, "successor", at_least=3)
    paused.send_signal(signal.SIGCONT)
    report = producer.result()
    wait_ok(successor)
    resumed = wait_ok(paused)
    lost, doubled = measure(settings, run, delivered(report, _slice(race, SLICE_S)))
    assert "rejoining the group" in resumed or "revoked" in resumed, resumed[-3000:]
    fault_table.append(
        FaultRow("consumer paused (SIGSTOP) past its session timeout, then resumed",
                 "SIGSTOP, a successor takes over, SIGCONT", flying, lost, doubled, recovery)
    )  # fmt: skip


def test_a_consumer_stalled_inside_its_copy_is_ended_by_its_successor(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    """Stopped in the middle of a COPY, a consumer's session is "active" and holds
    its partitions' offset rows with no server timeout to end it: the successor's
    claim must end it, or the successor waits for ever."""
    settings, env = isolated
    run = f"stall-{uuid.uuid4().hex[:6]}"
    report = produce_session(
        settings.export_dir / RACE, speed=None, run_id=run, duration_s=SLICE_S, settings=settings
    )
    stalled = consumer_process(env, "stalled", run, FAULT_AT=f"{faults.IN_COPY}:8", **SMALL_BATCHES)
    _wait_stopped(stalled)
    stopped_at, flying = _now(), in_flight(settings)
    successor = consumer_process(env, "successor", run)
    recovery = first_commit_after(settings, stopped_at)
    took_over = wait_ok(successor)
    assert "stalled session(s) holding partitions" in took_over, took_over[-3000:]
    stalled.send_signal(signal.SIGCONT)  # its session gone, its commit finds itself fenced
    resumed = wait_ok(stalled)
    assert "rejoining the group" in resumed or "revoked" in resumed, resumed[-3000:]
    lost, doubled = measure(settings, run, delivered(report, _slice(race, SLICE_S)))
    fault_table.append(
        FaultRow("consumer stalled (SIGSTOP) in the middle of a COPY, holding its rows' locks",
                 f"`FAULT_AT={faults.IN_COPY}:8`, a successor, then SIGCONT",
                 flying, lost, doubled, recovery)
    )  # fmt: skip


def _wait_stopped(process: Any, timeout_s: float = 300) -> None:
    """Until the process is stopped (state T): it reached its fault point."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{process.pid}/stat").read_text().split(") ")[1][0] != "T":
        assert process.poll() is None, output_of(process)[-3000:]
        assert time.monotonic() < deadline, f"not stopped after {timeout_s:g} s"
        time.sleep(0.2)


def _wait_commits(settings: Settings, member: str, at_least: int) -> None:
    wait_for_row(
        settings,
        "SELECT count(*) FROM stream_metrics WHERE group_id = %s AND consumer = %s AND samples > 0",
        (settings.consumer_group, member),
        lambda row: row[0] >= at_least,
    )


# --- bad input -----------------------------------------------------------------------


def _sample_messages(samples: pd.DataFrame, run: str) -> list[schema.TelemetrySample]:
    columns = message_columns(samples, run, RACE)
    return [
        schema.TelemetrySample(*values)
        for values in zip(*(columns[f] for f in schema.SAMPLE_FIELDS), strict=True)
    ]


class RawProducer:
    """Sends exactly the bytes and headers given (poison included), with the
    project's producer settings, counting acknowledged samples per partition."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = Producer(producer_config(settings))
        self.acked: Counter[int] = Counter()

    def send(
        self, value: bytes, key: bytes, headers: list[tuple[str, bytes]], *, counts: bool
    ) -> None:
        def on_delivery(err: Any, message: Any) -> None:
            assert err is None, err
            if counts:
                self.acked[message.partition()] += 1

        self.producer.produce(
            self.settings.telemetry_topic, value, key, headers=headers, on_delivery=on_delivery
        )
        self.producer.poll(0)

    def sample(self, sample: schema.TelemetrySample, *, counts: bool = True) -> None:
        self.send(
            schema.encode(sample),
            schema.message_key(sample.session_key, sample.driver_number),
            schema.headers("fault-test", time.time_ns() // 1000),
            counts=counts,
        )

    def end(self, run: str) -> None:
        """The end markers, with what was delivered to each partition."""
        assert self.producer.flush(30) == 0
        for partition in range(self.settings.telemetry_partitions):
            marker = schema.EndOfStream(
                v=schema.SCHEMA_VERSION, run_id=run, session_key=RACE, partition=partition,
                samples=self.acked[partition],
            )  # fmt: skip
            self.producer.produce(self.settings.telemetry_topic, schema.encode(marker),
                                  f"{RACE}:end".encode(), partition=partition)  # fmt: skip
        assert self.producer.flush(30) == 0


def test_one_percent_poison_of_every_kind_is_dead_lettered_and_the_stream_goes_on(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    settings, env = isolated
    run = f"poison-{uuid.uuid4().hex[:6]}"
    good = _sample_messages(_slice(race, SLICE_S), run)
    rng = np.random.default_rng(7)
    poisoned = set(rng.choice(np.arange(500, len(good)), size=len(good) // 100, replace=False))
    kinds = ("malformed", "bad_header", "schema_bounds", "future_date", "huge_seq",
             "oversized", "resend")  # fmt: skip
    expected: Counter[str] = Counter()
    sender = RawProducer(settings)
    for i, sample in enumerate(good):
        if i in poisoned:
            kind = kinds[sum(expected.values()) % len(kinds)]
            expected[kind] += 1
            _send_poison(sender, kind, sample, good[i - 1])
        sender.sample(sample)
    sender.end(run)
    consumer = consumer_process(env, "poisoned", run, **SMALL_BATCHES)
    output = wait_ok(consumer)  # it never stopped: it saw the run to its end
    assert f"run {run} complete" in output
    with telemetry_db.connect(settings) as conn:
        classes = dict(
            conn.execute(
                "SELECT error_class, count(*) FROM dead_letters WHERE topic = %s GROUP BY 1",
                (settings.telemetry_topic,),
            ).fetchall()
        )
        duplicates = conn.execute(
            "SELECT sum(duplicates) FROM stream_metrics WHERE group_id = %s",
            (settings.consumer_group,),
        ).fetchone()
    assert classes == {
        "malformed": expected["malformed"],
        "bad_header": expected["bad_header"],
        "out_of_bounds": expected["schema_bounds"] + expected["future_date"] + expected["huge_seq"],
        "oversized": expected["oversized"],
    }
    assert duplicates is not None and duplicates[0] == expected["resend"]
    lost, doubled = measure(settings, run, _slice(race, SLICE_S))
    fault_table.append(
        FaultRow("1 % poison: bad JSON, bad header, out-of-bounds values, a date a year "
                 "ahead, a huge seq, oversized, resent keys",
                 f"{sum(expected.values())} poison among {len(good):,} samples, one producer",
                 0, lost, doubled, None)
    )  # fmt: skip


def _send_poison(
    sender: RawProducer,
    kind: str,
    sample: schema.TelemetrySample,
    previous: schema.TelemetrySample,
) -> None:
    key = schema.message_key(sample.session_key, sample.driver_number)
    headers = schema.headers("fault-test", time.time_ns() // 1000)
    if kind == "malformed":
        sender.send(b'{"kind": "sample", "speed": 2', key, headers, counts=False)
    elif kind == "bad_header":
        bad = [(n, b"soon" if n == schema.HEADER_PRODUCED_AT else v) for n, v in headers]
        sender.send(schema.encode(sample), key, bad, counts=False)
    elif kind == "schema_bounds":
        sender.sample(msgspec.structs.replace(sample, speed=5_000.0), counts=False)
    elif kind == "future_date":  # would move the car's watermark a year ahead
        year_us = 365 * 86_400 * 10**6
        sender.sample(msgspec.structs.replace(sample, date_us=sample.date_us + year_us),
                      counts=False)  # fmt: skip
    elif kind == "huge_seq":  # would make the car's next samples look like resends
        sender.sample(msgspec.structs.replace(sample, seq=sample.seq + 10**7), counts=False)
    elif kind == "oversized":
        padded = json.loads(schema.encode(sample)) | {"driver": "X" * 20_000}
        sender.send(json.dumps(padded).encode(), key, headers, counts=False)
    elif kind == "resend":  # the previous sample again, as a retried producer sends it
        sender.sample(previous, counts=False)


def test_samples_out_of_order_and_late_are_stored_and_on_time_windows_exact(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    settings, env = isolated
    run = f"disorder-{uuid.uuid4().hex[:6]}"
    samples = _slice(race, SLICE_S).reset_index(drop=True)
    # Send order: 2 % of samples swapped with their car's next one (well within the
    # 2 s lateness), 0.5 % held back 30 s of session time (their windows close first).
    rng = np.random.default_rng(11)
    send_at = samples["session_time_s"].to_numpy().copy()
    by_car = samples.groupby("driver_number").indices
    swapped = 0
    for rows in by_car.values():
        for i in rng.choice(len(rows) - 1, size=len(rows) // 50, replace=False):
            a, b = rows[i], rows[i + 1]
            send_at[a], send_at[b] = send_at[b] + 1e-6, send_at[a]
            swapped += 1
        for i in rng.choice(len(rows), size=len(rows) // 200, replace=False):
            send_at[rows[i]] += 30.0
    order = np.argsort(send_at, kind="stable")
    sender = RawProducer(settings)
    messages = _sample_messages(samples, run)
    for i in order:
        sender.sample(messages[i])
    sender.end(run)
    output = wait_ok(consumer_process(env, "disorder", run, **SMALL_BATCHES))
    assert f"run {run} complete" in output
    with telemetry_db.connect(settings) as conn:
        late = conn.execute(
            "SELECT count(*) FILTER (WHERE is_late), count(*) FROM telemetry_samples "
            "WHERE run_id = %s",
            (run,),
        ).fetchone()
    assert late is not None and late[1] == len(samples)  # every one stored, once
    held_back = np.flatnonzero(send_at - samples["session_time_s"].to_numpy() >= 30.0)
    assert late[0] >= len(held_back) > 0  # each held-back one is late (and a few it overtook)
    # The on-time windows equal a recomputation over the on-time samples, in send order.
    on_time = _on_time(settings, run, samples.iloc[order])
    _assert_windows_equal(settings, run, on_time)
    lost, doubled = lost_and_doubled(settings, run, samples)
    fault_table.append(
        FaultRow("samples out of order and late, from the producer's side",
                 f"{swapped} swapped with their car's next, {len(held_back)} held back 30 s; "
                 f"{late[0]} stored as late", 0, lost, doubled, None)
    )  # fmt: skip


def _on_time(settings: Settings, run: str, in_send_order: pd.DataFrame) -> pd.DataFrame:
    with telemetry_db.connect(settings) as conn:
        late = pd.DataFrame(
            conn.execute(
                "SELECT driver_number, seq FROM telemetry_samples WHERE run_id = %s AND is_late",
                (run,),
            ).fetchall(),
            columns=["driver_number", "seq"],
        )
    keys = pd.MultiIndex.from_frame(in_send_order[["driver_number", "seq"]])
    return in_send_order[~keys.isin(pd.MultiIndex.from_frame(late))]


def _assert_windows_equal(settings: Settings, run: str, on_time: pd.DataFrame) -> None:
    # Gear changes count between consecutive samples as they arrived: recompute in
    # arrival order (the recomputation sorts by seq, so give it arrival ranks).
    assert_windows_match(
        settings, run, on_time.assign(seq=on_time.groupby("driver_number").cumcount())
    )


def test_lost_offsets_clash_with_stored_rows_and_are_skipped_not_doubled(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    settings, env = isolated
    run = f"lost-offsets-{uuid.uuid4().hex[:6]}"
    report = produce_session(
        settings.export_dir / RACE, speed=None, run_id=run, duration_s=SLICE_S, settings=settings
    )
    wait_ok(consumer_process(env, "first", run))
    windows_before = stored_windows(settings, run)
    with telemetry_db.connect(settings) as conn:  # offsets and state gone, rows kept
        conn.execute("DELETE FROM consumer_offsets WHERE group_id = %s", (settings.consumer_group,))
    lost_at, flying = _now(), in_flight(settings)
    output = wait_ok(consumer_process(env, "rereader", None))  # reads it all again
    assert f"{report.delivered:,} duplicates skipped" in output, output[-2000:]
    recovery = first_commit_after(settings, lost_at)
    lost, doubled = measure(settings, run, delivered(report, _slice(race, SLICE_S)))
    after = stored_windows(settings, run)
    pd.testing.assert_frame_equal(
        after.sort_values(["driver_number", "start_us"]).reset_index(drop=True),
        windows_before.sort_values(["driver_number", "start_us"]).reset_index(drop=True),
    )
    fault_table.append(
        FaultRow("stored offsets lost: everything read again, every key clashes",
                 "the group's consumer_offsets rows deleted after the run",
                 flying, lost, doubled, recovery)
    )  # fmt: skip


# --- services down (private ones) ----------------------------------------------------


@long_fault
def test_the_broker_killed_three_times_mid_stream(
    stack: Settings, race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    seconds = 1_200.0  # ~95,000 samples at 10x: about 2 minutes of produce
    with (
        private_services(stack, only={"kafka"}) as private,
        scratch_topics(private.settings, "fault-broker") as settings,
    ):
        env = subprocess_env(settings)
        run = f"broker-{uuid.uuid4().hex[:6]}"
        producer = Background(settings, run, speed=10.0, seconds=seconds)
        consumer = consumer_process(env, "survivor", run)
        flying, recoveries = [], []
        for _ in range(3):
            wait_stored(settings, run, len(stored_samples(settings, run)) + 3_000)
            flying.append(in_flight(settings))
            private.kill("kafka")
            time.sleep(5)
            private.up("kafka")
            recoveries.append(first_commit_after(settings, _now()))
        report = producer.result()
        output = wait_ok(consumer)
        broker_errors = _count(output, "broker errors")
        assert broker_errors > 0, output[-2000:]  # seen, and counted
        expected = delivered(report, _slice(race, seconds))
        lost, doubled = measure(settings, run, expected)
    fault_table.append(
        FaultRow("Kafka broker SIGKILL mid-stream, three times",
                 "SIGKILL to a private broker, restarted after 5 s; "
                 f"{report.failed} deliveries failed", max(flying), lost, doubled,
                 max(recoveries))
    )  # fmt: skip


@long_fault
def test_postgres_stopped_for_30_s_mid_stream(
    stack: Settings, race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    seconds = 1_200.0
    with (
        private_services(stack, only={"postgres"}) as private,
        scratch_topics(private.settings, "fault-postgres") as settings,
    ):
        telemetry_db.ensure_schema(settings)
        env = subprocess_env(settings)
        run = f"postgres-{uuid.uuid4().hex[:6]}"
        producer = Background(settings, run, speed=10.0, seconds=seconds)
        consumer = consumer_process(env, "patient", run)
        wait_stored(settings, run, 5_000)
        flying = in_flight(settings)
        private.kill("postgres", signal.SIGINT)  # a fast shutdown: sessions cut
        time.sleep(30)
        private.up("postgres")
        recovery = first_commit_after(settings, _now())
        report = producer.result()
        output = wait_ok(consumer)
        retries = _count(output, "database retries")
        assert retries > 0, output[-2000:]
        lost, doubled = measure(settings, run, delivered(report, _slice(race, seconds)))
    fault_table.append(
        FaultRow("PostgreSQL stopped mid-stream for 30 s",
                 f"a private cluster stopped, restarted after 30 s; {retries} retries, "
                 "the consumer stayed in its group", flying, lost, doubled, recovery)
    )  # fmt: skip


def _count(output: str, what: str) -> int:
    """A figure from `f1 consume`'s summary line, e.g. "12 broker errors"."""
    match = re.search(rf"([\d,]+) {what}", output)
    assert match, f"no '{what}' in: {output[-2000:]}"
    return int(match.group(1).replace(",", ""))


def test_default_bounds_are_the_settings() -> None:
    # The consumer's bounds come from the one settings object (documented in .env.example).
    from pipeline.settings import Settings as S

    fields = S.model_fields
    config = WindowConfig()
    assert fields["max_event_time_ahead_s"].default == config.max_event_time_ahead_s
    assert fields["max_seq_ahead"].default == config.max_seq_ahead
    assert fields["car_idle_s"].default == config.car_idle_s
    assert fields["idle_cars_kept"].default == config.idle_cars_kept


def test_mlflow_down_mid_stream_keeps_the_last_good_model_serving(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    import mlflow
    import xgboost

    from pipeline.ml.registry import scratch_models
    from pipeline.ml.train import CHAMPION

    settings, env = isolated
    link = RegistryLink(settings)
    try:
        with scratch_models(settings, "fault") as models:
            name, version, x = register_toy_champion(models)
            run = f"mlflow-down-{uuid.uuid4().hex[:6]}"
            producer = Background(settings, run, speed=8.0, seconds=2 * SLICE_S)
            served = {**env, "MLFLOW_PORT": str(link.port), "MODEL_REFRESH_S": "0.5",
                      "MODEL_NAME_PREFIX": models.model_name_prefix}  # fmt: skip
            consumer = consumer_process(served, "model-keeper", run)
            _wait_predictions(settings, run, version, at_least=1_000)
            link.down()
            down_at, flying, asked = _now(), in_flight(settings), link.requests
            scored_before = _predictions(settings, run, version)
            _wait_predictions(settings, run, version, at_least=scored_before + 6_000)
            link.up()
            # Then a version the stream cannot feed becomes champion: refused, v1 kept.
            other = xgboost.DMatrix(x[:, :3], label=x[:, 0] > 0.5, feature_names=["a", "b", "c"])
            with mlflow.start_run(run_name="wrong features"):
                odd = mlflow.xgboost.log_model(
                    xgboost.train({"objective": "binary:logistic"}, other, num_boost_round=2),
                    name="model", registered_model_name=name,
                )  # fmt: skip
            mlflow.MlflowClient(models.mlflow_tracking_uri).set_registered_model_alias(
                name, CHAMPION, str(odd.registered_model_version)
            )
            moved_at = _predictions(settings, run, version)
            _wait_predictions(settings, run, version, at_least=moved_at + 3_000)
            report = producer.result()
            output = wait_ok(consumer)
            recovery = first_commit_after(settings, down_at)
    finally:
        link.close()
    assert asked > 0 and "cannot reach the MLflow registry" in output, output[-3000:]
    assert f"refusing {name} v{odd.registered_model_version}" in output, output[-3000:]
    with telemetry_db.connect(settings) as conn:
        versions = dict(
            conn.execute(
                "SELECT coalesce(pit_stop_version, -1), count(*) FROM telemetry_predictions "
                "WHERE run_id = %s GROUP BY 1",
                (run,),
            ).fetchall()
        )
    assert versions == {version: report.delivered}  # every sample scored, by the one model
    lost, doubled = measure(settings, run, delivered(report, _slice(race, 2 * SLICE_S)))
    fault_table.append(
        FaultRow("MLflow down mid-stream, then a champion with the wrong features",
                 "the consumer's link to MLflow cut (connections refused) for 6,000+ "
                 "samples, then `champion` moved to a version of other features: both times "
                 "the last good model kept serving every sample", flying, lost, doubled,
                 recovery)
    )  # fmt: skip


def _predictions(settings: Settings, run: str, version: int) -> int:
    with telemetry_db.connect(settings) as conn:
        row = conn.execute(
            "SELECT count(*) FROM telemetry_predictions WHERE run_id = %s "
            "AND pit_stop_version = %s",
            (run, version),
        ).fetchone()
    return int(row[0]) if row else 0


def _wait_predictions(settings: Settings, run: str, version: int, at_least: int) -> None:
    wait_for_row(
        settings,
        "SELECT count(*) FROM telemetry_predictions WHERE run_id = %s AND pit_stop_version = %s",
        (run, version),
        lambda row: row[0] >= at_least,
    )

"""The stream against the real broker and database, on the real 2023 Monaco race.

Each test gets topics and a consumer group of its own, so a demo replay running
on the default topic is never disturbed (and never disturbs the test).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from confluent_kafka import Consumer, Producer

from pipeline import schema
from pipeline.kafka.consumer import StreamConsumer
from pipeline.kafka.producer import produce_session
from pipeline.kafka.topics import (
    TopicMismatch,
    admin_client,
    describe,
    provision,
    scratch_topics,
    topic_specs,
)
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db
from pipeline.stack import airflow_server
from tests.integration.streams import (
    F1,
    RACE,
    assert_exactly_once,
    assert_windows_match,
    consumer_process,
    stored_samples,
    wait_ok,
)


def test_whole_race_through_two_consumers_is_stored_exactly_once(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame
) -> None:
    settings, env = isolated
    run = f"whole-{uuid.uuid4().hex[:6]}"
    consumers = [consumer_process(env, f"c{i}", run) for i in (1, 2)]
    report = produce_session(settings.export_dir / RACE, speed=None, run_id=run, settings=settings)
    assert report.delivered == report.planned == len(race) == 797_840
    assert sum(report.per_partition.values()) == len(race)
    # The race's 20 cars dealt 5 to each of the 4 partitions: the busiest holds a
    # quarter of the race (by key hashing it held 45 %), give or take car lengths.
    shares = [n / len(race) for n in report.per_partition.values()]
    assert len(shares) == 4 and max(shares) <= 0.30, report.per_partition
    outputs = [wait_ok(c) for c in consumers]
    assert all(f"run {run} complete" in out for out in outputs), outputs
    assert_exactly_once(settings, run, race)
    assert_windows_match(settings, run, race)
    with telemetry_db.connect(settings) as conn:
        members = conn.execute(
            "SELECT consumer, sum(samples) FROM stream_metrics WHERE group_id = %s GROUP BY 1",
            (settings.consumer_group,),
        ).fetchall()
    assert {m for m, n in members if n > 0} == {"c1", "c2"}  # both took part
    assert sum(n for _, n in members) == len(race)


def test_a_consumer_killed_mid_stream_resumes_exactly_once(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame
) -> None:
    settings, env = isolated
    run = f"kill-{uuid.uuid4().hex[:6]}"
    seconds = 1200.0
    report = produce_session(
        settings.export_dir / RACE, speed=None, run_id=run, duration_s=seconds, settings=settings
    )
    # Small batches so the kill lands mid-stream.
    victim = consumer_process(env, "victim", run, STREAM_BATCH_SIZE="200")
    deadline = time.monotonic() + 120
    while len(stored_samples(settings, run)) < 5_000:
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stored_at_kill = len(stored_samples(settings, run))
    assert 0 < stored_at_kill < report.delivered
    wait_ok(consumer_process(env, "successor", run))
    first = race["session_time_s"].iloc[0]
    window = race[race["session_time_s"] < first + seconds]
    assert_exactly_once(settings, run, window)
    assert_windows_match(settings, run, window)


def test_sigterm_stops_producer_and_consumer_cleanly_and_nothing_is_lost(
    isolated: tuple[Settings, dict[str, str]],
) -> None:
    settings, env = isolated
    run = f"term-{uuid.uuid4().hex[:6]}"
    # Not until the run: the stopped producer's end markers would end it first
    # (a race with the SIGTERM below); only the signal may stop this one.
    consumer = consumer_process(env, "terminated", None)
    producer = subprocess.Popen(
        [F1, "produce", "--session", RACE, "--speed", "50", "--run-id", run],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(stored_samples(settings, run)) < 2_000:
        assert time.monotonic() < deadline and producer.poll() is None
        time.sleep(0.2)
    producer.send_signal(signal.SIGTERM)
    produced = wait_ok(producer, timeout=60)
    assert "stopped early on request" in produced
    consumer.send_signal(signal.SIGTERM)
    assert "stopped: stop requested" in wait_ok(consumer, timeout=60)

    with telemetry_db.connect(settings) as conn:
        delivered, stopped_early = conn.execute(
            "SELECT samples_delivered, stopped_early FROM stream_runs WHERE run_id = %s", (run,)
        ).fetchone() or (0, False)
    assert stopped_early and 2_000 <= delivered < 797_840
    wait_ok(consumer_process(env, "successor", run))  # drains what is left, to the end marker
    stored = stored_samples(settings, run)
    assert len(stored) == delivered
    assert not stored.duplicated(["driver_number", "seq"]).any()


def _sample_json(race: pd.DataFrame, run: str, row: int) -> dict[str, Any]:
    from pipeline.kafka.producer import message_columns

    columns = message_columns(race.iloc[row : row + 1], run, RACE)
    return {"kind": "sample", **{f: columns[f][0] for f in schema.SAMPLE_FIELDS}}


def test_malformed_messages_go_to_the_dead_letter_topic_with_reasons(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame
) -> None:
    settings, _ = isolated
    run = f"bad-{uuid.uuid4().hex[:6]}"
    good = [_sample_json(race, run, i) for i in range(0, 400, 20)]
    wrong_type = {**good[0], "seq": 10_000, "speed": "fast"}
    missing = {k: v for k, v in good[0].items() if k != "date_us"}
    null_speed = {**good[0], "seq": 10_001, "speed": None}
    oversized = {**good[0], "seq": 10_002, "driver": "X" * (settings.max_message_bytes + 10)}
    bad = {
        "malformed": [b"{not json", json.dumps({**good[0], "speed": float("nan")}).encode()],
        "invalid": [json.dumps(m).encode() for m in (wrong_type, missing, null_speed)]
        + [json.dumps({"kind": "lap", "v": 1}).encode()],
        "oversized": [json.dumps(oversized).encode()],
    }
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for message in [json.dumps(g).encode() for g in good] + [m for ms in bad.values() for m in ms]:
        producer.produce(settings.telemetry_topic, message, b"2023_Monaco_R:1")
    assert producer.flush(10) == 0

    report = StreamConsumer("dlq-test", settings=settings).run(idle_timeout_s=5)
    assert report.stop_reason == "idle 5 s"  # it kept going to the end
    assert report.samples == len(good)
    assert dict(report.dead_letter_reasons) == {k: len(v) for k, v in bad.items()}
    # The DAGs' consume tasks return the summary: the classes as counted, as JSON.
    summary = json.loads(json.dumps(report.summary()))
    assert summary["dead_letter_reasons"] == {k: len(v) for k, v in bad.items()}
    assert summary["samples"] == len(good)
    with telemetry_db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT error_class, reason FROM dead_letters WHERE topic = %s ORDER BY kafka_offset",
            (settings.telemetry_topic,),
        ).fetchall()
    assert [r[0] for r in rows] == [k for k, ms in bad.items() for _ in ms]
    assert any("Expected `float`, got `str`" in r[1] for r in rows)
    assert any("missing required field `date_us`" in r[1] for r in rows)
    assert len(stored_samples(settings, run)) == len(good)

    reader = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": f"read-{run}",
         "auto.offset.reset": "earliest"}
    )  # fmt: skip
    reader.subscribe([settings.dead_letter_topic])
    letters: list[Any] = []
    deadline = time.monotonic() + 30
    while len(letters) < len(rows) and time.monotonic() < deadline:
        letters += [m for m in reader.consume(100, timeout=1) if m.error() is None]
    reader.close()
    assert len(letters) == len(rows)
    for letter in letters:
        headers = dict(letter.headers())
        assert headers["error_class"].decode() in bad and headers["error"]
        assert headers["origin"].decode().startswith(f"{settings.telemetry_topic}/")


def test_topics_are_idempotent_and_a_different_topic_is_reported(
    isolated: tuple[Settings, dict[str, str]],
) -> None:
    settings, _ = isolated
    admin = admin_client(settings)
    again = provision(admin, topic_specs(settings))
    assert [r.action for r in again] == ["unchanged", "unchanged"]
    assert again[0].partitions == settings.telemetry_partitions
    assert again[0].config["compression.type"] == "producer"

    wider = settings.model_copy(update={"telemetry_partitions": 6})
    with pytest.raises(TopicMismatch, match="has 4 partitions, the spec asks for 6"):
        provision(admin, topic_specs(wider))
    grown = provision(admin, topic_specs(wider), increase_partitions=True)
    assert grown[0].action == "partitions increased" and grown[0].partitions == 6
    with pytest.raises(TopicMismatch, match="more than the 4 asked for"):
        provision(admin, topic_specs(settings))

    spec = topic_specs(wider)[0]
    changed = type(spec)(spec.name, 6, {**spec.config, "retention.ms": "1000"})
    with pytest.raises(TopicMismatch, match=r"retention\.ms is 604800000, spec 1000"):
        provision(admin, [changed])
    fixed = provision(admin, [changed], update_config=True)
    assert fixed[0].action == "config updated"
    assert describe(admin, spec.name)[1]["retention.ms"] == "1000"


def test_stream_dags_run_under_airflow_dags_test(
    isolated: tuple[Settings, dict[str, str]],
    race: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, env = isolated
    for key in ("TELEMETRY_TOPIC", "DEAD_LETTER_TOPIC", "CONSUMER_GROUP"):
        monkeypatch.setenv(key, env[key])
    topics = airflow_server.dags_test(settings, "f1_topics")
    assert topics.returncode == 0, topics.stdout[-3000:] + topics.stderr[-3000:]
    conf = json.dumps({"duration_s": 30, "speed": 0, "consumers": 2, "idle_timeout_s": 10})
    result = airflow_server.dags_test(settings, "f1_stream", "--conf", conf)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with telemetry_db.connect(settings) as conn:
        run, stored = conn.execute(
            "SELECT run_id, count(*) FROM telemetry_samples WHERE run_id IN "
            "(SELECT run_id FROM stream_runs WHERE run_id LIKE %s ORDER BY started_at DESC "
            "LIMIT 1) GROUP BY 1",
            (f"{RACE}@manual__%",),
        ).fetchone() or (None, 0)
    first = race["session_time_s"].iloc[0]
    assert stored == int((race["session_time_s"] < first + 30).sum()) > 0, run
    assert "state=success" in result.stdout + result.stderr


def test_a_missing_export_gets_one_clear_error(tmp_path: Path, stack: Settings) -> None:
    with pytest.raises(FileNotFoundError, match="not a finished export"):
        produce_session(tmp_path / "1999_Nowhere_R", settings=stack)


def test_the_reader_role_reads_stream_tables_but_cannot_change_them(stack: Settings) -> None:
    # The reader role (dashboards) can read what the stream writes, and nothing more.
    telemetry_db.ensure_schema(stack)
    with psycopg.connect(stack.postgres_url("telemetry_reader"), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM telemetry_windows").fetchone()
        # Read-only by default; even in a read-write transaction, the privilege is missing.
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM telemetry_samples")


def test_scratch_rows_go_even_for_runs_no_producer_of_ours_registered(stack: Settings) -> None:
    # A raw producer (a test's, a game bridge's) writes no stream_runs row; the
    # consumer records each run it stores with its topic, so cleaning up finds it.
    run = f"unregistered-{uuid.uuid4().hex[:6]}"
    sample = schema.TelemetrySample(
        v=schema.SCHEMA_VERSION, run_id=run, session_key=RACE, driver_number=1, driver="VER",
        seq=0, date_us=1_685_275_200_000_000, session_time_s=0.0, speed=100.0, rpm=9_000.0,
        gear=4, throttle=50.0, brake=0.0, drs_open=False,
    )  # fmt: skip
    with scratch_topics(stack, "test-cleanup") as settings:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
        producer.produce(settings.telemetry_topic, schema.encode(sample), b"2023_Monaco_R:1")
        assert producer.flush(10) == 0
        report = StreamConsumer("cleanup", settings=settings).run(idle_timeout_s=5)
        assert report.samples == 1
        with telemetry_db.connect(settings) as conn:
            topic = conn.execute(
                "SELECT topic FROM stream_runs WHERE run_id = %s", (run,)
            ).fetchone()
        assert topic == (settings.telemetry_topic,)
    with telemetry_db.connect(stack) as conn:
        left = conn.execute(
            "SELECT count(*) FROM telemetry_samples WHERE run_id = %s", (run,)
        ).fetchone()
    assert left == (0,)


class _ModelBroke(RuntimeError):
    pass


class _ScorerFailingAt:
    """A model that fails on its Nth batch, as a corrupt one would, and otherwise
    scores nothing: the fault meets a batch whose commit has later ones queued
    behind it (the models score on the prepare thread, ahead of the commit)."""

    def __init__(self, failing_batch: int) -> None:
        self.failing_batch = failing_batch
        self.batches = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def score(self, samples: Any, features: Any) -> Any:
        from pipeline.processing.columns import Columns

        self.batches += 1
        if self.batches == self.failing_batch:
            raise _ModelBroke(f"batch {self.batches}")
        return Columns({}, 0)


def test_a_failed_commit_voids_the_batches_queued_behind_it(
    isolated: tuple[Settings, dict[str, str]], race: pd.DataFrame
) -> None:
    settings, _ = isolated
    run = f"void-{uuid.uuid4().hex[:6]}"
    seconds = 600.0
    produce_session(
        settings.export_dir / RACE, speed=None, run_id=run, duration_s=seconds, settings=settings
    )
    small = settings.model_copy(update={"stream_batch_size": 200})
    failing = _ScorerFailingAt(failing_batch=6)
    with pytest.raises(_ModelBroke):
        StreamConsumer("breaks", settings=small, scorers=[failing]).run(
            until_run=run, idle_timeout_s=60
        )
    # Stored: whole batches up to the failed one, none after it, so each
    # partition's rows are the offsets before its committed one, without a gap.
    with telemetry_db.connect(settings) as conn:
        committed: dict[int, int | None] = dict(
            conn.execute(
                "SELECT topic_partition, next_offset FROM consumer_offsets "
                "WHERE group_id = %s AND topic = %s",
                (settings.consumer_group, settings.telemetry_topic),
            ).fetchall()
        )
        offsets = conn.execute(
            "SELECT topic_partition, array_agg(kafka_offset ORDER BY kafka_offset) "
            "FROM telemetry_samples WHERE run_id = %s GROUP BY 1",
            (run,),
        ).fetchall()
    assert offsets, "the batches before the failed one were committed"
    for partition, stored in offsets:
        assert stored == list(range(committed[partition] or 0)), partition
    StreamConsumer("successor", settings=settings, scorers=[]).run(until_run=run, idle_timeout_s=60)
    first = race["session_time_s"].iloc[0]
    assert_exactly_once(settings, run, race[race["session_time_s"] < first + seconds])

"""Replay an exported session into the telemetry topic (`f1 produce`).

The replay clock paces column batches; each row becomes one `TelemetrySample`.
Each car of a run has a partition of its own choosing (`CarPartitioner`): the
session's cars dealt round-robin over the partitions, so 20 cars on 4 partitions
are 5 each (key hashing put 45 % of a race on one). A car's samples all go to
one partition, so their order holds. Deliveries are counted by partition from
the delivery reports, and the run ends with an `EndOfStream` per partition
carrying that count, so consumers can tell when they hold the whole run. The run
is recorded in `stream_runs`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import schema
from pipeline.kafka.client import check_reachable, producer_config, topic_partitions
from pipeline.settings import Settings, get_settings
from pipeline.sinks import telemetry_db
from pipeline.sources.replay import Replay, load_samples

if TYPE_CHECKING:
    import pandas as pd
    from confluent_kafka import KafkaError, Message

log = logging.getLogger(__name__)

SOURCE = "fastf1-replay"
# Message fields taken straight from the export's columns.
PLAIN_FIELDS = (
    "driver_number", "driver", "session_time_s", "speed", "rpm", "gear", "throttle",
    "lap_number", "stint", "compound", "tyre_life", "position", "last_lap_s", "gap_ahead_s",
    "race_laps", "is_in_lap", "is_out_lap", "track_status", "resampled",
)  # fmt: skip


@dataclass
class ProduceReport:
    run_id: str
    session_key: str
    planned: int
    delivered: int = 0
    failed: int = 0
    seconds: float = 0.0
    session_seconds: float = 0.0
    speed: float | None = None
    stopped_early: bool = False
    per_partition: dict[int, int] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    # (driver_number, seq) of every sample whose delivery failed: with `planned`,
    # exactly what was acknowledged (what "nothing lost" is measured against).
    failed_samples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def intended_rate_hz(self) -> float | None:
        """Samples per wall second the replay clock asks for (None: unpaced)."""
        if self.speed is None or not self.session_seconds:
            return None
        return self.planned / self.session_seconds * self.speed

    @property
    def achieved_rate_hz(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


def new_run_id(session_key: str) -> str:
    return f"{session_key}@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def message_columns(samples: pd.DataFrame, run_id: str, session_key: str) -> dict[str, list[Any]]:
    """The export's rows as plain Python columns in schema terms (NaN -> None),
    computed once for the whole session, vectorized."""
    import numpy as np

    columns: dict[str, list[Any]] = {}
    for name in PLAIN_FIELDS:
        column = samples[name]
        if column.dtype.kind in "fO" or str(column.dtype) in ("string", "Int8", "Int16"):
            values = column.astype(object).where(column.notna(), None)
        else:
            values = column
        columns[name] = values.tolist()
    for name in ("lap_number", "stint", "position", "race_laps"):  # whole numbers stored as float
        columns[name] = [None if v is None else int(v) for v in columns[name]]
    columns["brake"] = np.where(samples["brake"].to_numpy(dtype=bool), 100.0, 0.0).tolist()
    drs = samples["drs"].to_numpy()
    columns["drs"] = drs.tolist()
    columns["drs_open"] = (drs >= 10).tolist()  # FastF1: 10, 12, 14 = flap open
    columns["date_us"] = (samples["date"].astype("int64") // 1000).tolist()
    columns["seq"] = samples["seq"].tolist()
    columns["run_id"] = [run_id] * len(samples)
    columns["session_key"] = [session_key] * len(samples)
    columns["v"] = [schema.SCHEMA_VERSION] * len(samples)
    return columns


def produce_session(
    export_folder: Path,
    *,
    speed: float | None = 1.0,
    run_id: str | None = None,
    start_offset_s: float = 0.0,
    duration_s: float | None = None,
    settings: Settings | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[int], None] = lambda rows: None,
) -> ProduceReport:
    """Replay one export into the telemetry topic and return what happened.
    `duration_s` limits the replay to that much session time."""
    import numpy as np
    from confluent_kafka import Producer

    settings = settings or get_settings()
    stop = stop or threading.Event()
    check_reachable(settings)
    # Made before the export loads: an idempotent producer holds its first
    # messages until the broker has given it a producer id (about half a second
    # after it starts), which would otherwise be added to the first samples'
    # latency (measured on a 1x replay: the first instants 508 ms from produce to
    # commit; Kafka alone, produce to poll p99 467 ms when started at once, 11 ms so).
    producer = Producer(producer_config(settings))
    samples = load_samples(export_folder)
    session_key = export_folder.name
    # seq: each sample's index in its car's export, stable whatever slice is replayed.
    samples["seq"] = samples.groupby("driver_number").cumcount()
    times = samples["session_time_s"].to_numpy()
    begin = times[0] + start_offset_s
    end = begin + duration_s if duration_s is not None else np.inf
    samples = samples[(times >= begin) & (times < end)].reset_index(drop=True)
    if samples.empty:
        raise ValueError(
            f"{session_key}: nothing to replay from offset {start_offset_s} s "
            f"(the session lasts {times[-1] - times[0]:.0f} s)."
        )
    run_id = run_id or new_run_id(session_key)
    report = ProduceReport(run_id, session_key, planned=len(samples), speed=speed)
    report.session_seconds = float(samples["session_time_s"].iloc[-1] - begin)
    columns = message_columns(samples, run_id, session_key)
    fields = schema.SAMPLE_FIELDS
    cars = samples["driver_number"].unique().tolist()
    publisher = RunPublisher(producer, settings, report, SOURCE, cars=cars)
    publisher.start()
    started = time.perf_counter()
    row = 0
    try:
        replay = Replay(samples[["session_time_s"]], speed=speed, max_batch=2_000)
        for batch in replay:
            hi = row + len(batch["session_time_s"])
            publisher.send(
                (
                    schema.TelemetrySample(*values)
                    for values in zip(*(columns[f][row:hi] for f in fields), strict=True)
                ),
                time.time_ns() // 1000,
            )
            on_progress(hi - row)
            row = hi
            if stop.is_set():
                report.stopped_early = row < report.planned
                log.info("stop requested: flushing after %d of %d samples", row, report.planned)
                break
        publisher.end_markers()
    finally:
        report.seconds = time.perf_counter() - started
        publisher.finish()
    return report


class CarPartitioner:
    """Deals a run's cars over the topic's partitions round-robin, in the order of
    their race numbers (the replay knows them all up front, so the deal does not
    depend on which car sent first), and cars first seen later on the next
    partitions. The deal starts at a partition chosen by the run id, so runs that
    do not divide evenly (22 game cars on 4) do not all load partitions 0 and 1."""

    def __init__(self, run_id: str, partitions: int, cars: Iterable[int] = ()) -> None:
        import zlib

        self.partitions = partitions
        self._first = zlib.crc32(run_id.encode()) % partitions
        self._of: dict[int, int] = {}
        for car in sorted(set(cars)):
            self.partition(car)

    def partition(self, driver_number: int) -> int:
        found = self._of.get(driver_number)
        if found is None:
            found = self._of[driver_number] = (self._first + len(self._of)) % self.partitions
        return found


class RunPublisher:
    """Publishes one run's samples to the telemetry topic: deliveries counted
    per partition from the delivery reports (with the failed samples' keys),
    the run's end markers carrying those counts, and its `stream_runs` row.
    Sources share it: the FastF1 replay and the game's UDP feed."""

    def __init__(
        self,
        producer: Any,
        settings: Settings,
        report: ProduceReport,
        source: str,
        cars: Iterable[int] = (),
    ):
        self.producer = producer
        self.settings = settings
        self.report = report
        self.source = source
        topic = settings.telemetry_topic
        partitions = len(topic_partitions(producer, topic))
        self.cars = CarPartitioner(report.run_id, partitions, cars)
        self.delivered: Counter[int] = Counter()
        self.sent = 0  # produce calls made (a live source knows its total only at the end)

    def _on_delivery(self, err: KafkaError | None, message: Message) -> None:
        if err is None:
            self.delivered[message.partition()] += 1  # type: ignore[index]
            return
        self.report.failed += 1
        self.report.errors[str(err)] += 1
        sent = schema.decode(message.value() or b"")
        if isinstance(sent, schema.TelemetrySample):
            self.report.failed_samples.append((sent.driver_number, sent.seq))

    def start(self) -> None:
        _record_run_start(self.settings, self.report, self.source)

    def send(self, samples: Iterable[schema.TelemetrySample], produced_at_us: int) -> int:
        """Produce a batch of samples (one instant of the source) with one header
        list; serve delivery reports without waiting. Returns how many."""
        headers = schema.headers(self.source, produced_at_us)
        topic = self.settings.telemetry_topic
        sent = 0
        for sample in samples:
            _produce(
                self.producer,
                topic,
                schema.encode(sample),
                schema.message_key(sample.session_key, sample.driver_number),
                headers,
                self._on_delivery,
                self.cars.partition(sample.driver_number),
            )
            sent += 1
        self.sent += sent
        self.producer.poll(0)
        return sent

    def end_markers(self) -> None:
        """Wait for every delivery, then send each partition its end marker."""
        self._tally()
        _send_end_markers(self.producer, self.settings, self.report, self.source)

    def finish(self) -> None:
        """Flush and record the run's end (also after a failure)."""
        self._tally()
        _record_run_end(self.settings, self.report)

    def _tally(self) -> None:
        """Wait for every delivery report, then count what was delivered."""
        _flush(self.producer)
        self.report.per_partition = dict(sorted(self.delivered.items()))
        self.report.delivered = sum(self.delivered.values())


def _produce(
    producer: Any, topic: str, value: bytes, key: bytes, headers: Any, cb: Any, partition: int = -1
) -> None:
    while True:
        try:
            producer.produce(
                topic, value, key, partition=partition, headers=headers, on_delivery=cb
            )
            return
        except BufferError:  # local queue full: let deliveries drain, then retry
            producer.poll(0.05)


def _flush(producer: Any) -> None:
    while producer.flush(5.0):
        log.warning("still waiting for %d deliveries", len(producer))


def _send_end_markers(
    producer: Any, settings: Settings, report: ProduceReport, source: str
) -> None:
    for partition in topic_partitions(producer, settings.telemetry_topic):
        marker = schema.EndOfStream(
            v=schema.SCHEMA_VERSION,
            run_id=report.run_id,
            session_key=report.session_key,
            partition=partition,
            samples=report.per_partition.get(partition, 0),
        )
        producer.produce(
            settings.telemetry_topic,
            schema.encode(marker),
            f"{report.session_key}:end".encode(),
            partition=partition,
            headers=schema.headers(source, time.time_ns() // 1000),
        )
    _flush(producer)


def _record_run_start(settings: Settings, report: ProduceReport, source: str) -> None:
    telemetry_db.ensure_schema(settings)
    with telemetry_db.connect(settings, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO stream_runs (run_id, session_key, source, speed, samples_planned, "
            "intended_rate_hz, topic) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (run_id) DO UPDATE SET started_at = now(), finished_at = NULL",
            (report.run_id, report.session_key, source, report.speed, report.planned,
             report.intended_rate_hz, settings.telemetry_topic),
        )  # fmt: skip


def _record_run_end(settings: Settings, report: ProduceReport) -> None:
    with telemetry_db.connect(settings, autocommit=True) as conn:
        conn.execute(
            "UPDATE stream_runs SET finished_at = now(), samples_planned = %s, "
            "samples_delivered = %s, delivery_failures = %s, achieved_rate_hz = %s, "
            "stopped_early = %s WHERE run_id = %s",
            (report.planned, report.delivered, report.failed, report.achieved_rate_hz,
             report.stopped_early, report.run_id),
        )  # fmt: skip

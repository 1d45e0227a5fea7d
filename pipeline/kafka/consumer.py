"""The stream consumer (`f1 consume`): any number of processes in one group.

Per batch: decode and validate every message (bad ones to the dead-letter
topic, with the reason), run the per-car logic (`pipeline.processing.batch`),
let the scorers (the ML models) score the batch, then write rows, offsets and
per-car state to PostgreSQL in one transaction. On assignment a partition's
offset and state are read back from PostgreSQL, so a crash or a rebalance
neither loses nor doubles a row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from pipeline import schema
from pipeline.kafka.client import check_reachable, consumer_config, producer_config
from pipeline.live import feed as live_feed
from pipeline.processing import batch as batch_logic
from pipeline.settings import Settings, get_settings
from pipeline.sinks import telemetry_db

if TYPE_CHECKING:
    import pandas as pd
    import psycopg
    from confluent_kafka import Consumer, Message, Producer, TopicPartition

log = logging.getLogger(__name__)

PAYLOAD_HEAD_BYTES = 1024


class BatchScorer(Protocol):
    """The seam where models plug in: score a processed batch (its samples and
    their features) with one call per model, returning rows for `table`."""

    table: str

    def score(self, samples: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame: ...


@dataclass
class ConsumeReport:
    member: str
    batches: int = 0
    messages: int = 0
    samples: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    late: int = 0
    anomalies: int = 0
    windows: int = 0
    run_ends: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    busy_seconds: float = 0.0  # from the first message received to the last commit
    latencies_ms: list[float] = field(default_factory=list)  # kept when asked (benchmarks)

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.busy_seconds if self.busy_seconds else 0.0


@dataclass
class _Decoded:
    samples: list[schema.TelemetrySample] = field(default_factory=list)
    meta: list[tuple[int, int, int | None]] = field(
        default_factory=list
    )  # partition, offset, produced
    ends: list[tuple[int, schema.EndOfStream]] = field(default_factory=list)
    dead: list[tuple[Message, str, str]] = field(default_factory=list)  # message, class, reason


class StreamConsumer:
    def __init__(
        self,
        member: str,
        *,
        settings: Settings | None = None,
        scorers: Sequence[BatchScorer] | None = None,
        stop: threading.Event | None = None,
        keep_latencies: bool = False,
    ) -> None:
        self.settings = settings or get_settings()
        self.keep_latencies = keep_latencies
        self._first_message: float | None = None
        self.member = member
        self.scorers = scorers
        if self.scorers is None:  # the champions, unless serving is off
            from pipeline.ml.serving import ChampionScorer

            self.scorers = [ChampionScorer(self.settings)] if self.settings.serve_models else []
        self.stop = stop or threading.Event()
        self.topic = self.settings.telemetry_topic
        self.group = self.settings.consumer_group
        self.window = batch_logic.WindowConfig(
            window_s=self.settings.window_s, allowed_lateness_s=self.settings.allowed_lateness_s
        )
        self.states: dict[int, batch_logic.PartitionState] = {}
        self.epochs: dict[int, int] = {}
        self.report = ConsumeReport(member)
        self._conn: psycopg.Connection | None = None
        self._consumer: Consumer | None = None
        self._dead_letter_producer: Producer | None = None

    # --- group membership --------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        assert self._conn is not None
        claims = telemetry_db.claim_partitions(
            self._conn, self.group, self.topic, [p.partition for p in partitions]
        )
        for tp, claim in zip(partitions, claims, strict=True):
            tp.offset = claim.next_offset if claim.next_offset is not None else OFFSET_BEGINNING
            self.states[tp.partition] = batch_logic.PartitionState.decode(claim.state)
            self.epochs[tp.partition] = claim.epoch
        log.info("%s assigned %s", self.member, {p.partition: p.offset for p in partitions})
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every finished batch is already committed: just forget the state.
        for tp in partitions:
            self.states.pop(tp.partition, None)
            self.epochs.pop(tp.partition, None)
        log.info("%s revoked %s", self.member, [p.partition for p in partitions])
        consumer.unassign()

    def _subscribe(self) -> None:
        assert self._consumer is not None
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )  # fmt: skip

    # --- the loop ---------------------------------------------------------------------
    def run(
        self,
        *,
        until_run: str | None = None,
        idle_timeout_s: float | None = None,
        max_seconds: float | None = None,
    ) -> ConsumeReport:
        """Consume until stopped: a signal (`stop`), the run `until_run` complete
        (every partition's end marker committed), `idle_timeout_s` without a
        message, or `max_seconds`."""
        from confluent_kafka import Consumer, Producer

        check_reachable(self.settings)
        telemetry_db.ensure_schema(self.settings)
        self._conn = telemetry_db.connect(self.settings, autocommit=True)
        self._consumer = Consumer(consumer_config(self.settings, self.member))
        self._dead_letter_producer = Producer(producer_config(self.settings, **{"linger.ms": 0}))
        partitions_total = len(
            self._consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        )
        self._subscribe()
        started = last_message = time.monotonic()
        last_check = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if max_seconds is not None and now - started >= max_seconds:
                    self.report.stop_reason = f"ran {max_seconds:g} s"
                    break
                if until_run and now - last_check > 1.0:
                    last_check = now
                    ended, _, _ = telemetry_db.run_completion(self._conn, until_run)
                    if ended >= partitions_total:
                        self.report.stop_reason = f"run {until_run} complete"
                        break
                messages = self._consumer.consume(
                    self.settings.stream_batch_size, timeout=self.settings.stream_batch_wait_s
                )
                if not messages:
                    if idle_timeout_s is not None and now - last_message >= idle_timeout_s:
                        self.report.stop_reason = f"idle {idle_timeout_s:g} s"
                        break
                    continue
                last_message = time.monotonic()
                self._handle(messages)
            else:
                self.report.stop_reason = "stop requested"
        finally:
            self.report.seconds = time.monotonic() - started
            self._consumer.close()  # leaves the group: partitions move on at once
            self._dead_letter_producer.flush(10)
            self._conn.close()
        return self.report

    def _handle(self, messages: list[Message]) -> None:
        import numpy as np

        assert self._conn is not None and self._consumer is not None
        started = time.perf_counter()
        if self._first_message is None:
            self._first_message = started
        decoded, next_offsets = self._decode(messages)
        frame = _frame(decoded)
        result = batch_logic.process(
            frame, self.states, self.window, with_features=bool(self.scorers)
        )
        for partition, end in decoded.ends:
            result.windows += batch_logic.end_run(self.states[partition], end.run_id, self.window)
        scored = {}
        if len(result.samples) and result.features is not None:
            scored = {s.table: s.score(result.samples, result.features) for s in self.scorers or ()}
        dead_rows = self._dead_letter(decoded.dead)
        commits = [
            telemetry_db.PartitionCommit(p, offset, self.epochs[p], self.states[p].encode())
            for p, offset in next_offsets.items()
        ]
        try:
            telemetry_db.commit_batch(
                self._conn,
                group_id=self.group,
                topic=self.topic,
                samples=result.samples,
                events=result.anomalies,
                windows=result.windows,
                dead_letters=dead_rows,
                run_ends=[(e.run_id, p, e.samples) for p, e in decoded.ends],
                partitions=commits,
                extra_tables=scored,
            )
        except telemetry_db.Fenced as err:
            # Presumed dead and replaced: drop everything and rejoin from the stored offsets.
            log.warning("%s: %s; rejoining the group", self.member, err)
            self._consumer.unsubscribe()
            self.states.clear()
            self._subscribe()
            return
        committed_us = time.time_ns() // 1000
        produced = np.array([m[2] for m in decoded.meta if m[2] is not None], dtype=np.int64)
        latency_ms = (committed_us - produced) / 1000.0
        p50, p95, p99 = (
            np.percentile(latency_ms, [50, 95, 99]).tolist() if len(latency_ms) else [None] * 3
        )
        elapsed = time.perf_counter() - started
        anomalies = len(result.anomalies)
        r = self.report
        r.busy_seconds = time.perf_counter() - self._first_message
        if self.keep_latencies:
            r.latencies_ms += latency_ms.tolist()
        r.batches += 1
        r.messages += len(messages)
        r.samples += len(result.samples)
        r.dead_letters += len(decoded.dead)
        r.duplicates += result.duplicates
        r.late += result.late
        r.anomalies += anomalies
        r.windows += len(result.windows)
        r.run_ends += len(decoded.ends)
        update = live_feed.batch_update(
            consumer=self.member,
            samples=result.samples,
            predictions=scored.get("telemetry_predictions"),
            alerts=result.anomalies,
            latency_ms=(p50, p99),
            committed_us=committed_us,
        )
        telemetry_db.record_metrics(
            self._conn,
            {
                "group_id": self.group,
                "consumer": self.member,
                # The batch's main session, so dashboards can filter health by session.
                "session_key": (
                    result.samples["session_key"].mode().iat[0] if len(result.samples) else None
                ),
                "partitions": sorted(self.states),
                "messages": len(messages),
                "samples": len(result.samples),
                "duplicates": result.duplicates,
                "late": result.late,
                "anomalies": anomalies,
                "windows": len(result.windows),
                "dead_letters": len(decoded.dead),
                "lag": self._lag(),
                "latency_p50_ms": p50,
                "latency_p95_ms": p95,
                "latency_p99_ms": p99,
                "batch_seconds": elapsed,
                "messages_per_s": len(messages) / elapsed if elapsed else 0.0,
            },
            notify=(self.settings.live_channel, update) if update else None,
        )

    def _decode(self, messages: list[Message]) -> tuple[_Decoded, dict[int, int]]:
        decoded = _Decoded()
        next_offsets: dict[int, int] = {}
        limit = self.settings.max_message_bytes
        for message in messages:
            if message.error() is not None:
                log.warning("%s: broker reported %s", self.member, message.error())
                continue
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            if partition not in self.states:
                continue  # revoked during this poll: its new owner reads it again
            next_offsets[partition] = offset + 1
            raw = message.value() or b""
            if len(raw) > limit:
                decoded.dead.append(
                    (message, "oversized", f"{len(raw)} bytes, over the {limit}-byte limit")
                )
                continue
            try:
                value = schema.decode(raw)
            except msgspec.ValidationError as err:
                decoded.dead.append((message, "invalid", str(err)))
                continue
            except msgspec.DecodeError as err:
                decoded.dead.append((message, "malformed", str(err)))
                continue
            if isinstance(value, schema.EndOfStream):
                decoded.ends.append((partition, value))
                continue
            produced = schema.header_value(message.headers(), schema.HEADER_PRODUCED_AT)
            decoded.samples.append(value)
            decoded.meta.append((partition, offset, int(produced) if produced else None))
        return decoded, next_offsets

    def _dead_letter(self, dead: list[tuple[Message, str, str]]) -> list[tuple[Any, ...]]:
        """Send each bad message to the dead-letter topic (delivered before the
        batch commits, so none is lost) and return its database rows."""
        if not dead:
            return []
        assert self._dead_letter_producer is not None
        rows = []
        for message, error_class, reason in dead:
            self.report.dead_letter_reasons[error_class] += 1
            raw = message.value() or b""
            key = message.key()
            headers = [
                *(message.headers() or []),
                ("error_class", error_class.encode()),
                ("error", reason.encode()),
                ("origin", f"{message.topic()}/{message.partition()}/{message.offset()}".encode()),
                ("consumer", self.member.encode()),
            ]
            self._dead_letter_producer.produce(
                self.settings.dead_letter_topic, raw, key, headers=headers
            )
            rows.append(
                (self.member, message.topic(), message.partition(), message.offset(),
                 key.decode(errors="replace") if key else None, error_class, reason, len(raw),
                 raw[:PAYLOAD_HEAD_BYTES])
            )  # fmt: skip
        remaining = self._dead_letter_producer.flush(30)
        if remaining:
            raise RuntimeError(f"{remaining} dead letters not delivered; not committing")
        return rows

    def _lag(self) -> int | None:
        assert self._consumer is not None
        from confluent_kafka import TopicPartition

        total = 0
        for partition in self.states:
            tp = TopicPartition(self.topic, partition)
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            position = self._consumer.position([tp])[0].offset
            if high < 0 or position < 0:
                return None
            total += high - position
        return total


class RunIncomplete(RuntimeError):
    pass


def verify_run(
    stream_run: str,
    *,
    delivered: int,
    settings: Settings | None = None,
    idle_timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Drain what the group has not stored yet, then check the run: every
    partition's end marker committed, and exactly as many rows as delivered."""
    settings = settings or get_settings()
    report = StreamConsumer(f"{stream_run}-verify", settings=settings).run(
        until_run=stream_run, idle_timeout_s=idle_timeout_s
    )
    from pipeline.kafka.topics import admin_client, describe

    partitions, _ = describe(admin_client(settings), settings.telemetry_topic)
    with telemetry_db.connect(settings, autocommit=True) as conn:
        ended, announced, stored = telemetry_db.run_completion(conn, stream_run)
    summary = {
        "stream_run": stream_run,
        "delivered": delivered,
        "announced_by_end_markers": announced,
        "stored": stored,
        "partitions_ended": ended,
        "partitions": partitions,
        "drained_by_verify": report.samples,
    }
    if ended < partitions or not stored == announced == delivered:
        raise RunIncomplete(
            f"run {stream_run} is not complete: {summary}. Consumers may still be "
            "catching up (run `f1 consume --until-run` to drain) or a consumer failed."
        )
    return summary


def _frame(decoded: _Decoded) -> pd.DataFrame:
    """The batch's samples as columns (one pass over the structs)."""
    import pandas as pd

    fields = schema.SAMPLE_FIELDS
    if decoded.samples:
        rows = zip(*(msgspec.structs.astuple(s) for s in decoded.samples), strict=True)
        columns = dict(zip(fields, rows, strict=True))
        partition, offset, produced = zip(*decoded.meta, strict=True)
    else:
        columns = {f: () for f in fields}
        partition = offset = produced = ()
    # Nullable whole numbers would otherwise become floats (None -> NaN).
    frame = pd.DataFrame(columns).astype(
        {"lap_number": "Int64", "stint": "Int64", "position": "Int64", "drs": "Int64"}
    )
    frame["partition"] = pd.Series(partition, dtype="int64")
    frame["offset"] = pd.Series(offset, dtype="int64")
    frame["produced_at_us"] = pd.Series(produced, dtype="Int64")
    return frame

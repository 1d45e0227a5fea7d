"""The stream consumer (`f1 consume`): any number of processes in one group.

It does the Kafka and transaction I/O. Per batch: poll what has arrived;
`pipeline.processing.compose` turns it into rows (decode and validate every
message, the per-car logic, the models' scores); send the bad messages to the
dead-letter topic with their reason; then write rows, offsets and per-car state
to PostgreSQL in one transaction, on a commit thread while the next batch is
composed (one batch in flight at most, committed in order). On assignment a partition's
offset and state are read back from PostgreSQL, so a crash or a rebalance
neither loses nor doubles a row.

No message stops it: every one is stored or dead-lettered with its class
(`malformed`, `invalid`, `out_of_bounds`, `bad_header`, `oversized`) and reason.
A lost PostgreSQL connection is retried with backoff (`db_retry_s`) while the
consumer stays in its group; errors the broker or client report are counted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from pipeline import faults, schema
from pipeline.kafka.client import (
    check_reachable,
    consumer_config,
    producer_config,
    topic_partitions,
)
from pipeline.live import feed as live_feed
from pipeline.processing import batch as batch_logic
from pipeline.processing import compose
from pipeline.settings import Settings, get_settings
from pipeline.sinks import telemetry_db

if TYPE_CHECKING:
    import psycopg
    from confluent_kafka import Consumer, Message, Producer, TopicPartition

log = logging.getLogger(__name__)

# Batches queued for the commit thread at most: two, so the commit of one, the
# scores and COPY data of the next, and the composing of a third all overlap.
COMMITS_IN_FLIGHT = 2
PAYLOAD_HEAD_BYTES = 1024


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
    broker_errors: int = 0
    clashes: int = 0  # rows (not samples) skipped because their key was stored already
    state_resets: int = 0
    db_retries: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    busy_seconds: float = 0.0  # from the first message received to the last commit
    cpu_seconds: float = 0.0  # this process's CPU over the same span (start-up left out)
    # The same span on the wall clock (epoch seconds): a group's over its processes.
    busy_from: float = 0.0
    busy_until: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # kept when asked (benchmarks)
    # Where a sample's produce-to-commit goes, kept with the latencies: per message,
    # produce to poll; per batch, composing it, waiting for the commit thread (the
    # batch before still committing), and its transaction.
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    # Per batch, kept with the latencies: when it committed (wall clock, µs) and
    # its messages; a group's rate while all its processes are at work comes from it.
    commits: list[tuple[int, int]] = field(default_factory=list)

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.busy_seconds if self.busy_seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """The report as plain values, for a DAG task's result (XCom). The dead
        letters' classes as a dict: `asdict` would rebuild the Counter from its
        (class, count) pairs, counting the pairs themselves."""
        return {**asdict(self), "dead_letter_reasons": dict(self.dead_letter_reasons)}


class StreamConsumer:
    def __init__(
        self,
        member: str,
        *,
        settings: Settings | None = None,
        scorers: Sequence[compose.BatchScorer] | None = None,
        stop: threading.Event | None = None,
        keep_latencies: bool = False,
    ) -> None:
        self.settings = settings or get_settings()
        self.keep_latencies = keep_latencies
        self._first_message: float | None = None
        self._first_cpu = 0.0
        self.member = member
        self.scorers = scorers
        if self.scorers is None:  # the champions, unless serving is off
            from pipeline.ml.serving import ChampionScorer

            self.scorers = [ChampionScorer(self.settings)] if self.settings.serve_models else []
        self.stop = stop or threading.Event()
        self.topic = self.settings.telemetry_topic
        self.group = self.settings.consumer_group
        self.window = batch_logic.WindowConfig(
            window_s=self.settings.window_s,
            allowed_lateness_s=self.settings.allowed_lateness_s,
            max_event_time_ahead_s=self.settings.max_event_time_ahead_s,
            max_seq_ahead=self.settings.max_seq_ahead,
            car_idle_s=self.settings.car_idle_s,
            idle_cars_kept=self.settings.idle_cars_kept,
        )
        self.states: dict[int, batch_logic.PartitionState] = {}
        self.epochs: dict[int, int] = {}
        self.offsets: dict[int, int | None] = {}  # next offset as last committed
        self._runs_seen: set[str] = set()
        self._client_errors = 0  # reported by librdkafka's error callback, not yet stored
        self._client_error_logged = 0.0
        self._pending_resets = 0
        self.report = ConsumeReport(member)
        self._conn: psycopg.Connection | None = None
        self._consumer: Consumer | None = None
        self._dead_letter_producer: Producer | None = None
        # The batches being committed while the next one is composed (at most
        # COMMITS_IN_FLIGHT; they commit in order, on one connection): each one's
        # result is the bookkeeping to do once it has committed.
        self._committer: ThreadPoolExecutor | None = None
        # A stage between composing (this thread) and committing (the commit
        # thread): the models score the batch and its rows are encoded for COPY
        # while the batch before is in its transaction, so the commit thread only
        # waits on PostgreSQL. XGBoost predicts without the GIL: the three
        # stages overlap on two cores.
        self._preparer: ThreadPoolExecutor | None = None
        self._in_flight: deque[_InFlight] = deque()  # oldest first
        # Set by a commit that failed: the batches queued behind it write nothing.
        self._commit_failed = threading.Event()
        self._fenced: telemetry_db.Fenced | None = None  # found in a rebalance callback

    # --- group membership --------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        self._settle(in_callback=True)  # claims read what the batch in flight stores
        claims = self._with_database(
            "claiming partitions",
            lambda conn: telemetry_db.claim_partitions(
                conn, self.group, self.topic, [p.partition for p in partitions]
            ),
        )
        for tp in partitions:
            claim = claims[tp.partition]
            tp.offset = claim.next_offset if claim.next_offset is not None else OFFSET_BEGINNING
            self.states[tp.partition] = self._decode_state(tp.partition, claim.state)
            self.epochs[tp.partition] = claim.epoch
            self.offsets[tp.partition] = claim.next_offset
        log.info("%s assigned %s", self.member, {p.partition: p.offset for p in partitions})
        faults.point(self.settings, faults.ASSIGNED)
        consumer.assign(partitions)

    def _decode_state(self, partition: int, raw: bytes | None) -> batch_logic.PartitionState:
        """The stored state, or a fresh one when no version of ours could have
        written it: its cars start anew, and the database keys still refuse
        whatever it would have recognised as a resend."""
        try:
            return batch_logic.PartitionState.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.error("%s: state of partition %d unreadable (%s); starting it anew",
                      self.member, partition, err)  # fmt: skip
            self.report.state_resets += 1
            self._pending_resets += 1
            return batch_logic.PartitionState()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The batch in flight commits (or is fenced) before the partitions go:
        # then every finished batch is stored, and the state can be forgotten.
        self._settle(in_callback=True)
        for tp in partitions:
            self.states.pop(tp.partition, None)
            self.epochs.pop(tp.partition, None)
            self.offsets.pop(tp.partition, None)
        log.info("%s revoked %s", self.member, [p.partition for p in partitions])
        consumer.unassign()

    def _subscribe(self) -> None:
        assert self._consumer is not None
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )  # fmt: skip

    def _on_error(self, error: Any) -> None:
        """librdkafka's error callback: the broker down, a request failing. The
        client retries by itself; we count what it reports."""
        self._client_errors += 1
        now = time.monotonic()
        if now - self._client_error_logged > 10:  # it repeats while the broker is down
            self._client_error_logged = now
            log.warning("%s: Kafka client reported %s", self.member, error)

    # --- the database, through outages ---------------------------------------------------
    def _with_database(self, what: str, work: Any, *, deadline: float | None = None) -> Any:
        """Run `work(conn)`; on a lost connection, reconnect with backoff and run
        it again, for up to `db_retry_s` (the consumer stays in its group: the
        client's heartbeats go on, and nothing is polled meanwhile). A failed
        transaction was rolled back, so running it again is safe."""
        import psycopg

        deadline = deadline or time.monotonic() + self.settings.db_retry_s
        delay = 0.5
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = telemetry_db.connect(self.settings, autocommit=True)
                return work(self._conn)
            # A session the server ended (restart, or our own idle-in-transaction
            # timeout after a pause inside a transaction) is a lost connection too.
            except (
                psycopg.OperationalError,
                psycopg.errors.IdleInTransactionSessionTimeout,
            ) as err:
                if time.monotonic() + delay > deadline or self.stop.is_set():
                    raise DatabaseUnavailable(
                        f"PostgreSQL unreachable for {self.settings.db_retry_s:g} s while "
                        f"{what} ({err}); nothing of the batch was committed, a restarted "
                        "consumer resumes from the last commit. Check `make status`."
                    ) from err
                log.warning("%s: PostgreSQL unavailable while %s (%s); retrying in %.1f s",
                            self.member, what, str(err).strip(), delay)  # fmt: skip
                self.report.db_retries += 1
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # --- the loop ---------------------------------------------------------------------
    def run(
        self,
        *,
        until_run: str | None = None,
        idle_timeout_s: float | None = None,
        max_seconds: float | None = None,
        idle_from_s: float = 0.0,
    ) -> ConsumeReport:
        """Consume until stopped: a signal (`stop`), the run `until_run` complete
        (every partition's end marker committed), `idle_timeout_s` without a
        message (counted from `idle_from_s` after the start at the earliest: a
        live source may stay silent until then), or `max_seconds`."""
        from confluent_kafka import Consumer, Producer

        check_reachable(self.settings)
        telemetry_db.ensure_schema(self.settings)
        for scorer in self.scorers or ():
            scorer.start()
        tune_gc()
        self._committer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.member}-commit")
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.member}-prepare")
        self._conn = telemetry_db.connect(self.settings, autocommit=True)
        self._consumer = Consumer(
            consumer_config(self.settings, self.member, error_cb=self._on_error)
        )
        self._dead_letter_producer = Producer(producer_config(self.settings, **{"linger.ms": 0}))
        partitions_total = len(topic_partitions(self._consumer, self.topic))
        self._subscribe()
        started = last_message = time.monotonic()
        last_check = last_idle_check = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if max_seconds is not None and now - started >= max_seconds:
                    self.report.stop_reason = f"ran {max_seconds:g} s"
                    break
                if until_run and now - last_check > 1.0:
                    last_check = now
                    if not self._settle():  # the batch in flight may end the run
                        continue
                    ended = self._with_database(
                        "checking the run",
                        lambda conn: telemetry_db.partitions_ended(conn, until_run),
                    )
                    if ended >= partitions_total:
                        self.report.stop_reason = f"run {until_run} complete"
                        break
                messages = self._next_batch()
                if self._fenced is not None:  # found by a rebalance callback
                    fenced, self._fenced = self._fenced, None
                    self._rejoin(fenced)
                    continue
                if not messages:
                    if now - last_idle_check > 1.0:  # cars of a run that stopped sending
                        last_idle_check = now
                        self._close_idle_cars()
                    quiet_since = max(last_message, started + idle_from_s)
                    if idle_timeout_s is not None and now - quiet_since >= idle_timeout_s:
                        self.report.stop_reason = f"idle {idle_timeout_s:g} s"
                        break
                    continue
                last_message = time.monotonic()
                self._handle(messages)
            else:
                self.report.stop_reason = "stop requested"
            self._settle()  # the last batch commits before the consumer leaves
        finally:
            self._committer.shutdown()  # leaving on an error: a commit running ends first
            self._committer = None
            self._preparer.shutdown()
            self._preparer = None
            for scorer in self.scorers or ():
                scorer.stop()
            self.report.seconds = time.monotonic() - started
            self._consumer.close()  # leaves the group: partitions move on at once
            self._dead_letter_producer.flush(10)
            if self._conn is not None:
                self._conn.close()
        return self.report

    def _next_batch(self) -> list[Any]:
        """Batch by what has arrived, not by a fixed wait: block only for the
        first message, then take what is buffered, or arrives within
        `stream_batch_linger_s` (a few ms: a source's instant, all its cars,
        comes in a burst spread over the producer's linger). At a low rate a
        sample waits for no batch to fill, and a burst is one batch, not two or
        three paying the fixed cost each; at a high rate the buffer fills the
        batch at once, and batches grow by themselves while the previous one
        is processed."""
        assert self._consumer is not None
        first = self._consumer.consume(1, timeout=self.settings.stream_batch_wait_s)
        if not first or self.settings.stream_batch_size == 1:
            return list(first)
        rest = self._consumer.consume(
            self.settings.stream_batch_size - 1, timeout=self.settings.stream_batch_linger_s
        )
        return [*first, *rest]

    def _close_idle_cars(self) -> None:
        """With nothing to read: close the windows of cars that went silent, and
        commit that (rows and state only; the offsets stay as they are)."""
        if not self.states or not self._settle():
            return
        lags = self._lags()
        caught_up = {p for p, lag in lags.items() if lag == 0}
        windows, changed = batch_logic.close_idle(
            self.states, self.window, now_us=time.time_ns() // 1000, caught_up=caught_up
        )
        changed = {p for p in changed if self.offsets.get(p) is not None}
        if not changed:
            return

        commits = [
            telemetry_db.PartitionCommit(p, offset, self.epochs[p], self.states[p].encode())
            for p in sorted(changed)
            if (offset := self.offsets[p]) is not None
        ]
        try:
            self._with_database(
                "closing idle cars",
                lambda conn: telemetry_db.commit_batch(
                    conn, group_id=self.group, topic=self.topic,
                    rows=telemetry_db.batch_rows(windows=windows), run_ends=[],
                    partitions=commits,
                ),
            )  # fmt: skip
        except telemetry_db.Fenced as err:
            self._rejoin(err)
            return
        self.report.windows += len(windows)

    def _rejoin(self, err: Exception) -> None:
        # Presumed dead and replaced: drop everything and rejoin from the stored offsets.
        assert self._consumer is not None
        log.warning("%s: %s; rejoining the group", self.member, err)
        self._consumer.unsubscribe()
        self.states.clear()
        self.epochs.clear()
        self.offsets.clear()
        self._subscribe()

    def _handle(self, messages: list[Message]) -> None:
        """Compose a polled batch and queue its commit; `messages` is emptied once
        decoded (those left dead are kept in the batch)."""
        import numpy as np

        assert self._consumer is not None
        started = time.perf_counter()
        polled_us = time.time_ns() // 1000
        if self._first_message is None:
            self._first_message, self._first_cpu = started, time.process_time()
            self.report.busy_from = time.time()
        lags = self._lags()
        batch = compose.compose(
            messages, self.states, self.window, with_features=bool(self.scorers),
            runs_seen=self._runs_seen, max_message_bytes=self.settings.max_message_bytes,
            caught_up={p for p, lag in lags.items() if lag == 0},
            now_us=time.time_ns() // 1000,
        )  # fmt: skip
        decoded, result = batch.decoded, batch.result
        # Decoded: the messages are freed now, while the cache still holds them,
        # not as their batch commits two batches later (`compose.decode_columns`).
        # The dead keep theirs, in `decoded.dead`.
        message_count = len(messages)
        messages.clear()
        next_offsets = decoded.next_offsets
        # Partitions that closed idle cars but had no message: their state (and
        # epoch check) goes in the same commit, at their stored offsets.
        resting = {
            p: offset
            for p in batch.idled - next_offsets.keys()
            if (offset := self.offsets.get(p)) is not None
        }
        dead_rows = self._dead_letter(decoded.dead)
        assert self._preparer is not None
        prepared = self._preparer.submit(self._prepare, batch, dead_rows)
        commits = [
            telemetry_db.PartitionCommit(p, offset, self.epochs[p], self.states[p].encode())
            for p, offset in sorted({**resting, **next_offsets}.items())
        ]
        new_runs = [(run, *where) for run, where in decoded.new_runs.items()]
        produced = np.array([at for at in decoded.produced if at is not None], dtype=np.int64)
        known_lags = list(lags.values())
        owned = sorted(self.states)
        broker_errors = decoded.broker_errors + self._client_errors
        state_resets = self._pending_resets

        def batch_metrics(skipped: dict[str, int]) -> tuple[dict[str, Any], bytes | None]:
            # Called by the batch's transaction once its rows are written: the
            # latency is stamped at its last write, just before COMMIT.
            written_us = time.time_ns() // 1000
            latency_ms = (written_us - produced) / 1000.0
            p50, p95, p99 = (
                np.percentile(latency_ms, [50, 95, 99]).tolist() if len(latency_ms) else [None] * 3
            )
            elapsed = time.perf_counter() - started
            clashed = skipped.get("telemetry_samples", 0)
            update = live_feed.batch_update(
                consumer=self.member,
                samples=result.columns,
                predictions=batch.scored,
                alerts=result.events,
                latency_ms=(p50, p99),
                committed_us=written_us,
            )
            row = {
                # When its rows were written (not the transaction's start, now()):
                # with batch_seconds, the span the consumer worked on the batch.
                "recorded_at": dt.datetime.fromtimestamp(written_us / 1e6, dt.UTC),
                "group_id": self.group,
                "consumer": self.member,
                # The batch's main session, so dashboards can filter health by session.
                "session_key": _main_session(result.columns["session_key"]),
                "partitions": owned,
                "messages": message_count,
                "samples": len(result.columns) - clashed,
                "duplicates": result.duplicates + clashed,
                "late": result.late,
                "anomalies": len(result.events),
                "windows": len(result.windows),
                "dead_letters": len(decoded.dead),
                "lag": None if None in known_lags else sum(int(lag or 0) for lag in known_lags),
                "latency_p50_ms": p50,
                "latency_p95_ms": p95,
                "latency_p99_ms": p99,
                "batch_seconds": elapsed,
                "messages_per_s": message_count / elapsed if elapsed else 0.0,
                "broker_errors": broker_errors,
                "clashes": sum(skipped.values()),
                "state_resets": state_resets,
            }
            return row, update

        run_ends = [(e.run_id, p, e.samples) for p, e in decoded.ends]
        composed_us = time.time_ns() // 1000
        faults.point(self.settings, faults.BEFORE_COMMIT)
        deadline = time.monotonic() + self.settings.db_retry_s  # one budget per batch

        def commit() -> Callable[[], None]:
            # On the commit thread, while the next batch is composed.
            if self._commit_failed.is_set():  # a batch before this one failed
                raise _Skipped
            try:
                return write()
            except BaseException:
                self._commit_failed.set()
                raise

        def write() -> Callable[[], None]:
            stages = _Stages(polled_us, composed_us, time.time_ns() // 1000)

            def rows() -> telemetry_db.BatchRows:  # asked for once the fences are set
                got = prepared.result()
                stages.prepared_us = stages.prepared_us or time.time_ns() // 1000
                return got

            skipped = self._with_database(
                "committing a batch",
                lambda conn: telemetry_db.commit_batch(
                    conn,
                    group_id=self.group,
                    topic=self.topic,
                    rows=rows,
                    run_ends=run_ends,
                    partitions=commits,
                    new_runs=new_runs,
                    metrics=batch_metrics,
                    live_channel=self.settings.live_channel,
                ),
                deadline=deadline,
            )
            committed_us = time.time_ns() // 1000
            faults.point(self.settings, faults.AFTER_COMMIT)
            return lambda: self._account(
                batch, message_count, skipped, produced, committed_us, broker_errors, stages
            )

        # The next batch is composed on what this one leaves (its offsets, its
        # runs); should this one be fenced, the consumer rejoins and drops both.
        self.offsets.update(next_offsets)
        self._runs_seen.update(decoded.new_runs)
        # Up to COMMITS_IN_FLIGHT batches queue for the commit thread, so that
        # composing, preparing and committing all overlap; should one be fenced,
        # the consumer rejoins and drops it and every batch after it.
        if not self._settle(keep=COMMITS_IN_FLIGHT - 1):
            return
        # Counted in this batch's row: the next batch's row counts what comes after.
        client_errors = broker_errors - decoded.broker_errors
        self._client_errors -= client_errors
        self._pending_resets -= state_resets
        assert self._committer is not None
        self._in_flight.append(
            _InFlight(self._committer.submit(commit), client_errors, state_resets)
        )
        if not self.settings.stream_commit_overlap:
            self._settle()

    def _prepare(
        self, batch: compose.ComposedBatch, dead_rows: list[tuple[Any, ...]]
    ) -> telemetry_db.BatchRows:
        """On the prepare thread: the models' scores, then every table's rows."""
        result = batch.result
        return telemetry_db.batch_rows(
            samples=result.columns, events=result.events, windows=result.windows,
            dead_letters=dead_rows, predictions=batch.score(self.scorers or ()),
        )  # fmt: skip

    def _settle(self, *, in_callback: bool = False, keep: int = 0) -> bool:
        """Wait for the batches in flight to commit, oldest first, until `keep`
        remain, and do their bookkeeping. False if one was fenced: those after it
        are void too, and the consumer has rejoined (or, in a rebalance callback,
        will rejoin when the poll returns). A database that stayed unreachable
        raises DatabaseUnavailable here."""
        while len(self._in_flight) > keep:
            in_flight = self._in_flight.popleft()
            try:
                account = in_flight.commit.result()
            except telemetry_db.Fenced as err:
                self._void(in_flight)
                self._drain()
                if in_callback:  # no rejoining inside the client's callback
                    self._fenced = err
                else:
                    self._rejoin(err)
                return False
            except BaseException:
                self._drain()
                raise
            account()
        return True

    def _drain(self) -> None:
        """After a failed commit: wait out the batches queued behind it (each
        skipped its writes), count theirs again, and let commits run again."""
        while self._in_flight:
            later = self._in_flight.popleft()
            with contextlib.suppress(BaseException):  # _Skipped, nothing written
                later.commit.result()
            self._void(later)
        self._commit_failed.clear()

    def _void(self, in_flight: _InFlight) -> None:
        # A batch not committed: its counts go in the next row that commits.
        self._client_errors += in_flight.client_errors
        self._pending_resets += in_flight.state_resets

    def _account(
        self,
        batch: compose.ComposedBatch,
        messages: int,
        skipped: dict[str, int],
        produced: Any,
        committed_us: int,
        broker_errors: int,
        stages: _Stages,
    ) -> None:
        """The report, once a batch has committed."""
        decoded, result = batch.decoded, batch.result
        # Samples whose key was stored already are duplicates like any resend.
        clashed_samples = skipped.get("telemetry_samples", 0)
        clashes = sum(skipped.values())
        if clashes:
            log.warning("%s: %d rows already stored were skipped (%s samples)",
                        self.member, clashes, clashed_samples)  # fmt: skip
        r = self.report
        assert self._first_message is not None
        r.busy_seconds = time.perf_counter() - self._first_message
        r.busy_until = time.time()
        r.cpu_seconds = time.process_time() - self._first_cpu
        if self.keep_latencies:  # the benchmarks' figure: produce to the COMMIT's return
            r.latencies_ms += ((committed_us - produced) / 1000.0).tolist()
            stages.record(r.stages_ms, produced, committed_us)
            r.commits.append((committed_us, messages))
        r.batches += 1
        r.messages += messages
        r.samples += len(result.columns) - clashed_samples
        r.dead_letters += len(decoded.dead)
        r.duplicates += result.duplicates + clashed_samples
        r.late += result.late
        r.anomalies += len(result.events)
        r.windows += len(result.windows)
        r.run_ends += len(decoded.ends)
        r.broker_errors += broker_errors
        r.clashes += clashes

    def _dead_letter(self, dead: list[tuple[Message, str, str]]) -> list[tuple[Any, ...]]:
        """Send each bad message to the dead-letter topic (delivered before the
        batch commits, so none is lost) and return its database rows."""
        if not dead:
            return []
        assert self._dead_letter_producer is not None
        rows = []
        undelivered = _Undelivered()
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
                self.settings.dead_letter_topic, raw, key, headers=headers,
                on_delivery=undelivered.record,
            )  # fmt: skip
            reason = reason.replace("\x00", "\ufffd")
            rows.append(
                (self.member, message.topic(), message.partition(), message.offset(),
                 schema.as_text(key) if key else None, error_class, reason, len(raw),
                 raw[:PAYLOAD_HEAD_BYTES])
            )  # fmt: skip
        # Delivered before the batch commits, or the batch is not committed: wait
        # out a broker blip (the idempotent producer retries), then give up loudly.
        deadline = time.monotonic() + self.settings.db_retry_s
        while self._dead_letter_producer.flush(5.0) and time.monotonic() < deadline:
            log.warning("%s: waiting for %d dead letters to be delivered",
                        self.member, len(self._dead_letter_producer))  # fmt: skip
        failed = undelivered.failed + len(self._dead_letter_producer)
        if failed:
            raise DeadLettersUndelivered(
                f"{failed} dead letters not delivered to {self.settings.dead_letter_topic} "
                f"({undelivered.error}); the batch was not committed, a restarted consumer "
                "reads it again. Check the broker (`make status`)."
            )
        return rows

    def _lags(self) -> dict[int, int | None]:
        """Messages left to read per assigned partition (None: not known yet),
        from the client's cached high watermarks: no request to the broker."""
        assert self._consumer is not None
        from confluent_kafka import TopicPartition

        lags: dict[int, int | None] = {}
        for partition in self.states:
            tp = TopicPartition(self.topic, partition)
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            position = self._consumer.position([tp])[0].offset
            lags[partition] = high - position if high >= 0 and position >= 0 else None
        return lags


class RunIncomplete(RuntimeError):
    pass


class DatabaseUnavailable(RuntimeError):
    pass


class DeadLettersUndelivered(RuntimeError):
    pass


class _Skipped(Exception):
    """A batch not committed because one queued before it failed."""


@dataclass
class _InFlight:
    """A batch being committed, and the client errors and state resets its
    metrics row counts (counted again in the next row should it be fenced)."""

    commit: Future[Callable[[], None]]
    client_errors: int
    state_resets: int


@dataclass
class _Stages:
    """When a batch was polled, composed, taken by the commit thread, and had its
    rows from the prepare thread, its transaction begun (µs)."""

    polled_us: int
    composed_us: int
    commit_started_us: int
    prepared_us: int = 0

    def record(self, into: dict[str, list[float]], produced: Any, committed_us: int) -> None:
        into.setdefault("produce_to_poll", []).extend(((self.polled_us - produced) / 1000).tolist())
        for stage, ms in (
            ("compose", (self.composed_us - self.polled_us) / 1000),
            ("wait_for_commit_thread", (self.commit_started_us - self.composed_us) / 1000),
            ("prepare", (self.prepared_us - self.commit_started_us) / 1000),
            ("commit", (committed_us - self.prepared_us) / 1000),
        ):
            into.setdefault(stage, []).append(ms)


@dataclass
class _Undelivered:
    """Delivery reports of one batch's dead letters."""

    failed: int = 0
    error: str = ""

    def record(self, err: Any, message: Any) -> None:
        if err is not None:
            self.failed += 1
            self.error = str(err)


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


def tune_gc() -> None:
    """For the hot path, once a consumer has started. What the start loaded
    (modules, models) lives as long as the process: frozen, later collections
    skip it (full collections of it cost about a fifth of decoding a batch).
    And a collection every 50,000 allocations, not 700: the hot path's objects
    die by reference count (msgspec messages are not even tracked), so frequent
    collections found nothing and cost about 1 µs a message (3,262 young and 26
    full collections over 300,000 messages: 0.3 s; with these thresholds 83,
    0.03 s)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _main_session(session_keys: Any) -> str | None:
    """The session most samples of a batch belong to (None for no sample)."""
    counts = Counter(session_keys.tolist())
    return min(counts, key=lambda key: (-counts[key], key)) if counts else None

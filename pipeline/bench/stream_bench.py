"""Stream benchmarks, each on topics and a consumer group of its own:

- throughput: a whole race produced unpaced, then consumed by ONE consumer
  process end to end (decode, anomalies, windows, COPY, commit), next to Kafka's
  own `ConsumerPerformance` reading the same topic (the broker's ceiling here);
- latency: a replay at 1x with one consumer, produce-to-commit per message.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.bench import kafka_perf
from pipeline.kafka.consumer import StreamConsumer
from pipeline.kafka.producer import produce_session
from pipeline.kafka.topics import scratch_topics
from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.stack.sandbox import settings_environment

F1 = str(PROJECT_ROOT / ".venv" / "bin" / "f1")
CLAIM_LIMIT_S = 120.0  # a consumer process starts (imports, models) and joins its group

# Every topic `scratch` made in this process (the suite reports the ones it made).
made: list[str] = []


@contextmanager
def scratch(settings: Settings, prefix: str, **updates: object) -> Iterator[Settings]:
    """`scratch_topics`, its topics' names kept in `made` (the suite reports them)."""
    with scratch_topics(settings, prefix, **updates) as topics:
        made.extend([topics.telemetry_topic, topics.dead_letter_topic])
        yield topics


def claimed(settings: Settings) -> int:
    """Partitions of the topic the group's consumers have claimed (they are up)."""
    from pipeline.sinks import telemetry_db

    with telemetry_db.connect(settings, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM consumer_offsets WHERE group_id = %s AND topic = %s",
            (settings.consumer_group, settings.telemetry_topic),
        ).fetchone()
    return int(row[0]) if row else 0


class ConsumerProcess:
    """One `f1 consume` process with the scratch settings, started on entry (and, with
    `claim`, holding every partition); stopped (if still running) on exit. Its log
    goes to a file; with `report`, its report (every latency too) is read back by
    `report()` once it has ended. A process of its own: its CPU, memory and latency
    are the consumer's, not shared with a producer or a browser driver in this one."""

    def __init__(
        self, settings: Settings, member: str, *args: str, claim: bool = True, report: bool = False
    ) -> None:
        self.settings = settings
        self.claim = claim
        self._folder = tempfile.TemporaryDirectory(prefix="f1-bench-consumer-")
        self._log = Path(self._folder.name) / "consumer.log"
        self._report = Path(self._folder.name) / "report.json" if report else None
        extra = ["--report", str(self._report)] if self._report else []
        self.command = [F1, "consume", "--member", member, *extra, *args]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> ConsumerProcess:
        from pipeline.sinks import telemetry_db

        telemetry_db.ensure_schema(self.settings)
        env = {**os.environ, **settings_environment(self.settings)}
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if self.claim:
            try:
                wait_for_claims(self.settings, [self])
            except BaseException:
                self.__exit__()
                raise
        return self

    def wait(self, limit_s: float) -> None:
        assert self.process is not None
        try:
            code = self.process.wait(limit_s)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"the consumer did not finish within {limit_s:g} s") from err
        if code:
            raise RuntimeError(f"the consumer failed ({code}): {self.log_tail()}")

    def report(self) -> dict[str, Any]:
        if self._report is None or not self._report.exists():
            raise RuntimeError(f"the consumer wrote no report: {self.log_tail()}")
        answer: dict[str, Any] = json.loads(self._report.read_text())
        return answer

    def log_tail(self) -> str:
        text = self._log.read_text(errors="replace") if self._log.exists() else ""
        return text[-1500:].strip() or "(no output)"

    def stop(self) -> None:
        """A clean stop (SIGTERM: it leaves the group and writes its report)."""
        if self.running():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._folder.cleanup()


def wait_for_claims(settings: Settings, processes: Sequence[ConsumerProcess]) -> None:
    """Until the group's consumer processes hold every partition of the topic."""
    deadline = time.monotonic() + CLAIM_LIMIT_S
    while claimed(settings) < settings.telemetry_partitions:
        for process in processes:
            if not process.running():
                raise RuntimeError(f"the consumer process ended: {process.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the consumers took every partition not within {CLAIM_LIMIT_S:g} s: "
                + " | ".join(p.log_tail() for p in processes)
            )
        time.sleep(0.5)


def percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist() if values else [0.0] * 3
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max(values, default=0.0)}


def kafka_consumer_perf(settings: Settings, messages: int) -> float:
    """Messages per second of Kafka's ConsumerPerformance over the topic (the
    group join included: `kafka_perf.consumer_perf` has every figure)."""
    return kafka_perf.consumer_perf(settings, messages)["nMsg.sec"]


def throughput(settings: Settings, export_folder: Path) -> dict[str, Any]:
    """The race twice through one consumer: without the models (the stream's own
    work), then with the three champions served."""
    figures: dict[str, Any] = {}
    with scratch(settings, "bench") as bench:
        for serve in (False, True):
            run = f"bench-{uuid.uuid4().hex[:6]}"
            produced = produce_session(export_folder, speed=None, run_id=run, settings=bench)
            consumer = StreamConsumer(
                "bench-1", settings=bench.model_copy(update={"serve_models": serve})
            )
            report = consumer.run(until_run=run, idle_timeout_s=60)
            suffix = "_with_models" if serve else ""
            figures[f"consumer_msgs_per_s{suffix}"] = report.messages_per_s
            figures[f"consumer_busy_s{suffix}"] = report.busy_seconds
            if not serve:
                figures["samples"] = produced.delivered
                figures["producer_msgs_per_s"] = produced.achieved_rate_hz
                on_topic = produced.delivered + len(produced.per_partition)  # + end markers
                kafka_rate = kafka_consumer_perf(bench, on_topic)
                figures["kafka_consumer_perf_msgs_per_s"] = kafka_rate
                figures["ratio_to_kafka_perf"] = report.messages_per_s / kafka_rate
                figures["real_time_factor"] = report.messages_per_s / (
                    produced.planned / produced.session_seconds
                )
    return figures


def latency_1x(settings: Settings, export_folder: Path, seconds: float) -> dict[str, Any]:
    """Replay `seconds` of session time at 1x into one consumer (in a thread:
    at ~80 messages/s the two barely share the interpreter)."""
    with scratch(settings, "bench") as bench:
        run = f"bench-{uuid.uuid4().hex[:6]}"
        consumer = StreamConsumer("bench-latency", settings=bench, keep_latencies=True)
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                report=consumer.run(until_run=run, idle_timeout_s=seconds + 60)
            )
        )
        thread.start()
        produced = produce_session(
            export_folder, speed=1.0, run_id=run, duration_s=seconds, settings=bench,
            start_offset_s=3600.0,  # the race start: all cars on track
        )  # fmt: skip
        thread.join()
    report = result["report"]
    return {
        "samples": produced.delivered,
        "intended_rate_hz": produced.intended_rate_hz,
        "achieved_rate_hz": produced.achieved_rate_hz,
        "batch_wait_s": settings.stream_batch_wait_s,
        **percentiles(report.latencies_ms),
    }

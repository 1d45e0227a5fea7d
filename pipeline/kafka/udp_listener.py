"""The F1 game's UDP feed into the telemetry topic (`f1 udp listen`, DAG f1_udp_live).

One thread, one socket: each datagram is forwarded unchanged to the
`--forward` addresses first (the game sends to one receiver only), optionally
written to a recording, then parsed (`udp_packets`) and mapped onto samples
(`udp_feed`). A CarTelemetry packet's cars are produced together, one produce
call per car and one poll per packet, through the same `RunPublisher` as a
replay, so runs, delivery counts, end markers and `stream_runs` rows are the
same for both sources.

The `produced_at_us` header of a game sample is its datagram's receive time, so
the consumers' produce-to-commit latency (`stream_metrics`) is receive-to-commit.

Nothing a sender does stops the listener: every datagram is counted as parsed,
ignored, or skipped with its reason (`ListenReport.datagrams`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.kafka.client import check_reachable, producer_config
from pipeline.kafka.producer import ProduceReport, RunPublisher
from pipeline.settings import Settings, get_settings
from pipeline.sources import udp_feed
from pipeline.sources.udp_packets import PacketParser
from pipeline.sources.udp_recording import (
    MAX_DATAGRAM,
    RecordingWriter,
    parse_address,
    send_datagrams,
)

log = logging.getLogger(__name__)

LATENCIES_KEPT = 100_000  # the newest receive-to-produce latencies the report's percentiles use
LOG_EVERY_S = 30.0


@dataclass
class ListenReport:
    address: str
    received: int = 0
    bytes_received: int = 0
    forwarded: int = 0
    forward_errors: int = 0
    recorded: int = 0
    samples_produced: int = 0
    samples_delivered: int = 0
    delivery_failures: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    datagrams: dict[str, int] = field(default_factory=dict)  # parsed / ignored / skip reasons
    feed: dict[str, int] = field(default_factory=dict)  # what the feed did not turn into samples
    runs: list[dict[str, Any]] = field(default_factory=list)
    receive_to_produce_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max


class UdpListener:
    """Receive the game's datagrams on `address` until `stop` is set or
    `duration_s` has passed; publish every session as a run."""

    def __init__(
        self,
        address: str | None = None,
        *,
        forward: list[str] | None = None,
        record: Path | None = None,
        replay: Iterable[tuple[float, bytes]] | None = None,
        replay_speed: float | None = 1.0,
        settings: Settings | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """`replay`: datagrams to send to this listener once it is bound (a
        recording or a synthetic session, to try the live path without a
        game); the listener then stops once they are sent and received."""
        self.settings = settings or get_settings()
        self.address = address or self.settings.udp_address
        self.bind_to = parse_address(self.address)
        if forward is None:
            forward = [a.strip() for a in self.settings.udp_forward.split(",") if a.strip()]
        self.forward_to = [parse_address(a) for a in forward]
        self.record = record
        self.replay = replay
        self.replay_speed = replay_speed
        self.stop = stop or threading.Event()
        self.parser = PacketParser()
        self.feed = udp_feed.GameFeed()
        self.report = ListenReport(self.address)
        self.ready = threading.Event()  # set once the socket is bound
        self._latencies_us: deque[int] = deque(maxlen=LATENCIES_KEPT)
        self._publishers: dict[str, RunPublisher] = {}
        self._producer: Any = None

    def run(self, duration_s: float | None = None) -> ListenReport:
        from confluent_kafka import Producer

        check_reachable(self.settings)
        # linger 5 ms as for a replay: a 60 Hz frame's cars leave in one request.
        self._producer = Producer(producer_config(self.settings))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if self.forward_to else None
        recorder = RecordingWriter(self.record) if self.record else None
        started = time.monotonic()
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, self.settings.udp_receive_buffer_bytes
            )
            try:
                sock.bind(self.bind_to)
            except OSError as err:
                raise OSError(
                    f"cannot listen on {self.address}: {err.strerror}. Is another listener "
                    "running there? Choose another with --address (and point the game at it)."
                ) from err
            sock.settimeout(0.2)  # to notice stop and the deadline while nothing arrives
            self.ready.set()
            log.info("listening for the F1 game's UDP telemetry on %s", self.address)
            sender = self._start_replay()
            last_log = started
            while not self.stop.is_set():
                now = time.monotonic()
                if duration_s is not None and now - started >= duration_s:
                    self.report.stop_reason = f"ran {duration_s:g} s"
                    break
                if now - last_log >= LOG_EVERY_S:
                    last_log = now
                    log.info("%s", self._summary())
                try:
                    datagram = sock.recv(MAX_DATAGRAM)
                except TimeoutError:
                    self._producer.poll(0)
                    if sender is not None and not sender.is_alive():
                        self.report.stop_reason = "replay sent and received"
                        break
                    continue
                received_us = time.time_ns() // 1000
                self.report.received += 1
                self.report.bytes_received += len(datagram)
                if out is not None:
                    self._forward(out, datagram)
                if recorder is not None:
                    recorder.write(now - started, datagram)
                    self.report.recorded += 1
                packet = self.parser.parse(datagram)
                if packet is not None:
                    self._publish(self.feed.handle(packet, received_us))
            else:
                self.report.stop_reason = "stop requested"
        finally:
            self.report.seconds = time.monotonic() - started
            sock.close()
            if out is not None:
                out.close()
            if recorder is not None:
                recorder.close()
            self._publish(self.feed.close())
            self._producer.flush(30)
            self._fill_report()
        return self.report

    def _start_replay(self) -> threading.Thread | None:
        if self.replay is None:
            return None
        host, port = self.bind_to
        target = ("127.0.0.1" if host in ("0.0.0.0", "") else host, port)
        replay = self.replay
        sender = threading.Thread(
            target=lambda: send_datagrams(replay, target, speed=self.replay_speed),
            name="udp-replay",
            daemon=True,
        )
        sender.start()
        return sender

    def _forward(self, out: socket.socket, datagram: bytes) -> None:
        for target in self.forward_to:
            try:
                out.sendto(datagram, target)
                self.report.forwarded += 1
            except OSError:  # a receiver that went away must not stop the feed
                self.report.forward_errors += 1

    def _publish(self, events: list[udp_feed.FeedEvent]) -> None:
        for event in events:
            run = event.run
            if isinstance(event, udp_feed.RunStarted):
                report = ProduceReport(run.run_id, run.session_key, planned=0, speed=1.0)
                publisher = RunPublisher(self._producer, self.settings, report, udp_feed.SOURCE)
                publisher.start()
                self._publishers[run.run_id] = publisher
                log.info("game session %s: run %s started", run.session_key, run.run_id)
            elif isinstance(event, udp_feed.SamplesReady):
                sent = self._publishers[run.run_id].send(event.samples, event.received_us)
                self.report.samples_produced += sent
                self._latencies_us.append(time.time_ns() // 1000 - event.received_us)
            else:
                self._end_run(run, event.reason)

    def _end_run(self, run: udp_feed.GameRun, reason: str) -> None:
        publisher = self._publishers.pop(run.run_id)
        report = publisher.report
        report.planned = publisher.sent
        try:
            publisher.end_markers()
        finally:
            publisher.finish()
        self.report.samples_delivered += report.delivered
        self.report.delivery_failures += report.failed
        self.report.runs.append(
            {"run_id": run.run_id, "session_key": run.session_key, "track": run.track,
             "session_type": run.session_type, "packet_format": run.packet_format,
             "delivered": report.delivered, "failed": report.failed, "ended": reason}
        )  # fmt: skip
        log.info("run %s ended (%s): %d samples delivered", run.run_id, reason, report.delivered)

    def _fill_report(self) -> None:
        import numpy as np

        self.report.datagrams = dict(sorted(self.parser.counts.items()))
        self.report.feed = dict(sorted(self.feed.counts.items()))
        if self._latencies_us:
            values = np.array(self._latencies_us) / 1000
            self.report.receive_to_produce_ms = {
                "p50": round(float(np.percentile(values, 50)), 3),
                "p99": round(float(np.percentile(values, 99)), 3),
                "max": round(float(values.max()), 3),
            }

    def _summary(self) -> str:
        counts: Counter[str] = self.parser.counts
        parsed = sum(v for k, v in counts.items() if k.startswith("parsed:"))
        return (
            f"{self.report.received} datagrams received, {parsed} parsed, "
            f"{self.report.received - parsed} skipped {self.parser.skipped}, "
            f"{self.report.samples_produced} samples produced"
        )

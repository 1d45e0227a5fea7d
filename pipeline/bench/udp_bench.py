"""UDP feed benchmarks (`f1 bench udp`), on topics and a group of their own:

- parse: CarTelemetry datagrams through `PacketParser.parse` one by one (what
  the listener does), and laid end to end through `parse_many`; then the feed's
  mapping of those packets onto samples;
- live: a synthetic 22-car session at the game's 60 Hz sent over loopback to an
  `f1 udp listen` process, one consumer (in this process) storing it; datagrams
  lost, and receive-to-commit per sample (the `produced_at_us` header of a game
  sample is its datagram's receive time).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.bench.stream_bench import percentiles
from pipeline.kafka.consumer import StreamConsumer
from pipeline.kafka.topics import scratch_topics
from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.sources import udp_feed, udp_packets
from pipeline.sources.udp_recording import send_datagrams
from pipeline.sources.udp_synth import synthetic_session


def parse(packets: int = 200_000) -> dict[str, Any]:
    import numpy as np

    session = synthetic_session(fmt=2025, cars=22, laps=1, rate_hz=60, lap_s=60)
    datagrams = [d for _, d in session]
    telemetry = [d for d in datagrams if d[6] == udp_packets.CAR_TELEMETRY]
    stream = (telemetry * (packets // len(telemetry) + 1))[:packets]
    parser = udp_packets.PacketParser()
    started = time.perf_counter()
    for datagram in stream:
        parser.parse(datagram)
    one_by_one = packets / (time.perf_counter() - started)
    block = b"".join(stream)
    started = time.perf_counter()
    parsed = udp_packets.parse_many(block, 2025, udp_packets.CAR_TELEMETRY)
    speeds = parsed["cars"]["speed"].astype(np.float64)  # touch a column: the work is done
    whole = packets / (time.perf_counter() - started)
    assert speeds.shape == (packets, udp_packets.CARS)
    # The feed: the whole session (all packet types), packets onto samples.
    feed, parser = udp_feed.GameFeed(), udp_packets.PacketParser()
    started = time.perf_counter()
    samples = 0
    for datagram in datagrams:
        packet = parser.parse(datagram)
        if packet is not None:
            for event in feed.handle(packet, 1_800_000_000_000_000):
                if isinstance(event, udp_feed.SamplesReady):
                    samples += len(event.samples)
    mapping = samples / (time.perf_counter() - started)
    return {
        "car_telemetry_packets": packets,
        "parse_packets_per_s": one_by_one,
        "parse_car_samples_per_s": one_by_one * udp_packets.CARS,
        "parse_many_packets_per_s": whole,
        "feed_samples_per_s (parse + map, all packet types)": mapping,
    }


def live(settings: Settings, seconds: float = 600.0) -> dict[str, Any]:
    """`seconds` of a 22-car 60 Hz session through the listener and one consumer."""
    laps = max(1, round(seconds / 80))
    session = list(synthetic_session(fmt=2025, cars=22, laps=laps, rate_hz=60, lap_s=80))
    with scratch_topics(settings, "bench") as bench, tempfile.TemporaryDirectory() as folder:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        report_file = Path(folder) / "listener.json"
        env = {
            **os.environ, "TELEMETRY_TOPIC": bench.telemetry_topic,
            "DEAD_LETTER_TOPIC": bench.dead_letter_topic, "CONSUMER_GROUP": bench.consumer_group,
        }  # fmt: skip
        listener = subprocess.Popen(
            [str(PROJECT_ROOT / ".venv" / "bin" / "f1"), "udp", "listen", "--address",
             f"127.0.0.1:{port}", "--report-json", str(report_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        consumer = StreamConsumer("bench-udp", settings=bench, keep_latencies=True)
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                report=consumer.run(idle_timeout_s=20, idle_from_s=session[-1][0] + 30)
            )
        )
        thread.start()
        # Send once the consumer holds its partitions (a new group's first join
        # takes seconds: its wait would count as latency) and the listener is up.
        deadline = time.monotonic() + 120
        while not consumer.epochs and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        sent = send_datagrams(session, ("127.0.0.1", port), speed=1.0)
        time.sleep(2)
        listener.terminate()  # SIGTERM: it ends the open run, flushes, reports
        listener.wait(60)
        thread.join()
        listened = json.loads(report_file.read_text())
    report = result["report"]
    return {
        "session_seconds": round(session[-1][0], 1),
        "datagrams_sent": sent.sent,
        "datagrams_received": listened["received"],
        "datagrams_lost": sent.sent - listened["received"],
        "sender_max_lateness_ms": sent.max_lateness_s * 1000,
        "samples_produced": listened["samples_produced"],
        "samples_stored": report.samples,
        "samples_per_s": listened["samples_produced"] / max(session[-1][0], 1e-9),
        "listener_receive_to_produce_ms": listened["receive_to_produce_ms"],
        **{f"receive_to_commit_{k}": v for k, v in percentiles(report.latencies_ms).items()},
    }

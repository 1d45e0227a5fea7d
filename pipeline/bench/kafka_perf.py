"""Kafka's own perf tools (`kafka-producer-perf-test`, `kafka-consumer-perf-test`),
run from the jars the local broker runs from: the reference each stream figure
is a ratio to, measured in the same run on the same topic."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.settings import Settings
from pipeline.stack import kafka_server

TOOLS = "org.apache.kafka.tools"
# librdkafka's names for what our producer sets that Java's producer reads the same way.
SHARED_PRODUCER_PROPS = (
    "acks", "enable.idempotence", "linger.ms", "batch.size", "compression.type",
)  # fmt: skip


def _tool(settings: Settings, name: str, args: list[str]) -> str:
    command = ["java", "-cp", kafka_server.classpath(settings), f"{TOOLS}.{name}", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def consumer_perf(
    settings: Settings, messages: int, *, group: str | None = None, timeout_ms: int = 60_000
) -> dict[str, float]:
    """ConsumerPerformance over `messages` of the settings' topic, with a group of
    its own (from the earliest offset): its CSV row. `nMsg.sec` counts the group
    join, `fetch.nMsg.sec` leaves it out (like our consumers' busy span)."""
    output = _tool(
        settings,
        "ConsumerPerformance",
        [
            "--bootstrap-server", settings.kafka_bootstrap_servers,
            "--topic", settings.telemetry_topic, "--num-records", str(messages),
            "--group", group or f"{settings.consumer_group}-perf", "--timeout", str(timeout_ms),
        ],
    )  # fmt: skip
    header, values = [line for line in output.splitlines() if re.search(r"\d|nMsg", line)][-2:]
    row = dict(zip([h.strip() for h in header.split(",")], values.split(","), strict=False))
    figures = {}
    for name, value in row.items():
        try:
            figures[name] = float(value)
        except ValueError:  # the start and end dates
            continue
    return figures


_PRODUCED = re.compile(
    r"(?P<records>\d+) records sent, (?P<rate>[\d.]+) records/sec \((?P<mb>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, (?P<p50>\d+) ms 50th, "
    r"(?P<p95>\d+) ms 95th, (?P<p99>\d+) ms 99th"
)


def producer_perf(
    settings: Settings, records: int, record_size: int, props: Mapping[str, Any]
) -> dict[str, float]:
    """ProducerPerformance: `records` of `record_size` random bytes, unthrottled,
    into the settings' topic with the producer properties `props`; its summary."""
    output = _tool(
        settings,
        "ProducerPerformance",
        [
            "--bootstrap-server", settings.kafka_bootstrap_servers,
            "--topic", settings.telemetry_topic, "--num-records", str(records),
            "--record-size", str(record_size), "--throughput", "-1",
            "--command-property", *properties(props),
        ],
    )  # fmt: skip
    found = [m for line in output.splitlines() if (m := _PRODUCED.search(line))]
    if not found:
        raise RuntimeError(f"ProducerPerformance printed no summary: {output[-800:]}")
    summary = found[-1]  # the last line is the whole run's
    return {
        "records": float(summary["records"]),
        "records_per_s": float(summary["rate"]),
        "mb_per_s": float(summary["mb"]),
        "latency_avg_ms": float(summary["avg"]),
        "latency_p50_ms": float(summary["p50"]),
        "latency_p99_ms": float(summary["p99"]),
    }


def properties(props: Mapping[str, Any]) -> list[str]:
    """`name=value` as Java reads them (booleans in lower case)."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in props.items()]


def matching_producer_props(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our producer's delivery guarantee, batching and compression (from its
    librdkafka config), for the Java tool: the same producer settings on both sides."""
    return {k: config[k] for k in SHARED_PRODUCER_PROPS if k in config}


def version(settings: Settings) -> str:
    """Kafka's version, from the client jar's name beside the broker's."""
    jars = sorted(Path(kafka_server.libs_dir(settings)).glob("kafka-clients-*.jar"))
    return jars[-1].stem.removeprefix("kafka-clients-") if jars else "unknown"


def delete_groups(settings: Settings, groups: Iterable[str]) -> None:
    """Remove the tools' consumer groups from the broker (their offsets are Kafka's)."""
    from pipeline.kafka.topics import admin_client

    # Held until the futures resolve: a client collected at once never sends the request.
    admin = admin_client(settings)
    futures = admin.delete_consumer_groups(list(groups), request_timeout=15)
    for future in futures.values():
        try:
            future.result(timeout=30)
        except Exception:  # already gone, never created, or still held: nothing to wait for
            continue

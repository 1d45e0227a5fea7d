"""Kafka client configuration shared by the producer, the consumer and the admin."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.settings import Settings

# librdkafka's own log lines (e.g. one per failed connect, every 50 ms while the
# broker is down) go through logging, where the CLI can quiet them.
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


class KafkaUnavailable(RuntimeError):
    pass


class TopicMissing(KafkaUnavailable):
    """The broker is up but the topic is not there: the CLI's and the DAGs' handling
    of an unavailable Kafka covers it."""


def base_config(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.kafka_bootstrap_servers, "logger": LIBRDKAFKA_LOG}


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(settings),
        # Idempotent, fully acknowledged: a retried send is never written twice,
        # and each car's order survives retries.
        "enable.idempotence": True,
        "acks": "all",
        # Batching: at full speed batches fill while requests are in flight; at 1x
        # the linger is latency added to every sample (5 ms measured p50 6.9 ms
        # produce-to-fetch on loopback, 1 ms about 2 ms), so it stays short.
        "linger.ms": 1,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        # Same key -> same partition as Java clients (Kafka's own tools).
        "partitioner": "murmur2_random",
        **overrides,
    }


def consumer_config(settings: Settings, member: str, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(settings),
        "group.id": settings.consumer_group,
        "client.id": member,
        # Offsets live in PostgreSQL with the rows; Kafka's are not used.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # A killed consumer's partitions move on within ~10 s, not the default 45.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        "fetch.min.bytes": 1,
        "fetch.wait.max.ms": 50,
        "queued.min.messages": 20_000,
        # librdkafka waits this long before fetching again once a partition's local
        # queue holds queued.min.messages; its default, 1 s, capped one consumer
        # reading a whole topic at 46k msg/s where Kafka's own tool read 530k (10 ms:
        # 456k, measured on the same topic).
        "fetch.queue.backoff.ms": 10,
        # Prefetched messages held by the client, at most (default 64 MB): a batch
        # takes 5,000 (about 2.4 MB), so 16 MB keeps several ready. Measured: the
        # consumer's growth over three races 170 -> 86 MB; reading alone drops from
        # 466k to 340k msg/s, far above what the whole path consumes (about 20k).
        "queued.max.messages.kbytes": 16_384,
        **overrides,
    }


def check_reachable(settings: Settings, timeout_s: float = 10.0) -> None:
    """One clear error instead of a timeout deep inside a client call."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient(base_config(settings)).list_topics(timeout=timeout_s)
    except KafkaException as err:
        raise KafkaUnavailable(
            f"Kafka is not reachable at {settings.kafka_bootstrap_servers} ({err.args[0]}); "
            "start the stack with `make up` (or `f1 stack up --only kafka`)."
        ) from err


def topic_partitions(client: Any, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The topic's partitions, from any client's metadata; one clear error when the
    broker has no such topic (it does not create topics on use)."""
    metadata = client.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        reason = metadata.error.str() if metadata is not None and metadata.error else "none"
        raise TopicMissing(
            f"topic {topic!r} is not on the broker ({reason}); "
            "create the platform's topics with `f1 topics` (or the f1_topics DAG)."
        )
    return sorted(metadata.partitions)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGINT, so a long-running loop can finish its
    batch and stop cleanly (Airflow sends SIGTERM when a task is stopped)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals can only be handled on the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

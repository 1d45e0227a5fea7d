"""The platform's topics, provisioned idempotently and described back.

`provision` takes an AdminClient, so the DAG hands it the Kafka provider's
(`KafkaAdminClientHook(...).get_conn`, connection `kafka_default`) and the CLI
one built from the settings: one implementation for both.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.settings import Settings
from pipeline.sinks import telemetry_db

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    replication_factor: int = 1  # one local broker; raise with the cluster


@dataclass
class TopicReport:
    name: str
    action: str  # created | unchanged | partitions increased | config updated
    partitions: int
    config: dict[str, str]


class TopicMismatch(RuntimeError):
    """An existing topic differs from its spec and fixing it was not asked for."""


def topic_specs(settings: Settings) -> list[TopicSpec]:
    return [
        TopicSpec(
            settings.telemetry_topic,
            settings.telemetry_partitions,
            {
                "retention.ms": str(7 * 24 * 3600 * 1000),  # a week of replays
                "compression.type": "producer",  # keep the producer's lz4 batches as they are
                "message.timestamp.type": "CreateTime",
            },
        ),
        TopicSpec(
            settings.dead_letter_topic,
            1,  # low volume; one partition keeps the dead letters in arrival order
            {"retention.ms": str(30 * 24 * 3600 * 1000)},
        ),
    ]


SCRATCH_FIELDS = ("telemetry_topic", "dead_letter_topic", "consumer_group")


@contextmanager
def scratch_topics(settings: Settings, prefix: str, **updates: object) -> Iterator[Settings]:
    """Settings pointing at fresh topics and consumer group of their own (for
    tests and benchmarks beside a running demo), deleted afterwards with all the
    rows their runs stored."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    scratch = settings.model_copy(
        update={"telemetry_topic": name, "dead_letter_topic": f"{name}-dlq",
                "consumer_group": name, **updates}
    )  # fmt: skip
    provision(admin_client(scratch), topic_specs(scratch))
    try:
        yield scratch
    finally:
        delete_topics(scratch, [name, f"{name}-dlq"])
        telemetry_db.ensure_schema(scratch)
        with telemetry_db.connect(scratch, autocommit=True) as conn:
            telemetry_db.delete_stream_data(
                conn, topic=name, dead_letter_topic=f"{name}-dlq", group_id=name
            )


def delete_topics(settings: Settings, names: Sequence[str]) -> None:
    """Delete topics and wait for the broker to have done it (an unknown topic is
    fine). The admin client must live until then: one dropped at once never sent
    the request, and scratch topics piled up on the broker."""
    admin = admin_client(settings)
    for future in admin.delete_topics(list(names), operation_timeout=15).values():
        try:
            future.result(timeout=30)
        except Exception:  # already deleted
            continue


def admin_client(settings: Settings) -> AdminClient:
    from confluent_kafka.admin import AdminClient

    from pipeline.kafka.client import base_config

    return AdminClient(base_config(settings))


def provision(
    admin: AdminClient,
    specs: list[TopicSpec],
    *,
    increase_partitions: bool = False,
    update_config: bool = False,
) -> list[TopicReport]:
    """Create what is missing; check what exists against its spec. A topic with
    fewer partitions or another config is reported (TopicMismatch) unless asked
    to fix it; one with more partitions cannot be shrunk and is always reported."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    existing = set(admin.list_topics(timeout=TIMEOUT_S).topics)
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(s.name, s.partitions, s.replication_factor, config=s.config)
                for s in missing
            ],
            operation_timeout=TIMEOUT_S,
        )
        for _name, future in futures.items():
            try:
                future.result()
            except KafkaException as err:  # a concurrent creator is fine
                if "TOPIC_ALREADY_EXISTS" not in str(err):
                    raise
    reports = []
    for spec in specs:
        action = "created" if spec in missing else "unchanged"
        partitions, config = describe(admin, spec.name)
        problems = []
        if partitions > spec.partitions:
            problems.append(
                f"has {partitions} partitions, more than the {spec.partitions} asked for; "
                "Kafka cannot remove partitions: set TELEMETRY_PARTITIONS to "
                f"{partitions} or delete the topic"
            )
        elif partitions < spec.partitions:
            if increase_partitions:
                _increase_partitions(admin, spec)
                action = "partitions increased"
            else:
                problems.append(
                    f"has {partitions} partitions, the spec asks for {spec.partitions}; "
                    "rerun with --increase-partitions (note: it moves cars to other partitions)"
                )
        drift = {k: (config.get(k), v) for k, v in spec.config.items() if config.get(k) != v}
        if drift:
            if update_config:
                _update_config(admin, spec)
                action = "config updated" if action == "unchanged" else f"{action}, config updated"
            else:
                problems.append(
                    "config differs: "
                    + ", ".join(f"{k} is {have}, spec {want}" for k, (have, want) in drift.items())
                    + "; rerun with --update-config to apply the spec"
                )
        if problems:
            raise TopicMismatch(f"topic {spec.name!r} " + "; ".join(problems))
        partitions, config = describe(admin, spec.name)
        reports.append(TopicReport(spec.name, action, partitions, config))
        if partitions != spec.partitions:  # validate what was made by reading it back
            raise KafkaException(f"topic {spec.name} reads back with {partitions} partitions")
    return reports


def describe(admin: AdminClient, name: str) -> tuple[int, dict[str, str]]:
    """(partition count, explicitly set config) of a topic, as the broker reports it."""
    from confluent_kafka import KafkaError, KafkaException, TopicCollection
    from confluent_kafka.admin import ConfigResource, ConfigSource

    deadline = time.monotonic() + TIMEOUT_S
    while True:  # a topic created a moment ago may not be in the metadata yet
        try:
            description = admin.describe_topics(TopicCollection([name]))[name].result(
                timeout=TIMEOUT_S
            )
            break
        except KafkaException as err:
            unknown = err.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not unknown or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    entries = admin.describe_configs([resource])[resource].result(timeout=TIMEOUT_S)
    config = {
        key: entry.value
        for key, entry in entries.items()
        if entry.source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    }
    return len(description.partitions), config


def _increase_partitions(admin: AdminClient, spec: TopicSpec) -> None:
    from confluent_kafka.admin import NewPartitions

    futures = admin.create_partitions([NewPartitions(spec.name, spec.partitions)])
    futures[spec.name].result(timeout=TIMEOUT_S)


def _update_config(admin: AdminClient, spec: TopicSpec) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        spec.name,
        incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in spec.config.items()
        ],
    )
    admin.incremental_alter_configs([resource])[resource].result(timeout=TIMEOUT_S)

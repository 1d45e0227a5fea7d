"""
### f1_topics

Provisions the platform's Kafka topics through the Kafka provider's admin hook
(connection `kafka_default`): the telemetry topic (`TELEMETRY_TOPIC`, default
`f1-speed-stream`, `TELEMETRY_PARTITIONS` partitions) and its dead-letter topic,
then describes them back. Idempotent: an existing topic that differs from its
spec fails the task with what differs, unless the form asks to fix it. Also
creates the telemetry tables the stream writes.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task


@dag(
    dag_id="f1_topics",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["f1", "stream", "setup"],
    params={
        "increase_partitions": Param(
            False, type="boolean", title="Increase partitions",
            description="Grow a topic with fewer partitions than TELEMETRY_PARTITIONS "
            "(cars move to other partitions; do it between replays).",
        ),
        "update_config": Param(
            False, type="boolean", title="Update config",
            description="Apply the spec's config to a topic whose config differs.",
        ),
    },
)  # fmt: skip
def f1_topics() -> None:
    @task
    def provision_topics(params: dict | None = None) -> list[dict]:  # type: ignore[type-arg]
        """Create what is missing, check what exists, return the topics as described back."""
        from dataclasses import asdict

        from airflow.providers.apache.kafka.hooks.client import KafkaAdminClientHook

        from pipeline.kafka.topics import provision, topic_specs
        from pipeline.settings import get_settings

        params = params or {}
        admin = KafkaAdminClientHook(kafka_config_id="kafka_default").get_conn
        reports = provision(
            admin, topic_specs(get_settings()),
            increase_partitions=bool(params.get("increase_partitions")),
            update_config=bool(params.get("update_config")),
        )  # fmt: skip
        return [asdict(r) for r in reports]

    @task
    def create_tables() -> None:
        from pipeline.sinks.telemetry_db import ensure_schema

        ensure_schema()

    provision_topics()
    create_tables()


f1_topics()

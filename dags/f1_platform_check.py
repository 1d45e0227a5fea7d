"""
### f1_platform_check

Proves that Airflow reaches the rest of the platform through its own
connections: the Kafka broker (`kafka_default`) and the telemetry database
(`telemetry_db`), both defined by `AIRFLOW_CONN_*` variables that `make up` sets.
Trigger it after changing ports or passwords in `.env`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="f1_platform_check",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["f1", "platform"],
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=10)},
)
def f1_platform_check() -> None:
    @task
    def kafka_reachable() -> dict[str, int]:
        """The broker answers a metadata request through `kafka_default`."""
        from airflow.providers.apache.kafka.hooks.client import KafkaAdminClientHook

        admin = KafkaAdminClientHook(kafka_config_id="kafka_default").get_conn
        metadata = admin.list_topics(timeout=10)
        return {"brokers": len(metadata.brokers), "topics": len(metadata.topics)}

    @task
    def telemetry_db_reachable() -> str:
        """The telemetry database answers through `telemetry_db`, as the writer role."""
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        row = PostgresHook(postgres_conn_id="telemetry_db").get_first("SELECT current_user")
        return str(row[0])

    kafka_reachable()
    telemetry_db_reachable()


f1_platform_check()

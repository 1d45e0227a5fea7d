from __future__ import annotations

import subprocess
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from pipeline.settings import Settings
from tests.integration.streams import F1, RACE, round_trip, subprocess_env


@pytest.fixture
def topic(stack: Settings, airflow_env: dict[str, str]) -> str:
    """A fresh topic created with 3 partitions through the Kafka provider's admin hook."""
    from airflow.providers.apache.kafka.hooks.client import KafkaAdminClientHook

    name = f"test-{uuid.uuid4().hex[:10]}"
    hook = KafkaAdminClientHook(kafka_config_id="kafka_default")
    hook.create_topic([(name, 3, 1)])
    yield name
    hook.delete_topic([name])


def test_topic_created_through_the_admin_hook_is_described_back(
    stack: Settings, topic: str
) -> None:
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap_servers})
    metadata = admin.list_topics(topic=topic, timeout=10)
    assert metadata.topics[topic].error is None
    assert sorted(metadata.topics[topic].partitions) == [0, 1, 2]


def test_auto_topic_creation_is_off(stack: Settings) -> None:
    name = f"never-created-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap_servers})
    errors: list[str] = []
    producer.produce(name, b"x", on_delivery=lambda err, msg: errors.append(str(err)))
    producer.flush(15)
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap_servers})
    assert name not in admin.list_topics(timeout=10).topics


@pytest.mark.usefixtures("race_export")
@pytest.mark.parametrize("command", [["produce", "--session", RACE], ["consume"]])
def test_a_missing_topic_is_one_clear_error(stack: Settings, command: list[str]) -> None:
    # The broker does not create topics on use: say so, and how to create them.
    missing = stack.model_copy(update={"telemetry_topic": f"missing-{uuid.uuid4().hex[:8]}"})
    ran = subprocess.run(
        [F1, *command], env=subprocess_env(missing), capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert f"topic '{missing.telemetry_topic}' is not on the broker" in ran.stderr
    assert "`f1 topics`" in ran.stderr and "Traceback" not in ran.stdout + ran.stderr


def test_message_round_trip_through_the_broker(stack: Settings, topic: str) -> None:
    sent = {f"2023_Monaco_R:{n}".encode(): f"sample-{n}".encode() for n in (1, 11, 16)}
    assert round_trip(stack.kafka_bootstrap_servers, topic, sent) == sent


def test_damaged_data_folder_is_reported_and_kept(stack: Settings) -> None:
    # On a broker of its own: the shared one (and a demo streaming through it) keeps running.
    from pipeline.stack import kafka_server
    from pipeline.stack.process import StackError
    from pipeline.stack.sandbox import private_services

    with private_services(stack, only={"kafka"}) as private:
        broker = private.settings
        assert private.kafka.stop()
        meta = kafka_server.data_dir(broker) / "meta.properties"
        aside = meta.with_suffix(".aside")
        meta.rename(aside)
        files_before = sorted(p.name for p in kafka_server.data_dir(broker).iterdir())
        try:
            with pytest.raises(StackError, match=r"Kafka data folder .* is damaged.*move it aside"):
                private.up("kafka")  # what `make up` does for Kafka
            # Nothing in the folder was deleted or rewritten by the failed start.
            assert sorted(p.name for p in kafka_server.data_dir(broker).iterdir()) == files_before
            assert private.kafka.pid() is None
        finally:
            aside.rename(meta)
        private.up("kafka")
        assert private.kafka.healthy()


def test_scratch_topics_are_gone_from_the_broker_afterwards(stack: Settings) -> None:
    from pipeline.kafka.topics import admin_client, scratch_topics

    with scratch_topics(stack, "test") as scratch:
        names = {scratch.telemetry_topic, scratch.dead_letter_topic}
        assert names <= set(admin_client(stack).list_topics(timeout=10).topics)
    assert not names & set(admin_client(stack).list_topics(timeout=10).topics)

"""Private services (pipeline/stack/sandbox.py): a broker or a database of a test's
own, beside the shared stack, gone afterwards."""

from __future__ import annotations

import uuid

import psutil
import psycopg
import pytest

from pipeline.kafka.topics import TopicSpec, admin_client, provision
from pipeline.settings import Settings
from pipeline.stack import kafka_server, postgres
from pipeline.stack.process import port_owner
from pipeline.stack.sandbox import private_services, settings_environment
from tests.integration.streams import round_trip


def _gone(pid: int) -> bool:
    """Not running (a zombie not yet reaped by this process counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_private_broker_runs_on_its_own_port_round_trips_and_is_gone_after(
    stack: Settings,
) -> None:
    shared_pid = kafka_server.processes(stack)[0].pid()
    with private_services(stack, only={"kafka"}) as private:
        mine = private.settings
        assert mine.kafka_port != stack.kafka_port
        assert mine.stack_dir != stack.stack_dir
        assert mine.postgres_port == stack.postgres_port  # only Kafka is private
        pid = private.kafka.pid()
        assert pid is not None and pid != shared_pid and private.kafka.healthy()
        owner = port_owner(mine.bind_host, mine.kafka_port)
        assert owner is not None and owner.startswith(f"pid {pid} ")
        # The jars are the shared stack's, linked, not copied.
        assert kafka_server.libs_dir(mine).resolve() == kafka_server.libs_dir(stack).resolve()

        topic = f"sandbox-{uuid.uuid4().hex[:8]}"
        provision(admin_client(mine), [TopicSpec(topic, 2)])
        assert topic in admin_client(mine).list_topics(timeout=10).topics
        assert topic not in admin_client(stack).list_topics(timeout=10).topics
        sent = {f"k{n}".encode(): f"v{n}".encode() for n in range(10)}
        received = round_trip(mine.kafka_bootstrap_servers, topic, sent)
        assert received == sent
        folder = mine.stack_dir
    assert _gone(pid)
    assert port_owner(mine.bind_host, mine.kafka_port) is None
    assert not folder.exists()
    assert kafka_server.processes(stack)[0].pid() == shared_pid  # the shared one untouched


def test_a_private_database_is_stopped_and_removed_even_when_the_body_fails(
    stack: Settings,
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), private_services(stack, only={"postgres"}) as private:
        mine = private.settings
        assert mine.postgres_port != stack.postgres_port
        assert mine.kafka_port == stack.kafka_port  # only PostgreSQL is private
        assert (postgres.data_dir(mine) / "PG_VERSION").exists()
        with psycopg.connect(mine.postgres_url("telemetry")) as conn:  # provisioned roles
            row = conn.execute("SELECT current_setting('port')").fetchone()
        assert row == (str(mine.postgres_port),)
        pid = private.postgres.pid()
        assert pid is not None
        # Stop and start, as the fault-injection tests do.
        assert private.postgres.stop() and private.postgres.pid() is None
        assert private.postgres.start() and private.postgres.healthy()
        pid = private.postgres.pid()
        raise Boom
    assert pid is not None and _gone(pid)
    assert port_owner(mine.bind_host, mine.postgres_port) is None
    assert not mine.stack_dir.exists()


def test_a_private_airflow_needs_a_private_database(stack: Settings) -> None:
    # Its metadata database lives in PostgreSQL: never the shared one.
    with (
        pytest.raises(ValueError, match="needs a private postgres"),
        private_services(stack, only={"airflow"}),
    ):
        pass


def test_the_settings_a_private_airflow_passes_its_tasks(stack: Settings) -> None:
    # Only what differs from what a process reads by itself, secrets aside: the
    # shared settings add nothing (the shared Airflow's environment is unchanged).
    assert settings_environment(stack) == {}
    private = stack.model_copy(update={"postgres_port": 1, "consumer_group": "scratch-g"})
    assert settings_environment(private) == {"POSTGRES_PORT": "1", "CONSUMER_GROUP": "scratch-g"}

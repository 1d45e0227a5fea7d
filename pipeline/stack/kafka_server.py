"""Apache Kafka 4 in KRaft mode: one node as broker and controller, from the
Apache jars that `make install` fetches from Maven Central (infra/kafka/pom.xml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from string import Template

from confluent_kafka.admin import AdminClient

from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.stack.process import ManagedProcess, StackError

INFRA = PROJECT_ROOT / "infra" / "kafka"
# Flags as in Kafka's own kafka-server-start.sh.
GC_FLAGS = [
    "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true",
]  # fmt: skip
# Fatal start-up errors that mean the data folder, not the configuration, is broken.
DAMAGE_SIGNS = (
    "No readable meta.properties",
    "node ID not found",
    "Error while reading the Quorum status",
    "doesn't match previous node id",
)


def home(settings: Settings) -> Path:
    return settings.stack_dir / "kafka"


def libs_dir(settings: Settings) -> Path:
    return home(settings) / "libs"


def data_dir(settings: Settings) -> Path:
    return home(settings) / "data"


def classpath(settings: Settings) -> str:
    return f"{libs_dir(settings)}/*"


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(
            "java not found: install Java 17 (apt-get install -y openjdk-17-jre-headless)."
        )
    return java


def _damaged(settings: Settings) -> str:
    folder = data_dir(settings)
    return (
        f"the Kafka data folder {folder} is damaged. Nothing was deleted: move it aside "
        f"(mv {folder} {folder}.bak) and run `make up` again; topics are provisioned anew."
    )


def prepare(settings: Settings) -> None:
    """Write server.properties and format the storage once."""
    if not any(libs_dir(settings).glob("kafka_2.13-*.jar")):
        raise StackError(f"Kafka jars missing in {libs_dir(settings)}: run `make install`.")
    properties = home(settings) / "server.properties"
    template = Template((INFRA / "server.properties.template").read_text())
    properties.write_text(
        template.substitute(
            KAFKA_PORT=settings.kafka_port,
            KAFKA_CONTROLLER_PORT=settings.kafka_controller_port,
            KAFKA_DATA_DIR=data_dir(settings),
        ).replace("127.0.0.1", settings.bind_host)
    )
    data = data_dir(settings)
    if (data / "meta.properties").exists():
        return
    if data.exists() and any(data.iterdir()):
        raise StackError(_damaged(settings) + " (it holds files but no meta.properties)")
    tool = [_java(), "-cp", classpath(settings), "kafka.tools.StorageTool"]
    cluster_id = subprocess.run(
        [*tool, "random-uuid"], check=True, capture_output=True, text=True
    ).stdout.strip()
    result = subprocess.run(
        [*tool, "format", "--standalone", "-t", cluster_id, "-c", str(properties)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"formatting Kafka storage failed: {result.stdout}{result.stderr}")


def _healthy(settings: Settings) -> bool:
    admin = AdminClient(
        # log_level 0: a refused connection while the broker boots is expected, not news.
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0}
    )
    return len(admin.list_topics(timeout=2).brokers) == 1


def _advise(settings: Settings, log_text: str) -> str | None:
    if any(sign in log_text for sign in DAMAGE_SIGNS):
        return _damaged(settings)
    if "Address already in use" in log_text:
        return "a Kafka port is taken: free it or set KAFKA_PORT / KAFKA_CONTROLLER_PORT in .env."
    return None


def processes(settings: Settings) -> list[ManagedProcess]:
    logs = settings.log_dir / "kafka"
    return [
        ManagedProcess(
            name="kafka",
            argv=[
                _java(), f"-Xms{settings.kafka_heap}", f"-Xmx{settings.kafka_heap}", *GC_FLAGS,
                f"-Dkafka.logs.dir={logs}",
                f"-Dlog4j2.configurationFile={INFRA / 'log4j2.yaml'}",
                "-cp", classpath(settings),
                "kafka.Kafka", str(home(settings) / "server.properties"),
            ],
            run_dir=settings.stack_dir / "run",
            log_file=settings.log_dir / "kafka.log",
            diagnostic_log=logs / "server.log",
            advise=lambda text: _advise(settings, text),
            health=lambda: _healthy(settings),
            ports=[
                (settings.bind_host, settings.kafka_port),
                (settings.bind_host, settings.kafka_controller_port),
            ],
            # After a kill -9 the broker waits out its old session (~9 s) first.
            start_timeout=90,
        )
    ]  # fmt: skip

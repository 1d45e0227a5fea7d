"""Private services for destructive tests: a Kafka broker, a PostgreSQL cluster
and/or an Airflow of their own, in a fresh temporary stack folder on free ports,
started by the same code as the shared stack, and stopped and removed afterwards.

A test that kills a broker, stops the database or damages a data folder does it
to these, never to the shared stack a demo may be running on:

    with private_services(settings, only={"kafka"}) as private:
        broker = private.kafka            # a ManagedProcess: pid(), stop(), start()
        private.kill("kafka")             # SIGKILL, as a crash would
        private.up("kafka")               # back, as `make up` brings it
        ... private.settings ...          # point producers and consumers at it

Only the services in `only` are private: every other setting (MLflow, Airflow,
the PostgreSQL database when only Kafka is private, ...) still names the shared
stack. The Kafka jars are linked from the shared stack's folder, not copied.

A private Airflow (api-server, scheduler, dag-processor, triggerer: about 0.85 GB)
needs a private PostgreSQL for its metadata database, and its tasks run with the
settings given: every setting that differs from what a process reads by itself
(the private ports and folder; scratch topics and group when `settings` came from
`scratch_topics`) is passed to its components' environment, so make the scratch
topics first and the private services inside:

    with scratch_topics(stack, "test") as scratch, private_services(
        scratch, only={"postgres", "airflow"}
    ) as private:
        with airflow_server.api_client(private.settings) as api: ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import SecretStr

from pipeline.settings import Settings, get_settings
from pipeline.stack import airflow_server, kafka_server, manager
from pipeline.stack.process import ManagedProcess, StackError, _session_members

log = logging.getLogger(__name__)

PRIVATE = ("postgres", "kafka", "airflow")  # the services that can be had privately
# A private service that needs another private one (Airflow's metadata database).
NEEDS = {"airflow": "postgres"}


def free_port(host: str) -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def settings_environment(settings: Settings) -> dict[str, str]:
    """The variables that tell a process started here to use `settings`: each
    setting that differs from what it would read by itself (the environment and
    `.env`). Secrets are left out: private services have the same ones."""
    own = get_settings()
    return {
        name.upper(): str(value)
        for name, value in settings
        if value != getattr(own, name) and not isinstance(value, SecretStr)
    }


@dataclass
class PrivateServices:
    """The private services of one `private_services` block."""

    settings: Settings  # the shared settings, with the private services' folder and ports
    names: frozenset[str]
    _processes: dict[str, ManagedProcess] = field(default_factory=dict, repr=False)

    def service(self, name: str) -> manager.Service:
        if name not in self.names:
            raise KeyError(f"{name} is not private here (private: {sorted(self.names)})")
        service = next(s for s in manager.SERVICES if s.name == name)
        if name == "airflow":  # its tasks run with the private settings
            task_env = settings_environment(self.settings)
            return replace(service, processes=lambda s: airflow_server.processes(s, task_env))
        return service

    def processes(self, name: str) -> list[ManagedProcess]:
        """The private service's processes (Airflow has four: `airflow-scheduler`...)."""
        return self.service(name).processes(self.settings)

    def process(self, name: str) -> ManagedProcess:
        """The private service's process: `pid()`, `healthy()`, `stop()`, `start()`."""
        if name not in self._processes:
            [proc] = self.processes(name)
            self._processes[name] = proc
        return self._processes[name]

    @property
    def kafka(self) -> ManagedProcess:
        return self.process("kafka")

    @property
    def postgres(self) -> ManagedProcess:
        return self.process("postgres")

    def up(self, name: str) -> list[str]:
        """Bring one private service to healthy the way `make up` does (prepare,
        start, configure); left alone when it runs. Returns the processes started.
        (Not `manager.up`: that always brings PostgreSQL up, here maybe the shared one.)"""
        return manager.bring_up(self.service(name), self.settings)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL, timeout_s: float = 30) -> int:
        """Send `sig` (default SIGKILL: a crash, no shutdown) to the service's whole
        process group and wait until none of it runs. Returns the pid it had."""
        proc = self.process(name)
        pid = proc.pid()
        if pid is None:
            raise StackError(f"private {name} is not running")
        os.killpg(pid, sig)  # started in its own session: the leader's pid is the group's
        deadline = time.monotonic() + timeout_s
        while _session_members(pid):
            if time.monotonic() > deadline:
                raise StackError(
                    f"private {name} (pid {pid}) still runs {timeout_s:g} s after {sig.name}"
                )
            time.sleep(0.1)
        proc.pid()  # clears the stale pid file
        return pid


@contextmanager
def private_services(
    settings: Settings, only: set[str] | frozenset[str] = frozenset({"kafka"})
) -> Iterator[PrivateServices]:
    """Start the services in `only` ("kafka", "postgres", "airflow") privately: a
    temporary stack folder, free ports, the shared stack's code. Everything started
    in that folder is stopped and the folder removed afterwards, whether the body
    passed or failed."""
    names = frozenset(only)
    if not names or names - set(PRIVATE):
        raise ValueError(f"private services are some of {PRIVATE}, not {sorted(names)}")
    for name, needed in NEEDS.items():
        if name in names and needed not in names:
            raise ValueError(f"a private {name} needs a private {needed} too")
    folder = Path(tempfile.mkdtemp(prefix="f1-sandbox-"))
    # PostgreSQL runs as `postgres` when we are root: it must be able to reach its folder.
    folder.chmod(0o755)
    host = settings.bind_host
    update: dict[str, object] = {"stack_dir": folder}
    if "kafka" in names:
        update |= {"kafka_port": free_port(host), "kafka_controller_port": free_port(host)}
    if "postgres" in names:
        update["postgres_port"] = free_port(host)
    if "airflow" in names:
        update["airflow_port"] = free_port(host)
    private = PrivateServices(settings.model_copy(update=update), names)
    try:
        if "kafka" in names:
            shared_libs = kafka_server.libs_dir(settings).resolve()
            kafka_server.home(private.settings).mkdir(parents=True)
            kafka_server.libs_dir(private.settings).symlink_to(
                shared_libs, target_is_directory=True
            )
        private.settings.log_dir.mkdir(parents=True)
        private.settings.log_dir.chmod(0o700)  # as `make up`: logs may echo connection strings
        for service in manager.SERVICES:  # PostgreSQL first, as in the shared stack
            if service.name in names:
                private.up(service.name)
        log.info(
            "private %s in %s (%s)", ", ".join(sorted(names)), folder,
            ", ".join(f"{k} {v}" for k, v in update.items() if k.endswith("port")),
        )  # fmt: skip
        yield private
    finally:
        try:
            # Everything with a pid file in the private folder, whatever the body started.
            manager.down(private.settings)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(folder)

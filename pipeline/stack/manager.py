"""Start, stop and report the whole local stack, in dependency order."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.settings import Settings
from pipeline.stack import airflow_server, kafka_server, mlflow_server, postgres, superset_server
from pipeline.stack.process import ManagedProcess

log = logging.getLogger(__name__)


def _nothing(settings: Settings) -> None:
    return None


@dataclass(frozen=True)
class Service:
    """A part of the stack: one-off idempotent steps before its processes start
    (`prepare`: initdb, migrations, users) and after (`configure`: provisioning)."""

    name: str
    processes: Callable[[Settings], list[ManagedProcess]]
    prepare: Callable[[Settings], None] = _nothing
    configure: Callable[[Settings], None] = _nothing
    url: Callable[[Settings], str] = lambda s: ""


POSTGRES = Service(
    "postgres",
    lambda s: [postgres.process(s)],
    prepare=postgres.initdb,
    configure=postgres.provision,
    url=lambda s: f"postgresql://{s.bind_host}:{s.postgres_port}  (roles: .env)",
)
# These only need PostgreSQL, so they start side by side once it is up.
DEPENDENT_SERVICES = (
    Service(
        "kafka",
        kafka_server.processes,
        prepare=kafka_server.prepare,
        url=lambda s: s.kafka_bootstrap_servers,
    ),
    Service(
        "mlflow",
        mlflow_server.processes,
        prepare=mlflow_server.prepare,
        url=lambda s: s.mlflow_tracking_uri,
    ),
    Service(
        "airflow",
        airflow_server.processes,
        prepare=airflow_server.prepare,
        url=lambda s: f"{s.airflow_url}  (user AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD)",
    ),
    Service(
        "superset",
        superset_server.processes,
        prepare=superset_server.prepare,
        configure=superset_server.configure,
        url=lambda s: f"{s.superset_url}  (user SUPERSET_ADMIN_USER / SUPERSET_ADMIN_PASSWORD)",
    ),
)
SERVICES = (POSTGRES, *DEPENDENT_SERVICES)


def bring_up(service: Service, settings: Settings) -> list[str]:
    """One service to healthy: prepare, start its processes, configure; only
    configure when it already runs healthy. Returns the processes started now."""
    started_at = time.monotonic()
    procs = service.processes(settings)
    if all(p.pid() is not None and p.healthy() and not p.code_changed() for p in procs):
        log.info("%s: already running and healthy", service.name)
        service.configure(settings)
        return []
    service.prepare(settings)
    started = [p.name for p in procs if p.start()]
    service.configure(settings)
    log.info("%s: healthy after %.1f s", service.name, time.monotonic() - started_at)
    return started


def up(settings: Settings, *, only: set[str] | None = None) -> list[str]:
    """Bring the stack (or the named services) to healthy. Idempotent: what runs
    and is healthy is left alone. Returns the names of the processes started now."""
    wanted = [s for s in DEPENDENT_SERVICES if only is None or s.name in only]
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    # Logs may echo connection strings on failure: keep them private.
    settings.log_dir.chmod(0o700)
    started = bring_up(POSTGRES, settings)
    with ThreadPoolExecutor(max_workers=len(wanted) or 1) as pool:
        futures = [pool.submit(bring_up, s, settings) for s in wanted]
        errors: list[Exception] = []
        for future in futures:
            try:
                started += future.result()
            except Exception as failure:  # report every failing service, not just the first
                errors.append(failure)
    for extra in errors[1:]:
        log.error("%s", extra)
    if errors:
        raise errors[0]
    return started


def down(settings: Settings, *, only: set[str] | None = None) -> list[str]:
    """Stop services or single processes (all by default), in reverse start order.
    Harmless when nothing runs. Returns the names of the processes stopped."""
    stopped = []
    for service in reversed(SERVICES):
        for proc in reversed(service.processes(settings)):
            if only is not None and service.name not in only and proc.name not in only:
                continue
            if proc.stop():
                stopped.append(proc.name)
    return stopped


def status(settings: Settings) -> list[tuple[str, int | None, bool, str]]:
    """(process, pid or None, healthy, url) for every process of the stack."""
    rows = []
    for service in SERVICES:
        for proc in service.processes(settings):
            rows.append((proc.name, proc.pid(), proc.healthy(), service.url(settings)))
    return rows

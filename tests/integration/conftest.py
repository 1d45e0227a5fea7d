"""Session fixtures for the real local stack: reuse what runs, start what does not,
and stop at the end only what this session started.

The suite runs beside a live demo, so it must leave the demo alone: the stack
fixture records where the demo's models' aliases point and when each shared
service started, and after the whole session fails loudly if an alias moved, a
version was registered under the demo's names, or a service was restarted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pipeline.settings import Settings, get_settings
from pipeline.stack import airflow_server, manager
from pipeline.stack.envfile import ensure_env_file


@dataclass(frozen=True)
class DemoState:
    """What the suite must not change: the demo's registered models (name -> alias
    -> version, and the newest version), and each shared process (pid, start time)."""

    aliases: dict[str, dict[str, str]]
    newest: dict[str, int]
    processes: dict[str, tuple[int, float]]


def demo_state(settings: Settings) -> DemoState:
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    start = f"{settings.model_name_prefix}-"
    aliases: dict[str, dict[str, str]] = {}
    newest: dict[str, int] = {}
    token = None
    while True:
        page = client.search_registered_models(f"name LIKE '{start}%'", page_token=token)
        for model in page:
            if model.name.startswith(start):
                aliases[model.name] = {a: str(v) for a, v in model.aliases.items()}
                versions = client.search_model_versions(f"name = '{model.name}'")
                newest[model.name] = max((int(v.version) for v in versions), default=0)
        token = page.token
        if not token:
            break
    processes = {}
    for service in manager.SERVICES:
        for proc in service.processes(settings):
            pid = proc.pid()
            if pid is not None:
                with contextlib.suppress(psutil.NoSuchProcess):  # ended just now
                    processes[proc.name] = (pid, psutil.Process(pid).create_time())
    return DemoState(aliases, newest, processes)


def demo_changes(before: DemoState, after: DemoState) -> list[str]:
    """What the suite changed of the demo, one line each (empty: left alone)."""
    problems = []
    for name in sorted(before.aliases.keys() | after.aliases.keys()):
        if name not in after.aliases:
            problems.append(f"registered model {name} was deleted")
            continue
        if name not in before.aliases:
            problems.append(f"registered model {name} was created (aliases {after.aliases[name]})")
            continue
        was, now = before.aliases[name], after.aliases[name]
        for alias in sorted(was.keys() | now.keys()):
            if was.get(alias) != now.get(alias):
                problems.append(
                    f"{name}: alias {alias!r} moved from v{was.get(alias, '-')} to "
                    f"v{now.get(alias, '-')}"
                )
        if after.newest[name] != before.newest[name]:
            problems.append(
                f"{name}: versions registered during the suite (newest was "
                f"v{before.newest[name]}, is v{after.newest[name]})"
            )
    for proc, (pid, started) in sorted(before.processes.items()):
        now_pid, now_started = after.processes.get(proc, (None, None))
        if now_pid is None:
            problems.append(f"{proc} (pid {pid}) no longer runs")
        elif (now_pid, now_started) != (pid, started):
            problems.append(f"{proc} was restarted (pid {pid} -> {now_pid})")
    return problems


class DemoDisturbed(AssertionError):
    """The suite changed what the running demo depends on."""


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    ensure_env_file()
    settings = get_settings()
    running = {
        proc.name
        for service in manager.SERVICES
        for proc in service.processes(settings)
        if proc.pid() is not None
    }
    # Stopped at the end: what did not run before. A process `up` restarts because
    # its code changed is the user's, and keeps running.
    started = [name for name in manager.up(settings) if name not in running]
    before = demo_state(settings)
    problems: list[str] = []
    try:
        yield settings
        problems = demo_changes(before, demo_state(settings))
    finally:
        if started and not os.environ.get("F1_KEEP_STACK"):
            manager.down(settings, only=set(started))
    if problems:
        raise DemoDisturbed(
            "THE TEST SUITE DISTURBED THE RUNNING DEMO (tests must use scratch models, "
            "scratch topics and private services, never the demo's):\n  " + "\n  ".join(problems)
        )


@pytest.fixture(scope="session")
def airflow_env(stack: Settings) -> Iterator[dict[str, str]]:
    """The Airflow configuration (connections included) in this test process."""
    env = airflow_server.environment(stack)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def airflow_api(stack: Settings) -> Iterator[httpx.Client]:
    with airflow_server.api_client(stack) as client:
        yield client


# --- on a failure, what the services logged meanwhile -----------------------------------
# CI's clone (and its .stack/logs) is gone when its output is read: a failed test's report
# carries the lines the shared services' logs got while it ran.
SERVICE_LOGS = ("superset.log", "superset-access.log", "postgres.log", "kafka.log", "mlflow.log")
LOG_LINES_KEPT = 40


def _log_sizes() -> dict[Path, int]:
    try:
        log_dir = get_settings().log_dir
    except Exception:  # no .env yet: the stack fixture writes it (and starts the logs)
        return {}
    return {
        path: path.stat().st_size
        for path in (log_dir / name for name in SERVICE_LOGS)
        if path.exists()
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    item.stash[LOG_SIZES] = _log_sizes()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed or LOG_SIZES not in item.stash:
        return
    for path, size in item.stash[LOG_SIZES].items():
        with path.open("rb") as log:
            log.seek(size)
            written = log.read().decode(errors="replace").splitlines()
        if written:
            report.sections.append(
                (f"{path.name} during the test (last {LOG_LINES_KEPT} lines)",
                 "\n".join(line[:400] for line in written[-LOG_LINES_KEPT:]))
            )  # fmt: skip


LOG_SIZES = pytest.StashKey[dict[Path, int]]()

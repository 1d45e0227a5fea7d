"""Session fixtures for the real local stack: reuse what runs, start what does not,
and stop at the end only what this session started."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from pipeline.settings import Settings, get_settings
from pipeline.stack import airflow_server, manager
from pipeline.stack.envfile import ensure_env_file


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    ensure_env_file()
    settings = get_settings()
    started = manager.up(settings)
    yield settings
    if started and not os.environ.get("F1_KEEP_STACK"):
        manager.down(settings, only=set(started))


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

"""Airflow 3: api-server, scheduler, dag-processor and triggerer with the
LocalExecutor and PostgreSQL metadata, configured only through environment
variables built here (so `make up`, `f1 airflow ...` and the tests agree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.stack.process import ManagedProcess, StackError

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def home(settings: Settings) -> Path:
    return settings.stack_dir / "airflow"


def passwords_file(settings: Settings) -> Path:
    return home(settings) / "simple_auth_manager_passwords.json"


def environment(settings: Settings) -> dict[str, str]:
    """Everything Airflow needs, as AIRFLOW__* / AIRFLOW_CONN_* variables."""
    kafka_conn = {
        "conn_type": "kafka",
        "extra": {"bootstrap.servers": settings.kafka_bootstrap_servers},
    }
    return {
        "AIRFLOW_HOME": str(home(settings)),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # The default 32 idle worker slots cost memory a 2-core box cannot spare.
        "AIRFLOW__CORE__PARALLELISM": str(settings.airflow_parallelism),
        "AIRFLOW__CORE__FERNET_KEY": settings.airflow_fernet_key.get_secret_value(),
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.airflow_admin_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(settings)),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.airflow_url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.postgres_url("airflow", driver="psycopg"),
        "AIRFLOW__API__HOST": settings.bind_host,
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": settings.airflow_url,
        "AIRFLOW__API__SECRET_KEY": settings.airflow_api_secret_key.get_secret_value(),
        "AIRFLOW__API_AUTH__JWT_SECRET": settings.airflow_jwt_secret.get_secret_value(),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(settings.log_dir / "airflow"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW_CONN_KAFKA_DEFAULT": json.dumps(kafka_conn),
        "AIRFLOW_CONN_TELEMETRY_DB": settings.postgres_url("telemetry"),
        # Tasks read the settings from the environment: `dags test` with scratch
        # settings (tests) trains and promotes under the scratch model names.
        "MODEL_NAME_PREFIX": settings.model_name_prefix,
        "LAPS_DIR": str(settings.laps_dir),
    }


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def run_cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the airflow CLI with the stack's configuration."""
    return subprocess.run(
        [airflow_bin(), *args],
        env={**os.environ, **environment(settings)},
        check=check,
        capture_output=True,
        text=True,
    )


def dags_test(settings: Settings, dag_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`airflow dags test`, with the DAG paused meanwhile. The scheduler runs the
    tasks of every running run of an unpaused DAG (f1_stream during the demo),
    including the one `dags test` creates: both would then run its tasks and wait
    for each other. A DAG the api-server does not know yet is tested as is."""
    with api_client(settings) as api:
        answer = api.get(f"/dags/{dag_id}")
        pause = answer.status_code == 200 and not answer.json()["is_paused"]
        if pause:
            api.patch(f"/dags/{dag_id}", json={"is_paused": True}).raise_for_status()
        try:
            return run_cli(settings, "dags", "test", dag_id, *args, check=False)
        finally:
            if pause:
                api.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()


def prepare(settings: Settings) -> None:
    home(settings).mkdir(parents=True, exist_ok=True)
    fd = os.open(passwords_file(settings), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {settings.airflow_admin_user: settings.airflow_admin_password.get_secret_value()},
            handle,
        )
    result = run_cli(settings, "db", "migrate", check=False)
    if result.returncode != 0:
        raise StackError(f"airflow db migrate failed:\n{result.stderr[-2000:]}")


def _monitor(settings: Settings) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(
        f"{settings.airflow_url}/api/v2/monitor/health", timeout=3
    ).json()
    return answer


def health(settings: Settings) -> dict[str, str]:
    """Component -> status from the api-server's monitor endpoint."""
    body = _monitor(settings)
    return {name: str(part.get("status")) for name, part in body.items() if isinstance(part, dict)}


def _component_healthy(settings: Settings, component: str, started: Path) -> bool:
    body = _monitor(settings)
    if component == "api-server":
        return bool(body["metadatabase"]["status"] == "healthy")
    part = body.get(component.replace("-", "_")) or {}
    beat = next((v for k, v in part.items() if k.startswith("latest_")), None)
    if part.get("status") != "healthy" or not beat:
        return False
    # A heartbeat older than this start may be a predecessor's (it stays "healthy" ~30 s).
    return datetime.fromisoformat(beat).timestamp() >= started.stat().st_mtime - 1


def plugin_code_digest() -> str:
    """The api-server imports plugins (and the live page they mount) only at start."""
    import hashlib

    files = sorted((PROJECT_ROOT / "plugins").glob("*.py")) + sorted(
        (PROJECT_ROOT / "pipeline" / "live").glob("*.py")
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def processes(settings: Settings, task_env: dict[str, str] | None = None) -> list[ManagedProcess]:
    """The four components. `task_env`: more variables for them and so for the tasks
    they run (a private Airflow's tasks are told the private ports and scratch
    topics this way); the shared stack passes none, so its environment, and the
    digest a running component was started with, stay as they are."""
    env = {**environment(settings), **(task_env or {})}
    run_dir = settings.stack_dir / "run"
    extra_args = {
        "api-server": ["--host", settings.bind_host, "--port", str(settings.airflow_port),
                       "--workers", "1"],
        # Their log servers bind every interface (not configurable): task logs are
        # read from the shared log folder instead.
        "scheduler": ["--skip-serve-logs"],
        "triggerer": ["--skip-serve-logs"],
        "dag-processor": [],
    }  # fmt: skip
    procs = []
    for component in COMPONENTS:
        pid_file = run_dir / f"airflow-{component}.pid"
        procs.append(
            ManagedProcess(
                name=f"airflow-{component}",
                argv=[airflow_bin(), component, *extra_args[component]],
                env=env,
                run_dir=run_dir,
                log_file=settings.log_dir / f"airflow-{component}.log",
                # Every component is proved alive through the api-server's view of
                # its heartbeat, so the api-server starts first.
                health=lambda c=component, p=pid_file: _component_healthy(settings, c, p),  # type: ignore[misc]
                ports=[(settings.bind_host, settings.airflow_port)]
                if component == "api-server"
                else [],
                start_timeout=180,
                code_digest=plugin_code_digest if component == "api-server" else None,
            )
        )
    return procs


def access_token(settings: Settings, timeout_s: float = 30.0) -> str:
    """A JWT for the admin from `.env` (what the UI keeps in its `_token` cookie)."""
    answer = httpx.post(
        f"{settings.airflow_url}/auth/token",
        json={
            "username": settings.airflow_admin_user,
            "password": settings.airflow_admin_password.get_secret_value(),
        },
        timeout=timeout_s,
    )
    answer.raise_for_status()
    return str(answer.json()["access_token"])


def api_client(settings: Settings, timeout_s: float = 30.0) -> httpx.Client:
    """A client for Airflow's REST API (`/api/v2`), logged in as the admin."""
    return httpx.Client(
        base_url=f"{settings.airflow_url}/api/v2",
        headers={"Authorization": f"Bearer {access_token(settings, timeout_s)}"},
        timeout=timeout_s,
    )

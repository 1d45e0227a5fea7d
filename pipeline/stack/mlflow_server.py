"""MLflow tracking server: PostgreSQL backend store, artifacts served by the server."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from pipeline.settings import Settings
from pipeline.stack.process import ManagedProcess


def artifacts_dir(settings: Settings) -> Path:
    return settings.stack_dir / "mlflow" / "artifacts"


def _healthy(settings: Settings) -> bool:
    return httpx.get(f"{settings.mlflow_tracking_uri}/health", timeout=2).text.strip() == "OK"


def prepare(settings: Settings) -> None:
    artifacts_dir(settings).mkdir(parents=True, exist_ok=True)


def allowed_hosts(settings: Settings) -> list[str]:
    """Host headers the server answers: its own address and localhost, on its port.
    MLflow's default also lets in every private-network address (10.*, 192.168.*...),
    which a DNS-rebinding page can point at; anything else gets 403."""
    port = settings.mlflow_port
    return sorted({f"{settings.bind_host}:{port}", f"127.0.0.1:{port}", f"localhost:{port}"})


def processes(settings: Settings) -> list[ManagedProcess]:
    origins = [f"http://{host}" for host in allowed_hosts(settings)]
    return [
        ManagedProcess(
            name="mlflow",
            argv=[
                str(Path(sys.executable).with_name("mlflow")), "server",
                "--host", settings.bind_host, "--port", str(settings.mlflow_port),
                "--artifacts-destination", str(artifacts_dir(settings)),
                "--workers", "1",
                "--allowed-hosts", ",".join(allowed_hosts(settings)),
                "--cors-allowed-origins", ",".join(origins),
            ],
            env={
                # In the environment, not argv, so the password stays out of `ps`.
                "MLFLOW_BACKEND_STORE_URI": settings.postgres_url("mlflow", driver="psycopg"),
                # The job runner costs ~650 MB and we do not use it.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
            run_dir=settings.stack_dir / "run",
            log_file=settings.log_dir / "mlflow.log",
            health=lambda: _healthy(settings),
            ports=[(settings.bind_host, settings.mlflow_port)],
            start_timeout=180,  # the first start migrates the tracking schema
        )
    ]  # fmt: skip

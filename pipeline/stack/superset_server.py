"""Superset 6 in its own environment (.venv-superset): PostgreSQL metadata, the
admin from `.env`, and the `telemetry` database through the read-only role.

Each set-up step costs 6-10 s of Superset start-up, so a step runs only when
what it applies changed (a stamp holds a hash of it): a warm `make up` runs none.
Passwords travel in FLASK_* variables, never on a command line visible in `ps`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import httpx

from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.stack.process import ManagedProcess, StackError

VENV_BIN = PROJECT_ROOT / ".venv-superset" / "bin"
CONFIG = PROJECT_ROOT / "superset" / "superset_config.py"
TELEMETRY_DATABASE = "telemetry"


def home(settings: Settings) -> Path:
    return settings.stack_dir / "superset"


def environment(settings: Settings) -> dict[str, str]:
    return {
        "SUPERSET_CONFIG_PATH": str(CONFIG),
        "SUPERSET_SECRET_KEY": settings.superset_secret_key.get_secret_value(),
        "SUPERSET_DATABASE_URI": settings.postgres_url("superset", driver="psycopg2"),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "SUPERSET_HOME": str(home(settings)),
    }


def _cli(settings: Settings, *args: str, secrets: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(VENV_BIN / "superset"), *args],
        env={**os.environ, **environment(settings), **(secrets or {})},
        stdin=subprocess.DEVNULL,  # an empty password would prompt; never hang on it
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(
            f"superset {args[0]} failed (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-2000:]}"
        )
    return result.stdout


def _stamped(settings: Settings, step: str, value: str) -> bool:
    stamp = home(settings) / f"{step}.stamp"
    digest = hashlib.sha256(value.encode()).hexdigest()
    return stamp.exists() and stamp.read_text() == digest


def _stamp(settings: Settings, step: str, value: str) -> None:
    stamp = home(settings) / f"{step}.stamp"
    stamp.write_text(hashlib.sha256(value.encode()).hexdigest())
    stamp.chmod(0o600)


def prepare(settings: Settings) -> None:
    """Metadata schema, roles and the admin user: before the web server starts."""
    if not (VENV_BIN / "superset").exists():
        raise StackError("Superset environment missing (.venv-superset): run `make install`.")
    home(settings).mkdir(parents=True, exist_ok=True)
    installed = sorted(
        p.name for p in VENV_BIN.parent.glob("lib/python*/site-packages/*.dist-info")
    )
    version = CONFIG.read_text() + "\n".join(installed)
    if not _stamped(settings, "schema", version):
        _cli(settings, "db", "upgrade")
        _cli(settings, "init")
        _stamp(settings, "schema", version)
    user = settings.superset_admin_user
    password = settings.superset_admin_password.get_secret_value()
    if not _stamped(settings, "admin", f"{user}:{password}"):
        # create-admin leaves an existing user's password alone: reset it to .env's.
        _cli(
            settings, "fab", "create-admin", "--username", user, "--firstname", "Admin",
            "--lastname", "User", "--email", f"{user}@localhost.localdomain",
            secrets={"FLASK_FAB_CREATE_ADMIN_PASSWORD": password},
        )  # fmt: skip
        _cli(
            settings, "fab", "reset-password", "--username", user,
            secrets={"FLASK_FAB_RESET_PASSWORD_PASSWORD": password},
        )  # fmt: skip
        _stamp(settings, "admin", f"{user}:{password}")


def configure(settings: Settings) -> None:
    """The `telemetry` database connection through the read-only role."""
    uri = settings.postgres_url("telemetry_reader", driver="psycopg2")
    if not _stamped(settings, "telemetry-db", uri):
        _cli(
            settings, "set-database-uri", "--database_name", TELEMETRY_DATABASE,
            secrets={"FLASK_SET_DATABASE_URI_URI": uri},
        )  # fmt: skip
        _stamp(settings, "telemetry-db", uri)


def login(settings: Settings, client: httpx.Client | None = None) -> str:
    """An API access token for the admin from `.env`."""
    answer = (client or httpx).post(
        f"{settings.superset_url}/api/v1/security/login",
        json={
            "username": settings.superset_admin_user,
            "password": settings.superset_admin_password.get_secret_value(),
            "provider": "db",
            "refresh": True,
        },
        timeout=30,
    )
    answer.raise_for_status()
    return str(answer.json()["access_token"])


def _healthy(settings: Settings) -> bool:
    # /health does not touch the metadata database; the tests' API login covers that.
    return httpx.get(f"{settings.superset_url}/health", timeout=3).status_code == 200


def processes(settings: Settings) -> list[ManagedProcess]:
    return [
        ManagedProcess(
            name="superset",
            argv=[
                str(VENV_BIN / "gunicorn"),
                "--bind", f"{settings.bind_host}:{settings.superset_port}",
                # One worker: ~350 MB; a second doubles memory for no gain at one user.
                "--workers", "1", "--worker-class", "gthread", "--threads", "4",
                "--timeout", "120", "--graceful-timeout", "20",
                "--limit-request-line", "0", "--limit-request-field_size", "0",
                "--no-control-socket",  # else a shared socket in ~/.gunicorn
                "--access-logfile", str(settings.log_dir / "superset-access.log"),
                # With each request's duration: a slow chart shows in the log.
                "--access-logformat", '%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"',
                "superset.app:create_app()",
            ],
            env=environment(settings),
            run_dir=settings.stack_dir / "run",
            log_file=settings.log_dir / "superset.log",
            health=lambda: _healthy(settings),
            ports=[(settings.bind_host, settings.superset_port)],
            start_timeout=120,
        )
    ]  # fmt: skip

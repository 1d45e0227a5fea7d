"""PostgreSQL 15 from Debian's packages, run from a data folder of the project's own
(not the system cluster), so the stack is self-contained and `make down` leaves
the machine as it was."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from pipeline.settings import Settings
from pipeline.stack.process import ManagedProcess, StackError

log = logging.getLogger(__name__)

# database -> owning role; `telemetry_reader` gets read-only access to telemetry.
DATABASES = {
    "airflow": "airflow",
    "mlflow": "mlflow",
    "superset": "superset",
    "telemetry": "telemetry",
}
READER_ROLE = "telemetry_reader"
READER_STATEMENT_TIMEOUT = "60s"


def _as_postgres_user() -> list[str]:
    """Postgres refuses to run as root: drop to the `postgres` account when we are root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


def _chown_to_postgres(*paths: Path) -> None:
    if os.geteuid() != 0:
        return
    account = pwd.getpwnam("postgres")
    for path in paths:
        os.chown(path, account.pw_uid, account.pw_gid)


def data_dir(settings: Settings) -> Path:
    return settings.stack_dir / "postgres" / "data"


def initdb(settings: Settings) -> None:
    """Create the cluster once; an existing one is kept as it is."""
    data = data_dir(settings)
    if (data / "PG_VERSION").exists():
        return
    if data.exists() and any(data.iterdir()):
        raise StackError(
            f"PostgreSQL data folder {data} is not empty but holds no cluster (no PG_VERSION): "
            f"it looks damaged. Move it aside (mv {data} {data}.bak) and run `make up` again."
        )
    initdb_bin = settings.postgres_bin_dir / "initdb"
    if not initdb_bin.exists():
        raise StackError(
            f"{initdb_bin} not found: install PostgreSQL 15 (apt-get install -y postgresql-15) "
            "or set POSTGRES_BIN_DIR in .env."
        )
    data.mkdir(parents=True, exist_ok=True)
    socket_dir(settings).mkdir(parents=True, exist_ok=True)
    _chown_to_postgres(data, socket_dir(settings))
    with tempfile.NamedTemporaryFile("w", dir=data.parent, delete=False) as pw:
        pw.write(settings.postgres_admin_password.get_secret_value())
    _chown_to_postgres(Path(pw.name))
    try:
        log.info("postgres: creating the cluster in %s", data)
        subprocess.run(
            [
                *_as_postgres_user(), str(initdb_bin), "-D", str(data), "-U", "postgres",
                f"--pwfile={pw.name}", "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                "-E", "UTF8", "--no-locale",
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    except subprocess.CalledProcessError as err:
        shutil.rmtree(data, ignore_errors=True)  # nothing was stored yet: leave no half cluster
        raise StackError(f"initdb failed: {err.stderr.strip()}") from err
    finally:
        os.unlink(pw.name)


def socket_dir(settings: Settings) -> Path:
    return settings.stack_dir / "postgres" / "run"


def _is_ready(settings: Settings) -> bool:
    result = subprocess.run(
        [str(settings.postgres_bin_dir / "pg_isready"), "-q", "-h", settings.bind_host,
         "-p", str(settings.postgres_port)],
        check=False,
    )  # fmt: skip
    return result.returncode == 0


def process(settings: Settings) -> ManagedProcess:
    return ManagedProcess(
        name="postgres",
        argv=[
            *_as_postgres_user(), str(settings.postgres_bin_dir / "postgres"),
            "-D", str(data_dir(settings)),
            "-c", f"listen_addresses={settings.bind_host}",
            "-c", f"port={settings.postgres_port}",
            "-c", f"unix_socket_directories={socket_dir(settings)}",
            "-c", "max_connections=200",
            "-c", "shared_buffers=256MB",
            # What a stuck chart or a slow test leaves behind: in postgres.log.
            "-c", "log_lock_waits=on",
            "-c", "log_min_duration_statement=5s",
        ],
        run_dir=settings.stack_dir / "run",
        log_file=settings.log_dir / "postgres.log",
        health=lambda: _is_ready(settings),
        ports=[(settings.bind_host, settings.postgres_port)],
        stop_signal=signal.SIGINT,  # "fast" shutdown: SIGTERM would wait for every client
        start_timeout=60,
    )  # fmt: skip


def admin_connect(
    settings: Settings, database: str = "postgres"
) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(
            settings.postgres_url("postgres", database=database), autocommit=True
        )
    except psycopg.OperationalError as err:
        if "password authentication failed" in str(err):
            raise StackError(
                "PostgreSQL refused POSTGRES_ADMIN_PASSWORD from .env: the cluster in "
                f"{data_dir(settings)} was made with another .env. Restore that .env, or move "
                "the data folder aside to start afresh."
            ) from err
        raise


def provision(settings: Settings) -> None:
    """Roles and databases, idempotently. Passwords are (re)set from `.env`, which
    stays the single source of truth."""
    passwords = {r: p for r, p in settings.role_passwords.items() if r != "postgres"}
    with admin_connect(settings) as conn:
        for role, password in passwords.items():
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(role), sql.Literal(password.get_secret_value())
                )
            )
        for database, owner in DATABASES.items():
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [database]
            ).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(database), sql.Identifier(owner)
                    )
                )
            # Each role reaches its own database only (PUBLIC may connect by default).
            conn.execute(
                sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
                    sql.Identifier(database)
                )
            )
        conn.execute(
            sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                sql.Identifier(READER_ROLE)
            )
        )
        # A dashboard query that runs away ends with an error on its chart, before
        # Superset's worker timeout (gunicorn --timeout 120) kills the worker with it.
        conn.execute(
            sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
                sql.Identifier(READER_ROLE), sql.Literal(READER_STATEMENT_TIMEOUT)
            )
        )
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE telemetry TO {}").format(sql.Identifier(READER_ROLE))
        )
    with admin_connect(settings, "telemetry") as conn:
        reader = sql.Identifier(READER_ROLE)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(reader))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(reader))
        # Tables the writer creates later are readable by the dashboards too.
        conn.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE telemetry IN SCHEMA public "
                "GRANT SELECT ON TABLES TO {}"
            ).format(reader)
        )
    log.info("postgres: roles and databases ready")

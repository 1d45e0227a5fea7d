"""Secure defaults, checked on the running stack: fresh secrets and no default
password, every service on 127.0.0.1 only, logins everywhere, Superset's dashboards
read-only, MLflow's Host check.

Checked elsewhere, not repeated here: the live page refuses callers without
credentials (test_live.py), the broker creates no topic on demand (test_kafka.py),
the reader role cannot write (test_postgres.py, test_stream.py), a wrong password
is refused by Airflow and Superset (test_airflow.py, test_superset.py).
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import psutil
import psycopg
import pytest
import yaml
from dotenv import dotenv_values

from pipeline.dashboards import bundle
from pipeline.settings import (
    ENV_FILE,
    PROJECT_ROOT,
    SECRET_MIN_LENGTH,
    SECRET_PLACEHOLDER,
    Settings,
    SettingsError,
    load_settings,
)
from pipeline.stack import airflow_server, manager, mlflow_server, postgres, superset_server
from pipeline.stack.envfile import ENV_EXAMPLE, ensure_env_file, secret_names

F1 = str(PROJECT_ROOT / ".venv" / "bin" / "f1")
# Every process of the stack (a new one must be added here, see the first test).
PROCESSES = (
    "postgres", "kafka", "mlflow", "airflow-api-server", "airflow-scheduler",
    "airflow-dag-processor", "airflow-triggerer", "superset",
)  # fmt: skip
# What the products ship as defaults (and what people try first).
DEFAULT_PASSWORDS = ("admin", "airflow", "superset", "postgres", "password", "changeme", "")
SUPERSET_DEFAULT_SECRETS = {
    "SECRET_KEY": "CHANGE_ME_TO_A_COMPLEX_RANDOM_SECRET",
    "GUEST_TOKEN_JWT_SECRET": "test-guest-secret-change-me",
    "GLOBAL_ASYNC_QUERIES_JWT_SECRET": "test-secret-change-me",
}


def _processes(settings: Settings) -> dict[str, Any]:
    return {p.name: p for s in manager.SERVICES for p in s.processes(settings)}


# --- .env: private, fresh, refused when copied or empty ----------------------------------
def test_env_file_is_private_and_its_secrets_fresh(stack: Settings) -> None:
    mode = ENV_FILE.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == os.geteuid()
    values = dotenv_values(ENV_FILE)
    secrets = {name: values.get(name) or "" for name in secret_names()}
    for name, value in secrets.items():
        assert len(value) >= SECRET_MIN_LENGTH, f"{name} is missing or short in .env"
        assert value not in (SECRET_PLACEHOLDER, *DEFAULT_PASSWORDS), name
    assert len(set(secrets.values())) == len(secrets), "two secrets share a value"
    # The running stack was configured from these values (nothing overrides them).
    assert {k: v.get_secret_value() for k, v in _secret_settings(stack).items()} == secrets
    # None of them is committed or written to a log.
    for name, value in secrets.items():
        committed = subprocess.run(
            ["git", "grep", "-lF", "-e", value], cwd=PROJECT_ROOT, capture_output=True, text=True
        )
        assert committed.stdout == "", f"{name} is in {committed.stdout.split()}"
    logs = [p for p in stack.log_dir.rglob("*") if p.is_file()]
    for path in logs:
        text = path.read_bytes()
        assert not [n for n, v in secrets.items() if v.encode() in text], path


def _secret_settings(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name.lower()) for name in secret_names()}


def test_files_holding_secrets_are_private(stack: Settings) -> None:
    assert stat.S_IMODE(airflow_server.passwords_file(stack).stat().st_mode) == 0o600
    assert stat.S_IMODE(stack.log_dir.stat().st_mode) == 0o700  # logs may hold URLs
    assert stat.S_IMODE(postgres.data_dir(stack).stat().st_mode) == 0o700


@pytest.fixture
def no_secrets_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in secret_names():
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_secrets_in_environment")
@pytest.mark.parametrize("uncommented", [False, True], ids=["as-is", "uncommented"])
def test_a_copied_env_example_is_refused_naming_every_secret(
    tmp_path: Path, uncommented: bool
) -> None:
    copy = tmp_path / ".env"
    text = ENV_EXAMPLE.read_text()
    if uncommented:  # someone "filled in" the example by removing the #s
        text = re.sub(r"(?m)^# ([A-Z_]+=)", r"\1", text)
    copy.write_text(text)
    with pytest.raises(SettingsError) as refused:
        load_settings(copy)
    message = str(refused.value)
    why = "holds the placeholder copied from .env.example" if uncommented else "is not set"
    for name in secret_names():
        assert f"  {name} {why}" in message
    assert "`make up` or `f1 stack env`" in message
    # What `make up` does with a copy left as it is: generates every secret.
    if not uncommented:
        assert sorted(ensure_env_file(copy)) == sorted(secret_names())
        assert load_settings(copy).airflow_admin_password.get_secret_value() != ""


@pytest.mark.usefixtures("no_secrets_in_environment")
@pytest.mark.parametrize("value", ["", "tiny-secret"], ids=["empty", "short"])
def test_an_empty_or_short_password_is_refused_without_repeating_it(
    tmp_path: Path, value: str
) -> None:
    env = tmp_path / ".env"
    ensure_env_file(env)
    env.write_text(env.read_text() + f"AIRFLOW_ADMIN_PASSWORD={value}\n")  # the last one wins
    with pytest.raises(SettingsError) as refused:
        load_settings(env)
    assert str(refused.value).splitlines()[1] == (
        f"  AIRFLOW_ADMIN_PASSWORD is too short: {len(value)} characters, at least 16"
    )
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    if value:
        assert value not in str(refused.value)


def test_the_cli_stops_with_one_clear_error_on_a_bad_secret() -> None:
    result = subprocess.run(
        [F1, "stack", "status"],
        env={**os.environ, "AIRFLOW_ADMIN_PASSWORD": "tiny-secret"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: the settings (environment variables, then ")
    assert "AIRFLOW_ADMIN_PASSWORD is too short: 11 characters, at least 16" in result.stderr
    assert "Traceback" not in result.stderr and "tiny-secret" not in result.stderr


# --- no default or empty password is accepted ---------------------------------------------
def test_postgres_accepts_only_scram_passwords_and_no_default(stack: Settings) -> None:
    with postgres.admin_connect(stack) as admin:
        methods = admin.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
        assert methods == [("scram-sha-256",)]  # no trust, peer, ident, md5 or password
        roles = admin.execute(
            "SELECT rolname, rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid "
            "WHERE rolcanlogin ORDER BY rolname"
        ).fetchall()
    assert sorted(roles) == sorted((role, True) for role in stack.role_passwords)
    for role in stack.role_passwords:
        for password in {role, *DEFAULT_PASSWORDS}:
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(
                    host=stack.bind_host, port=stack.postgres_port, user=role,
                    password=password, dbname="postgres", connect_timeout=5,
                ).close()  # fmt: skip
    # The Unix socket asks for the password too.
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(
            host=str(postgres.socket_dir(stack)), port=stack.postgres_port, user="postgres",
            dbname="postgres", connect_timeout=5,
        ).close()  # fmt: skip


@pytest.mark.parametrize("password", DEFAULT_PASSWORDS)
def test_airflow_and_superset_refuse_default_passwords(stack: Settings, password: str) -> None:
    airflow = httpx.post(
        f"{stack.airflow_url}/auth/token",
        json={"username": stack.airflow_admin_user, "password": password},
        timeout=30,
    )
    assert airflow.status_code in (400, 401, 422) and "access_token" not in airflow.text
    superset = httpx.post(
        f"{stack.superset_url}/api/v1/security/login",
        json={"username": stack.superset_admin_user, "password": password, "provider": "db"},
        timeout=30,
    )
    assert superset.status_code in (400, 401, 422) and "access_token" not in superset.text


# --- every service listens on 127.0.0.1 only ----------------------------------------------
def test_the_list_of_processes_checked_is_the_stacks(stack: Settings) -> None:
    assert sorted(_processes(stack)) == sorted(PROCESSES)


def _process_tree(pid: int) -> list[psutil.Process]:
    """The process, its descendants, and whatever else runs in its session (the stack
    starts each service in a session of its own; children may leave the tree)."""
    leader = psutil.Process(pid)
    found = {p.pid: p for p in [leader, *leader.children(recursive=True)]}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid:
                found.setdefault(proc.pid, proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return list(found.values())


def _listening(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(tcp|udp, address, port) of every listening TCP socket and bound UDP socket."""
    sockets = set()
    for proc in procs:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue  # a short-lived child (a task) ended meanwhile
        for conn in connections:
            if conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN:
                sockets.add(("tcp", conn.laddr.ip, conn.laddr.port))
            elif conn.type == socket.SOCK_DGRAM and not conn.raddr:
                sockets.add(("udp", conn.laddr.ip, conn.laddr.port))
    return sockets


def _expected_ports(settings: Settings) -> dict[str, set[int]]:
    return {
        "postgres": {settings.postgres_port},
        "kafka": {settings.kafka_port, settings.kafka_controller_port},  # broker, controller
        "mlflow": {settings.mlflow_port},
        "airflow-api-server": {settings.airflow_port},
        "superset": {settings.superset_port},
    }


@pytest.mark.parametrize("name", PROCESSES)
def test_every_process_listens_on_127_0_0_1_only(stack: Settings, name: str) -> None:
    assert stack.bind_host == "127.0.0.1"  # the default; .env does not change it
    pid = _processes(stack)[name].pid()
    assert pid is not None, f"{name} is not running"
    procs = _process_tree(pid)
    sockets = _listening(procs)
    for kind, address, port in sorted(sockets):
        ip = ipaddress.ip_address(address)
        mapped = getattr(ip, "ipv4_mapped", None)  # Java binds 127.0.0.1 as ::ffff:127.0.0.1
        assert str(mapped or ip) == "127.0.0.1", f"{name} listens on {kind} {address}:{port}"
    assert {port for kind, _, port in sockets if kind == "tcp"} >= _expected_ports(stack).get(
        name, set()
    ), f"{name} (pids {[p.pid for p in procs]}) does not listen where expected: {sockets}"


# --- Airflow: nothing without a login --------------------------------------------------------
# Answer without a token by design: liveness probes, the version, the login redirect.
AIRFLOW_PUBLIC = {
    "GET /api/v2/monitor/health", "GET /api/v2/version", "GET /api/v2/auth/login",
    "GET /api/v2/auth/logout", "GET /execution/health", "GET /execution/health/ping",
}  # fmt: skip


def _routes(prefix: str, router: Any) -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled with an id that does not
    exist; non-GET calls only where the path names such an id (so, were the login
    check ever gone, the probe could change nothing)."""
    routes = []
    for route in router.routes:
        path = prefix + route.path
        probe = re.sub(r"\{[^}]+\}", "security-probe-x", path)
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "GET" or probe != path:
                routes.append((method, path))
    return routes


def _airflow_routes() -> list[tuple[str, str]]:
    from airflow.api_fastapi.core_api.routes.public import public_router
    from airflow.api_fastapi.core_api.routes.ui import ui_router
    from airflow.api_fastapi.execution_api.routes import execution_api_router

    return (
        _routes("", public_router) + _routes("", ui_router)
        + _routes("/execution", execution_api_router)
    )  # fmt: skip


def test_every_airflow_endpoint_needs_a_token(stack: Settings, airflow_env: dict[str, str]) -> None:
    routes = _airflow_routes()
    assert len(routes) > 150  # the REST API, the UI's API and the task execution API
    seen_public = set()
    with httpx.Client(base_url=stack.airflow_url, timeout=30) as anonymous:
        for method, path in routes:
            answer = anonymous.request(method, re.sub(r"\{[^}]+\}", "security-probe-x", path))
            if f"{method} {path}" in AIRFLOW_PUBLIC:
                seen_public.add(f"{method} {path}")
                assert answer.status_code in (200, 307), (method, path, answer.status_code)
            else:
                assert answer.status_code in (401, 403), (method, path, answer.status_code)
    assert seen_public == AIRFLOW_PUBLIC


def _airflow_claims(settings: Settings) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": settings.airflow_admin_user, "role": "admin", "teams": [],
        "aud": "apache-airflow", "iat": now, "nbf": now, "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }  # fmt: skip


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the forgeries
def test_airflow_signs_with_the_env_secret_and_refuses_any_other(stack: Settings) -> None:
    secret = stack.airflow_jwt_secret.get_secret_value()
    issued = airflow_server.access_token(stack)
    assert jwt.decode(issued, secret, algorithms=["HS512"], audience="apache-airflow")
    # airflow.cfg, written at the first start, holds a generated key of its own; the
    # environment's (.env's) must be the one in force.
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(airflow_server.home(stack) / "airflow.cfg")
    others = {"another key": "x" * 64, "airflow.cfg's": cfg.get("api_auth", "jwt_secret")}
    url = f"{stack.airflow_url}/api/v2/dags"

    def answer(key: str) -> int:
        forged = jwt.encode(_airflow_claims(stack), key, algorithm="HS512")
        return httpx.get(url, headers={"Authorization": f"Bearer {forged}"}, timeout=30).status_code

    assert answer(secret) == 200  # the claims are right: only the key decides
    for name, key in others.items():
        assert key != secret and answer(key) in (401, 403), name


def test_the_airflow_ui_sends_a_browser_to_the_login_form(stack: Settings) -> None:
    """The UI's pages are one static shell (200) that loads everything from /ui/*
    (401 above); in a browser, each one lands on the login form."""
    from pipeline import headless

    with headless.browser_context() as context:
        page = context.new_page()
        for path in ("/", "/dags", "/dags/f1_stream", "/connections", "/variables"):
            page.goto(f"{stack.airflow_url}{path}")
            page.wait_for_url("**/auth/login**", timeout=30_000)
            assert page.locator("input[type=password]").count() == 1, path


# --- Superset: its own secret, no anonymous access, read-only dashboards --------------------
def test_superset_signs_with_the_env_secret_key(stack: Settings) -> None:
    key = stack.superset_secret_key.get_secret_value()
    assert len(key) >= 32 and key not in SUPERSET_DEFAULT_SECRETS.values()
    token = superset_server.login(stack)  # signed by the running Superset
    assert jwt.decode(token, key, algorithms=["HS256"])["type"] == "access"


def test_superset_config_replaces_every_default_secret(stack: Settings) -> None:
    """superset.config with superset_config.py applied, as the web server loads it."""
    names = [*SUPERSET_DEFAULT_SECRETS, "SMTP_PASSWORD", "PUBLIC_ROLE_LIKE", "WTF_CSRF_ENABLED"]
    code = (
        "import json, superset.config as c; "
        f"print(json.dumps({{n: getattr(c, n, None) for n in {names!r}}}))"
    )
    result = subprocess.run(
        [str(superset_server.VENV_BIN / "python"), "-c", code],
        env={**os.environ, **superset_server.environment(stack)},
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config["SECRET_KEY"] == stack.superset_secret_key.get_secret_value()
    for name, default in SUPERSET_DEFAULT_SECRETS.items():
        assert len(config[name]) >= 32 and config[name] != default, name
    assert config["SMTP_PASSWORD"] is None  # Superset's default is "superset"
    assert config["PUBLIC_ROLE_LIKE"] is None and config["WTF_CSRF_ENABLED"] is True


def test_superset_answers_nothing_without_a_login(stack: Settings) -> None:
    with httpx.Client(base_url=stack.superset_url, timeout=30) as anonymous:
        for path in ("/api/v1/dashboard/", "/api/v1/database/", "/api/v1/chart/"):
            assert anonymous.get(path).status_code == 401, path
        for path in ("/superset/welcome/", "/sqllab/", "/dashboard/list/"):
            answer = anonymous.get(path)
            assert answer.status_code in (302, 303) and "/login" in answer.headers["location"]


def _bundle_databases() -> dict[str, dict[str, Any]]:
    files = sorted(bundle.BUNDLE_DIR.glob("databases/*.yaml"))
    return {str(c["uuid"]): c for c in (yaml.safe_load(p.read_text()) for p in files)}


WRITE_FLAGS = ("allow_dml", "allow_ctas", "allow_cvas", "allow_file_upload")


def test_the_dashboards_role_gives_up_on_a_runaway_query(stack: Settings) -> None:
    import psycopg

    with psycopg.connect(stack.postgres_url("telemetry_reader")) as conn:
        timeout = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
        read_only = conn.execute("SHOW transaction_read_only").fetchone()
    assert timeout == ("1min",) and read_only == ("on",)


def test_dashboards_read_through_the_read_only_role_with_no_dml(stack: Settings) -> None:
    databases = _bundle_databases()
    assert databases
    for config in databases.values():  # as kept in the bundle
        assert not any(config[flag] for flag in WRITE_FLAGS), config["database_name"]
        assert config["sqlalchemy_uri"].startswith("postgresql+psycopg2://telemetry_reader:")
    slugs = [yaml.safe_load(p.read_text())["slug"] for p in bundle.BUNDLE_DIR.glob("dashboards/*")]
    with bundle.api_client(stack) as api:
        used = set()
        for slug in slugs:  # the databases the imported dashboards' datasets query
            datasets = bundle.call(api, stack, "GET", f"/api/v1/dashboard/{slug}/datasets")
            used |= {d["database"]["id"] for d in datasets["result"]}
        assert used
        for database_id in used:  # as imported
            database = bundle.call(api, stack, "GET", f"/api/v1/database/{database_id}")["result"]
            assert database["uuid"] in databases
            assert {flag: database[flag] for flag in WRITE_FLAGS} == dict.fromkeys(
                WRITE_FLAGS, False
            )
            uri = bundle.call(api, stack, "GET", f"/api/v1/database/{database_id}/connection")
            assert uri["result"]["sqlalchemy_uri"].startswith(
                "postgresql+psycopg2://telemetry_reader:"
            )
            for statement in (
                "DELETE FROM stream_runs WHERE false",
                "WITH gone AS (DELETE FROM stream_runs WHERE false RETURNING 1) SELECT 1",
                "SELECT 1; DROP TABLE stream_runs",
            ):
                refused = api.post(
                    "/api/v1/sqllab/execute/",
                    json={"database_id": database_id, "sql": statement, "runAsync": False},
                )
                errors = [e["error_type"] for e in refused.json().get("errors", [])]
                assert refused.is_error and errors == ["DML_NOT_ALLOWED_ERROR"], statement


# --- MLflow: started with its allowed hosts --------------------------------------------------
def test_mlflow_refuses_a_foreign_host_header(stack: Settings) -> None:
    pid = mlflow_server.processes(stack)[0].pid()
    assert pid is not None
    argv = psutil.Process(pid).cmdline()
    assert "--allowed-hosts" in argv, (
        "the running MLflow was started without --allowed-hosts: restart it (make down; make up)"
    )
    allowed = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert sorted(allowed) == mlflow_server.allowed_hosts(stack)
    url = f"{stack.mlflow_tracking_uri}/api/2.0/mlflow/experiments/search"
    port = stack.mlflow_port
    # A DNS-rebinding page reaches the server under its own name; private addresses
    # are in MLflow's default list, not in ours. (Only the header: every request goes
    # to 127.0.0.1.)
    for host in ("evil.example.com", f"evil.example.com:{port}", f"10.0.0.8:{port}",
                 f"192.168.1.20:{port}", f"localhost:{port + 1}"):  # fmt: skip
        answer = httpx.get(url, params={"max_results": 1}, headers={"Host": host}, timeout=30)
        assert answer.status_code == 403, host
    for host in allowed:
        answer = httpx.get(url, params={"max_results": 1}, headers={"Host": host}, timeout=30)
        assert answer.status_code == 200, host

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from pipeline.settings import Settings
from pipeline.stack.envfile import ENV_EXAMPLE, ensure_env_file, render_env_example, secret_names


def _env_values(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.startswith("#")}


@pytest.fixture(autouse=True)
def no_secrets_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the .env file under test may supply secrets."""


def test_env_example_lists_every_setting() -> None:
    # .env.example is derived from Settings; regenerate with `f1 stack env-example`.
    assert ENV_EXAMPLE.read_text() == render_env_example()
    for name in Settings.model_fields:
        assert name.upper() in ENV_EXAMPLE.read_text()


def test_secrets_have_no_default(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(_env_file=tmp_path / "missing.env")  # type: ignore[call-arg]
    missing = {e["loc"][0] for e in err.value.errors()}
    assert {n.lower() for n in secret_names()} <= missing


def test_env_file_generated_with_fresh_secrets(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    generated = ensure_env_file(env)
    assert sorted(generated) == sorted(secret_names())
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    values = _env_values(env)
    assert all(len(values[name]) >= 24 for name in secret_names())
    assert len(set(values[name] for name in secret_names())) == len(secret_names())
    Fernet(values["AIRFLOW_FERNET_KEY"].encode())  # a valid Fernet key
    settings = Settings(_env_file=env)  # type: ignore[call-arg]
    assert settings.superset_admin_password.get_secret_value() == values["SUPERSET_ADMIN_PASSWORD"]


def test_env_file_keeps_existing_values_and_adds_missing(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("POSTGRES_PORT=6543\nAIRFLOW_ADMIN_PASSWORD=kept-as-is\n")
    generated = ensure_env_file(env)
    assert "AIRFLOW_ADMIN_PASSWORD" not in generated
    values = _env_values(env)
    assert values["AIRFLOW_ADMIN_PASSWORD"] == "kept-as-is"
    assert values["POSTGRES_PORT"] == "6543"
    before = env.read_text()
    assert ensure_env_file(env) == []
    assert env.read_text() == before


def test_postgres_url_quotes_passwords(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    ensure_env_file(env)
    monkeypatch.setenv("TELEMETRY_READER_PASSWORD", "p@ss/w:rd-long-enough")
    settings = Settings(_env_file=env)  # type: ignore[call-arg]
    url = settings.postgres_url("telemetry_reader", driver="psycopg")
    assert url.startswith(
        "postgresql+psycopg://telemetry_reader:p%40ss%2Fw%3Ard-long-enough@127.0.0.1:"
    )
    assert url.endswith("/telemetry")


def test_services_listen_on_loopback_by_default(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    ensure_env_file(env)
    settings = Settings(_env_file=env)  # type: ignore[call-arg]
    assert settings.bind_host == "127.0.0.1"
    assert settings.mlflow_tracking_uri.startswith("http://127.0.0.1:")


def test_empty_secret_is_refused_and_regenerated(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("SUPERSET_ADMIN_PASSWORD=\n")
    with pytest.raises(ValidationError, match="superset_admin_password"):
        Settings(_env_file=env)  # type: ignore[call-arg]
    assert "SUPERSET_ADMIN_PASSWORD" in ensure_env_file(env)
    assert len(Settings(_env_file=env).superset_admin_password.get_secret_value()) >= 16  # type: ignore[call-arg]

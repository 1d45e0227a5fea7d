"""The one settings object, read from the environment and `.env`.

Every variable is listed with its meaning in `.env.example`. Secrets have no
default: the first `make up` (or `f1 stack env`) writes a `.env` with freshly
generated values, so no service ever runs with a default or empty password.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = PROJECT_ROOT / ".env"
# The offline FastF1 sample that ships beside the project (../shared/data/...).
SAMPLE_FASTF1_CACHE = PROJECT_ROOT.parent / "shared" / "data" / "fastf1" / "cache"

SecretKind = Literal["password", "token", "fernet"]


def secret(kind: SecretKind = "password", description: str = "") -> Any:
    """A required secret field; `kind` tells the `.env` generator how to make one."""
    # min_length: an empty or trivial value (e.g. a copied .env.example) is refused.
    return Field(description=description, min_length=16, json_schema_extra={"secret": kind})


def _default_fastf1_cache() -> Path:
    if SAMPLE_FASTF1_CACHE.is_dir():
        return SAMPLE_FASTF1_CACHE
    return Path.home() / ".cache" / "fastf1"


class Settings(BaseSettings):
    """Platform settings. Environment variables win over `.env`; names are the
    field names in upper case (e.g. `POSTGRES_PORT`)."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILE, env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- where things live and listen -------------------------------------------------
    bind_host: str = Field(
        "127.0.0.1", description="Address every service listens on (loopback only by default)."
    )
    stack_dir: Path = Field(
        PROJECT_ROOT / ".stack",
        description="Git-ignored folder for the local stack's data, logs and pid files.",
    )

    # --- PostgreSQL ---------------------------------------------------------------------
    postgres_port: int = Field(5432, description="PostgreSQL port.")
    postgres_bin_dir: Path = Field(
        Path("/usr/lib/postgresql/15/bin"), description="Folder holding initdb and postgres."
    )
    postgres_admin_password: SecretStr = secret(description="Superuser `postgres` password.")
    airflow_db_password: SecretStr = secret(description="Role `airflow` (Airflow metadata).")
    mlflow_db_password: SecretStr = secret(description="Role `mlflow` (MLflow tracking store).")
    superset_db_password: SecretStr = secret(description="Role `superset` (Superset metadata).")
    telemetry_db_password: SecretStr = secret(
        description="Role `telemetry`: writes the telemetry database."
    )
    telemetry_reader_password: SecretStr = secret(
        description="Role `telemetry_reader`: read-only on telemetry, used by dashboards."
    )

    # --- Kafka --------------------------------------------------------------------------
    kafka_port: int = Field(9092, description="Kafka broker (PLAINTEXT) port.")
    kafka_controller_port: int = Field(9093, description="Kafka KRaft controller port.")
    kafka_heap: str = Field("512m", description="Kafka JVM heap (-Xms/-Xmx).")

    # --- the stream -----------------------------------------------------------------------
    telemetry_topic: str = Field("f1-speed-stream", description="Topic of the car samples.")
    telemetry_partitions: int = Field(
        4, ge=1, description="Partitions of the telemetry topic (the most consumers that help)."
    )
    dead_letter_topic: str = Field(
        "f1-speed-stream-dlq", description="Where malformed messages go, with the reason."
    )
    consumer_group: str = Field("f1-stream", description="Consumer group of `f1 consume`.")
    stream_batch_size: int = Field(
        5_000, ge=1, description="Most messages a consumer takes per batch."
    )
    stream_batch_wait_s: float = Field(
        0.05, gt=0, description="Longest wait to fill a batch (bounds latency at 1x)."
    )
    window_s: float = Field(3.0, gt=0, description="Tumbling window length, event time.")
    allowed_lateness_s: float = Field(
        2.0, ge=0, description="How long a window waits for late samples after its end."
    )
    max_message_bytes: int = Field(
        16_384, description="Bigger telemetry messages are dead-lettered as oversized."
    )
    max_event_time_ahead_s: float = Field(
        3_600.0,
        gt=0,
        description="A sample dated further ahead of its run's clock is dead-lettered "
        "(it would move the watermark for good).",
    )
    max_seq_ahead: int = Field(
        100_000,
        ge=1,
        description="A sample whose seq is further ahead of its car's is dead-lettered "
        "(it would make the rest look like duplicates).",
    )
    car_idle_s: float = Field(
        60.0,
        gt=0,
        description="A car silent this long (its run's event time, or wall time once caught "
        "up) has its open windows closed and its state trimmed.",
    )
    idle_cars_kept: int = Field(
        100,
        ge=0,
        description="Idle cars remembered per partition (their last seq and clock); older "
        "ones are forgotten, their resends are still caught by the database keys.",
    )
    db_retry_s: float = Field(
        240.0,
        gt=0,
        description="How long a consumer retries a lost PostgreSQL connection, with "
        "backoff, before giving up (under Kafka's 300 s poll interval).",
    )

    serve_models: bool = Field(
        True, description="Consumers score every sample with the models' MLflow champions."
    )
    model_name_prefix: str = Field(
        "f1",
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Registered models are named `<prefix>-pit-stop` etc. (tests use their own).",
    )
    model_refresh_s: float = Field(
        10.0, gt=0, description="How often consumers check where `champion` points."
    )
    live_channel: str = Field(
        "f1_live",
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="PostgreSQL NOTIFY channel of the live page; empty batches send nothing.",
    )
    demo_session: str = Field("2023_Monaco_R", description="Race `make up` replays.")
    demo_speed: float = Field(
        1.0, ge=0, description="Speed of the demo replay: 1 real time (~2 h), 0 unpaced."
    )
    demo_consumers: int = Field(2, ge=1, description="Consumers in the demo replay.")

    # --- MLflow -------------------------------------------------------------------------
    mlflow_port: int = Field(5000, description="MLflow tracking server port.")

    # --- Airflow ------------------------------------------------------------------------
    airflow_port: int = Field(8080, description="Airflow api-server (UI and REST) port.")
    airflow_admin_user: str = Field("admin", description="Airflow admin user name.")
    airflow_admin_password: SecretStr = secret(description="Airflow admin password.")
    airflow_fernet_key: SecretStr = secret(
        "fernet", "Encrypts connection secrets in Airflow's database."
    )
    airflow_jwt_secret: SecretStr = secret("token", "Signs Airflow API and task tokens.")
    airflow_api_secret_key: SecretStr = secret("token", "Airflow api-server session secret.")
    airflow_parallelism: int = Field(
        4, description="Task slots across Airflow (sized for a 2-core machine)."
    )

    # --- Superset -----------------------------------------------------------------------
    superset_port: int = Field(8088, description="Superset web server port.")
    superset_admin_user: str = Field("admin", description="Superset admin user name.")
    superset_admin_password: SecretStr = secret(description="Superset admin password.")
    superset_secret_key: SecretStr = secret("token", "Superset SECRET_KEY (signs sessions).")

    # --- FastF1 -------------------------------------------------------------------------
    fastf1_cache_dir: Path = Field(
        default_factory=_default_fastf1_cache,
        description="FastF1 cache folder; the offline sample beside the project where it exists.",
    )
    export_dir: Path = Field(
        PROJECT_ROOT / "data" / "exports",
        description="Where exported sessions (Parquet dataset, CSV, manifest) are written.",
    )
    fastf1_offline: bool = Field(
        default_factory=lambda: SAMPLE_FASTF1_CACHE.is_dir(),
        description="Never download: load only what the cache holds (default: on with the sample).",
    )

    # --- derived ------------------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        return self.stack_dir / "logs"

    @property
    def kafka_bootstrap_servers(self) -> str:
        return f"{self.bind_host}:{self.kafka_port}"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"http://{self.bind_host}:{self.mlflow_port}"

    @property
    def airflow_url(self) -> str:
        return f"http://{self.bind_host}:{self.airflow_port}"

    @property
    def superset_url(self) -> str:
        return f"http://{self.bind_host}:{self.superset_port}"

    @property
    def role_passwords(self) -> dict[str, SecretStr]:
        """PostgreSQL role -> its password (the superuser `postgres` first)."""
        return {
            "postgres": self.postgres_admin_password,
            "airflow": self.airflow_db_password,
            "mlflow": self.mlflow_db_password,
            "superset": self.superset_db_password,
            "telemetry": self.telemetry_db_password,
            "telemetry_reader": self.telemetry_reader_password,
        }

    def postgres_url(self, role: str, *, database: str | None = None, driver: str = "") -> str:
        """SQLAlchemy/libpq URL for one of the project's roles (`driver` e.g. `psycopg`)."""
        password = quote(self.role_passwords[role].get_secret_value(), safe="")
        database = database or ("telemetry" if role.startswith("telemetry") else role)
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{role}:{password}@{self.bind_host}:{self.postgres_port}/{database}"


@functools.cache
def get_settings() -> Settings:
    """The settings, built on first use (so importing `pipeline` never needs a `.env`)."""
    return Settings()

"""docker-compose.yml and docker-compose.scale.yml, checked statically.

There is no Docker engine on the development machines or in CI, so nothing here
starts a container. What is checked instead: both files parse and validate against
the Compose Specification's JSON schema (vendored in tests/data, see its README);
every long-running service has a health check and every one-off job is waited for
with `service_completed_successfully`; image versions match uv.lock (Airflow,
Superset, MLflow) and infra/kafka/pom.xml (Kafka's major version); every variable
comes from `.env.example` (so from pipeline/settings.py) or from an image's own
documented namespace; nothing is published beyond 127.0.0.1; no password or key is
written in the files; the Dockerfiles install from the lock; and the places where
the compose files repeat the local stack's configuration (Kafka's broker config,
Airflow's variables, the topics' spec, the data mounts) still agree with it.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from pipeline.kafka.topics import topic_specs
from pipeline.settings import (
    PROJECT_ROOT,
    SAMPLE_FASTF1_CACHE,
    SAMPLE_FASTF1_LAPS_CACHE,
    SAMPLE_UDP_RECORDING,
    Settings,
)
from pipeline.stack import airflow_server
from pipeline.stack.envfile import ENV_EXAMPLE, secret_names

BASE = PROJECT_ROOT / "docker-compose.yml"
SCALE = PROJECT_ROOT / "docker-compose.scale.yml"
COMPOSE_FILES = (BASE, SCALE)
SCHEMA = PROJECT_ROOT / "tests" / "data" / "compose-spec.json"
DOCKERFILES = {
    name: PROJECT_ROOT / "docker" / name / "Dockerfile"
    for name in ("airflow", "mlflow", "superset")
}
PLATFORM_DOCKERFILE = "docker/airflow/Dockerfile"
# Inside the platform image the project is /opt/f1 (docker/airflow/Dockerfile).
IMAGE_PROJECT_ROOT = Path("/opt/f1")
LOOPBACK = "127.0.0.1"

# Container variables that are not the platform's settings: each image's own
# documented namespace, read by that image (or by a file of ours it loads), never by
# pipeline/settings.py, so they cannot be in .env.example. Anything else a container
# is given must be a setting. `${VAR}` references are stricter: compose takes them
# from .env, which holds settings only, so they must all be in .env.example.
IMAGE_PREFIXES = {
    "AIRFLOW__": "Airflow's configuration, [section] key (apache/airflow)",
    "AIRFLOW_CONN_": "Airflow connections (apache/airflow)",
    "KAFKA_": "apache/kafka turns each into a server property (KAFKA_NUM_IO_THREADS)",
    "POSTGRES_": "the postgres image's entrypoint (POSTGRES_PASSWORD, POSTGRES_INITDB_ARGS)",
    "SUPERSET_": "Superset and superset/superset_config.py (SUPERSET_SECRET_KEY ...)",
    "MLFLOW_": "the MLflow server's options (MLFLOW_BACKEND_STORE_URI ...)",
    "FLASK_": "Click options of the superset CLI, e.g. FLASK_FAB_CREATE_ADMIN_PASSWORD",
}
IMAGE_VARIABLES = {
    "AIRFLOW_HOME": "apache/airflow's home folder",
    "DUMB_INIT_SETSID": "apache/airflow: signal handling of Celery workers",
}
REFERENCE = re.compile(
    r"(?<!\$)\$(?:\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
SECRET_REFERENCE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+):\?[^}]+\}")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<password>[^@\s]+)@")
SECRET_KEY_NAME = re.compile(r"PASSWORD|SECRET|KEY")


# --- loading ---------------------------------------------------------------------------


@cache
def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def _deep_merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file (or an `extends`) into a service, as far
    as these checks need it: mappings merged, `ports` appended, the rest replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = _deep_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return merged
    if key == "ports" and isinstance(base, list) and isinstance(override, list):
        return [*base, *(p for p in override if p not in base)]
    return copy.deepcopy(override)


def _resolved(path: Path, name: str) -> dict[str, Any]:
    service: dict[str, Any] = copy.deepcopy(_load(path)["services"][name])
    extends = service.pop("extends", None)
    if extends is None:
        return service
    source = (path.parent / extends["file"]) if "file" in extends else path
    return dict(_deep_merge(_resolved(source, extends["service"]), service))


def _model(*files: Path) -> dict[str, dict[str, Any]]:
    """The services of `docker compose -f A -f B ...`."""
    services: dict[str, dict[str, Any]] = {}
    for path in files:
        for name in _load(path)["services"]:
            service = _resolved(path, name)
            services[name] = _deep_merge(services[name], service) if name in services else service
    return services


MODELS = {"docker-compose.yml": (BASE,), "docker-compose.yml + scale": (BASE, SCALE)}


def _env(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _env_example() -> dict[str, str]:
    """Variable -> its default as .env.example shows it."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    found = (re.match(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def _locked(package: str) -> str:
    lock = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())
    versions = {str(p["version"]) for p in lock["package"] if p["name"] == package}
    assert len(versions) == 1, f"uv.lock has {package} at {sorted(versions)}"
    return versions.pop()


def _locked_python() -> str:
    lock = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())
    found = re.fullmatch(r"==(\d+\.\d+)\.\*", lock["requires-python"])
    assert found, lock["requires-python"]
    return found.group(1)


def _platform_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in services.items()
        if isinstance(s.get("build"), dict) and s["build"].get("dockerfile") == PLATFORM_DOCKERFILE
    }


def _dummy_settings() -> Settings:
    """The settings' defaults, with placeholder secrets (nothing is connected to)."""
    secrets: dict[str, Any] = {n.lower(): SecretStr("x" * 32) for n in secret_names()}
    return Settings.model_construct(**secrets)


# --- parse and validate -----------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_parses_and_validates_against_the_compose_schema(path: Path) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(_load(path)), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_environment_values_are_not_yaml_booleans(path: Path) -> None:
    # Compose wants "true"/"false" quoted; a bare YAML boolean would reach the
    # container as True/False (or be refused).
    for name in _load(path)["services"]:
        for key, value in _env(_resolved(path, name)).items():
            assert not isinstance(value, bool), f"{path.name}: {name}.{key} is a YAML boolean"


# --- health checks and the order of start -----------------------------------------------


@pytest.mark.parametrize("files", MODELS.values(), ids=MODELS.keys())
def test_every_service_has_a_health_check_or_is_a_one_off_job(files: tuple[Path, ...]) -> None:
    services = _model(*files)
    waited_for: dict[str, set[str]] = {name: set() for name in services}
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert isinstance(spec, dict), f"{name}: depends_on {dependency} needs a condition"
            assert dependency in services, f"{name} depends on a missing service {dependency}"
            waited_for[dependency].add(spec["condition"])
    for name, service in services.items():
        if service.get("restart") == "no":  # a one-off job: runs to completion
            assert "healthcheck" not in service, f"{name}: a one-off job needs no health check"
            # platform-init ends the main job: nothing comes after it to wait for it.
            last = {"service_completed_successfully"} if name != "platform-init" else set()
            assert waited_for[name] == last, (
                f"one-off {name} must be waited for with service_completed_successfully "
                f"by every dependent (found {waited_for[name] or 'no dependent'})"
            )
        else:
            check = service.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{name}: no health check"
            assert service.get("restart") == "unless-stopped", f"{name}: restart policy"
            assert waited_for[name] <= {"service_healthy"}, (
                f"{name} is waited for with {waited_for[name]}: use service_healthy"
            )


def test_the_main_job_runs_as_one_off_services_in_make_up_order() -> None:
    services = _model(BASE)
    commands = {n: " ".join(s.get("command") or []) for n, s in services.items()}
    assert "airflow db migrate" in commands["airflow-init"]
    assert "superset db upgrade" in commands["superset-init"]
    assert "f1 dashboards import" in commands["dashboards-init"]
    main_job = commands["platform-init"]
    steps = ["f1 export --skip-existing", "f1 topics", "f1 demo"]
    assert all(step in main_job for step in steps), main_job
    assert [main_job.index(step) for step in steps] == sorted(main_job.index(s) for s in steps)
    # make up imports the dashboards before it starts the demo.
    assert "dashboards-init" in services["platform-init"]["depends_on"]


# --- versions ---------------------------------------------------------------------------


def test_image_versions_match_the_lock() -> None:
    airflow, superset, mlflow = (
        _locked(p) for p in ("apache-airflow", "apache-superset", "mlflow")
    )
    python = _locked_python()
    expected = {
        "docker/airflow/Dockerfile": f"f1-telemetry/airflow:{airflow}",
        "docker/superset/Dockerfile": f"f1-telemetry/superset:{superset}",
        "docker/mlflow/Dockerfile": f"f1-telemetry/mlflow:{mlflow}",
    }
    built = 0
    for files in MODELS.values():
        for name, service in _model(*files).items():
            if "build" in service:
                built += 1
                dockerfile = service["build"]["dockerfile"]
                assert service["build"]["context"] == ".", f"{name}: build context"
                assert service.get("image") == expected[dockerfile], f"{name}: image tag"
    assert built
    text = {name: path.read_text() for name, path in DOCKERFILES.items()}
    assert re.search(
        rf"^FROM apache/airflow:{re.escape(airflow)}-python{python}$", text["airflow"], re.M
    )
    assert re.search(rf"^FROM apache/superset:{re.escape(superset)}$", text["superset"], re.M)
    assert re.search(rf"^FROM python:{python}-slim", text["mlflow"], re.M)
    assert f'"mlflow=={mlflow}"' in text["mlflow"]
    assert f'"psycopg[binary]=={_locked("psycopg")}"' in text["mlflow"]


def test_kafka_major_version_matches_the_local_brokers_jars() -> None:
    pom = ET.parse(PROJECT_ROOT / "infra" / "kafka" / "pom.xml").getroot()
    version = pom.findtext(
        "{http://maven.apache.org/POM/4.0.0}properties/"
        "{http://maven.apache.org/POM/4.0.0}kafka.version"
    )
    assert version
    images = [
        s["image"]
        for f in MODELS.values()
        for s in _model(*f).values()
        if str(s.get("image", "")).startswith("apache/kafka:")
    ]
    assert images
    for image in images:
        assert image.split(":")[1].split(".")[0] == version.split(".")[0], (image, version)


def test_every_image_is_pinned() -> None:
    for files in MODELS.values():
        for name, service in _model(*files).items():
            image = service.get("image", "")
            assert ":" in image and not image.endswith(":latest"), f"{name}: {image!r} unpinned"
    uv_images = {
        m
        for t in DOCKERFILES.values()
        for m in re.findall(r"ghcr\.io/astral-sh/uv:(\S+)", t.read_text())
    }
    assert len(uv_images) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", uv_images.pop())


# --- variables --------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_variable_is_a_setting_with_its_default(path: Path) -> None:
    known = _env_example()
    secrets = set(secret_names())
    for text in _strings(_load(path)):
        for ref in REFERENCE.finditer(text):
            name = ref.group("name") or ref.group("bare")
            assert name in known, f"{path.name}: ${name} is not in .env.example ({text!r})"
            if name in secrets:
                assert ref.group("op") in (":?", "?"), f"secret {name} needs ${{{name}:?...}}"
            else:
                # Runs with nothing but the generated secrets in .env.
                assert ref.group("op") == ":-", f"{name} needs a default: ${{{name}:-...}}"
                if not known[name].startswith("(computed"):
                    assert ref.group("arg") == known[name], (
                        f"{path.name}: ${{{name}:-{ref.group('arg')}}} but the setting's "
                        f"default is {known[name]!r}"
                    )


@pytest.mark.parametrize("files", MODELS.values(), ids=MODELS.keys())
def test_container_variables_are_settings_or_an_images_own(files: tuple[Path, ...]) -> None:
    settings = {name.upper() for name in Settings.model_fields}
    for name, service in _model(*files).items():
        for key in _env(service):
            allowed = (
                key in settings
                or key in IMAGE_VARIABLES
                or any(key.startswith(prefix) for prefix in IMAGE_PREFIXES)
            )
            assert allowed, f"{name}: {key} is neither a setting nor an image's own variable"


@pytest.mark.parametrize("files", MODELS.values(), ids=MODELS.keys())
def test_platform_containers_get_every_secret_the_settings_require(
    files: tuple[Path, ...],
) -> None:
    platform = _platform_services(_model(*files))
    assert {"airflow-scheduler", "platform-init"} <= set(platform)
    for name, service in platform.items():
        missing = set(secret_names()) - set(_env(service))
        assert not missing, f"{name}: Settings would refuse to load without {sorted(missing)}"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_password_or_key_is_written_in_the_files(path: Path) -> None:
    secrets = set(secret_names())
    data = _load(path)
    for name in data["services"]:
        for key, value in _env(_resolved(path, name)).items():
            if SECRET_KEY_NAME.search(key) and not key.endswith("_FILE"):  # a path, not a value
                found = SECRET_REFERENCE.fullmatch(str(value))
                assert found and found.group("name") in secrets, (
                    f"{path.name}: {name}.{key} must be a ${{SECRET:?...}} reference"
                )
    for text in _strings(data):
        for url in URL_PASSWORD.finditer(text):
            found = SECRET_REFERENCE.fullmatch(url.group("password"))
            assert found and found.group("name") in secrets, f"{path.name}: password in {text!r}"


# --- network ----------------------------------------------------------------------------


@pytest.mark.parametrize("files", MODELS.values(), ids=MODELS.keys())
def test_nothing_is_published_beyond_loopback(files: tuple[Path, ...]) -> None:
    published = 0
    for name, service in _model(*files).items():
        for port in service.get("ports") or []:
            published += 1
            if isinstance(port, dict):  # long syntax
                assert port.get("host_ip") == LOOPBACK, f"{name}: {port} not on {LOOPBACK}"
            else:
                assert isinstance(port, str), f"{name}: {port!r} publishes on every interface"
                assert port.startswith(f"{LOOPBACK}:"), f"{name}: {port!r} not on {LOOPBACK}"
    assert published


@pytest.mark.parametrize("files", MODELS.values(), ids=MODELS.keys())
def test_services_share_the_net_namespace(files: tuple[Path, ...]) -> None:
    # BIND_HOST is both where services listen and where clients connect (there is no
    # per-service host setting), so the containers share one network namespace.
    services = _model(*files)
    for name, service in services.items():
        if name == "net":
            continue
        assert service.get("network_mode") == "service:net", name
        assert "ports" not in service, f"{name}: publish ports on net, whose namespace it uses"
    assert "BIND_HOST" not in _env(services["airflow-scheduler"])


def test_published_ports_are_the_settings_ports() -> None:
    ports = " ".join(_model(BASE)["net"]["ports"])
    for variable in ("POSTGRES_PORT", "KAFKA_PORT", "MLFLOW_PORT", "AIRFLOW_PORT", "SUPERSET_PORT"):
        assert f"{LOOPBACK}:${{{variable}:-" in ports, variable


# --- the local stack's configuration, repeated ------------------------------------------


def _properties(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def test_kafka_is_configured_as_the_local_broker() -> None:
    template = _properties(PROJECT_ROOT / "infra" / "kafka" / "server.properties.template")
    per_node = ("listener", "quorum", "log.dirs", "process.roles", "node.id")
    env = _env(_model(BASE)["kafka"])
    compared = 0
    for key, value in template.items():
        if any(part in key for part in per_node):
            continue
        variable = "KAFKA_" + key.upper().replace(".", "_")
        assert str(env.get(variable)) == value, f"{variable}: {env.get(variable)!r} != {value!r}"
        compared += 1
    assert compared >= 10
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_scale_runs_three_brokers_with_rf3_and_min_isr2() -> None:
    services = _model(BASE, SCALE)
    brokers = {
        n: _env(s)
        for n, s in services.items()
        if s.get("image", "").startswith("apache/kafka:") and "KAFKA_NODE_ID" in _env(s)
    }
    assert len(brokers) == 3
    assert sorted(int(e["KAFKA_NODE_ID"]) for e in brokers.values()) == [1, 2, 3]
    for name, env in brokers.items():
        assert len(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == 3, name
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3, name
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2, name
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3, name
        assert int(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == 2, name
    consumers = [n for n, s in services.items() if "f1 consume" in " ".join(s.get("command", []))]
    assert len(consumers) >= 2
    members = [
        services[n]["command"][services[n]["command"].index("--member") + 1] for n in consumers
    ]
    assert len(set(members)) == len(members), "each consumer needs a name of its own"
    for name, service in services.items():
        if name.startswith("airflow-") or name in ("platform-init", "dashboards-init"):
            assert _env(service).get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor", name
    workers = [n for n, s in services.items() if s.get("command", [None])[0] == "celery"]
    assert len(workers) >= 2


def test_scale_topics_are_made_with_the_specs_partitions_and_config() -> None:
    script = " ".join(_model(BASE, SCALE)["kafka-topics-init"]["command"])
    defaults = {
        "TELEMETRY_TOPIC": "f1-speed-stream",
        "DEAD_LETTER_TOPIC": "f1-speed-stream-dlq",
        "TELEMETRY_PARTITIONS": "4",
    }
    creates = [line for line in script.splitlines() if "--create" in line]
    specs = topic_specs(_dummy_settings())
    assert len(creates) == len(specs)
    for spec, line in zip(specs, creates, strict=True):
        line = REFERENCE.sub(lambda m: defaults.get(m.group("name") or "", m.group(0)), line)
        assert f"--topic {spec.name} " in line, line
        assert f"--partitions {spec.partitions} " in line, line
        assert "--replication-factor 3 " in line and "min.insync.replicas=2" in line, line
        for key, value in spec.config.items():
            assert f"--config {key}={value}" in line, (key, value, line)


def test_airflow_gets_every_variable_the_local_stack_sets() -> None:
    local = airflow_server.environment(_dummy_settings())
    # LAPS_DIR: the settings' default already resolves inside the image.
    expected = set(local) - {"LAPS_DIR"}
    for name, service in _platform_services(_model(BASE)).items():
        env = _env(service)
        assert expected <= set(env), f"{name} lacks {sorted(expected - set(env))}"
        for key in (
            "AIRFLOW__CORE__EXECUTOR",
            "AIRFLOW__CORE__LOAD_EXAMPLES",
            "AIRFLOW__CORE__AUTH_MANAGER",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL",
        ):
            assert str(env[key]) == local[key], (name, key)
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].endswith(":admin")


def test_fastf1_data_is_mounted_read_only_where_the_settings_look() -> None:
    def in_image(path: Path) -> str:
        return str(IMAGE_PROJECT_ROOT.parent / path.relative_to(PROJECT_ROOT.parent))

    targets = {
        in_image(p) for p in (SAMPLE_FASTF1_CACHE, SAMPLE_FASTF1_LAPS_CACHE, SAMPLE_UDP_RECORDING)
    }
    for files in MODELS.values():
        for name, service in _platform_services(_model(*files)).items():
            binds = [v for v in service.get("volumes", []) if isinstance(v, dict)]
            assert {v["target"] for v in binds} >= targets, name
            for volume in binds:
                assert volume["type"] == "bind" and volume["read_only"] is True, (name, volume)
    # Nothing of the host is mounted writable anywhere: data lives in named volumes.
    for files in MODELS.values():
        for name, service in _model(*files).items():
            for volume in service.get("volumes", []):
                if isinstance(volume, str) and volume.startswith((".", "/")):
                    assert volume.endswith(":ro"), (name, volume)


# --- Dockerfiles ------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_install_from_the_lock(name: str) -> None:
    text = DOCKERFILES[name].read_text()
    commands = re.sub(r"\\\n\s*", " ", text)  # continuation lines joined
    assert re.search(r"^COPY .*\buv\.lock\b", commands, re.M), "uv.lock is not copied in"
    uv_steps = re.findall(r"\buv (?:sync|export)\b[^&\n]*", commands)
    assert uv_steps and all(re.search(r"--(?:frozen|locked)\b", s) for s in uv_steps), uv_steps
    for install in re.findall(r"\bpip install\b[^&\n]*", commands):
        # Packages named in a Dockerfile are constrained to the lock's versions.
        assert "--constraint" in install or " -c " in install, install
    assert not re.search(r"^\s*(?:RUN\s+)?pip install", commands, re.M), "bare pip install"


def test_superset_image_adds_what_the_superset_group_adds() -> None:
    group = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["dependency-groups"]
    names = {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0] for r in group["superset"]}
    text = DOCKERFILES["superset"].read_text()
    for package in names - {"apache-superset"}:
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", text), package


def test_dockerignore_keeps_secrets_and_data_out_of_the_images() -> None:
    lines = [
        line.strip()
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the build context is an allowlist"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not included & {".env", ".stack", "data", ".venv", ".venv-superset", "."}, included
    assert {"pyproject.toml", "uv.lock", "pipeline"} <= included

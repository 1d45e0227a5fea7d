from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.stack import airflow_server

DAG_FILES = sorted((PROJECT_ROOT / "dags").glob("*.py"))


def test_dagbag_imports_cleanly_with_tags(airflow_env: dict[str, str]) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    assert {Path(d.fileloc).name for d in bag.dags.values()} == {p.name for p in DAG_FILES}
    for dag in bag.dags.values():
        assert dag.tags, f"{dag.dag_id} has no tags"
        assert dag.doc_md, f"{dag.dag_id} has no doc_md"
        assert dag.catchup is False


def test_platform_check_dag_runs_against_the_real_stack(
    stack: Settings, airflow_api: httpx.Client
) -> None:
    result = airflow_server.dags_test(stack, "f1_platform_check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = airflow_api.get(
        "/dags/f1_platform_check/dagRuns", params={"order_by": "-start_date", "limit": 1}
    ).json()["dag_runs"]
    assert runs and runs[0]["state"] == "success"
    tis = airflow_api.get(
        f"/dags/f1_platform_check/dagRuns/{runs[0]['dag_run_id']}/taskInstances"
    ).json()["task_instances"]
    assert {t["task_id"]: t["state"] for t in tis} == {
        "kafka_reachable": "success",
        "telemetry_db_reachable": "success",
    }


def test_api_refuses_a_wrong_password(stack: Settings) -> None:
    answer = httpx.post(
        f"{stack.airflow_url}/auth/token",
        json={"username": stack.airflow_admin_user, "password": "not-the-password"},
        timeout=10,
    )
    assert answer.status_code == 401


@pytest.mark.parametrize("component", ["metadatabase", "scheduler", "triggerer", "dag_processor"])
def test_every_component_reports_healthy(stack: Settings, component: str) -> None:
    assert airflow_server.health(stack)[component] == "healthy"


def test_export_dag_records_an_asset_event(stack: Settings, airflow_api: httpx.Client) -> None:
    conf = '{"year": 2024, "event": "Monaco", "session": "R", "formats": ["parquet"]}'
    result = airflow_server.dags_test(stack, "f1_export", "--conf", conf)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = airflow_api.get(
        "/dags/f1_export/dagRuns", params={"order_by": "-start_date", "limit": 1}
    ).json()["dag_runs"][0]
    assert run["state"] == "success"
    asset = airflow_api.get("/assets", params={"name_pattern": "f1_telemetry_exports"}).json()
    events = airflow_api.get(
        "/assets/events",
        params={"asset_id": asset["assets"][0]["id"], "source_run_id": run["dag_run_id"]},
    ).json()["asset_events"]
    assert [e["extra"]["key"] for e in events] == ["2024_Monaco_R"]
    assert events[0]["extra"]["rows"] == 907_080

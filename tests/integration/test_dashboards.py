"""The dashboards kept as code, against the real Superset and PostgreSQL.

A slice of the demo race is replayed first (scratch topics, unpaced, a toy pit stop
champion and challenger of the test's own served; the other models have none, so their
probabilities are NULL but the rows exist), and its matured laps are scored live, so the
demo session's latest replay has data. Then: importing twice changes nothing, every
chart answers rows for the demo session, every dashboard renders in headless Chromium
with no chart in an error state, the reader role reads every view.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from psycopg import sql

from pipeline.dashboards import bundle, screenshots
from pipeline.kafka.consumer import StreamConsumer
from pipeline.kafka.producer import produce_session
from pipeline.kafka.topics import scratch_topics
from pipeline.ml import live_scores
from pipeline.ml.registry import scratch_models
from pipeline.settings import Settings
from tests.integration.streams import register_toy_champion

CHART_FILES = sorted(p.name for p in (bundle.BUNDLE_DIR / "charts").glob("*.yaml"))
DATASET_FILES = sorted((bundle.BUNDLE_DIR / "datasets").rglob("*.yaml"))
NO_SESSION_VIEWS = bundle.NO_SESSION_VIEWS


def _yaml(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def _no_session(chart_file: str) -> bool:
    dataset_uuid = _yaml(bundle.BUNDLE_DIR / "charts" / chart_file)["dataset_uuid"]
    dataset = next(d for d in map(_yaml, DATASET_FILES) if d["uuid"] == dataset_uuid)
    return dataset["table_name"] in NO_SESSION_VIEWS


SESSION_CHARTS = [f for f in CHART_FILES if not _no_session(f)]
NO_SESSION_CHARTS = [f for f in CHART_FILES if _no_session(f)]


def test_session_charts_are_what_the_dashboards_check_asks() -> None:
    # `f1 dashboards check` and the UDP test ask these for a session's rows.
    uuids = [_yaml(bundle.BUNDLE_DIR / "charts" / f)["uuid"] for f in SESSION_CHARTS]
    assert sorted(uuids) == sorted(bundle.session_chart_uuids())
    assert len(uuids) == len(CHART_FILES) - len(NO_SESSION_CHARTS) > 0


@pytest.fixture(scope="module")
def replayed(stack: Settings, race_export: Path) -> Iterator[str]:
    """90 s of the demo race from about lap 22, stored: the demo session's latest run
    while this module runs (scratch_topics deletes its rows at the end). Served by toy
    pit stop models of the test's own (v2 champion, v1 challenger in shadow, never the
    demo's), then scored live as a finished run is: the laps the cars completed."""
    import mlflow

    from pipeline.ml.train import CHALLENGER, registered_name

    folder = stack.export_dir / stack.demo_session  # race_export: made here in a fresh clone
    run = f"dash-{uuid.uuid4().hex[:6]}"
    with scratch_topics(stack, "dash") as scratch, scratch_models(scratch, "dash") as models:
        register_toy_champion(models)
        register_toy_champion(models)  # v2 is the champion now
        mlflow.MlflowClient(models.mlflow_tracking_uri).set_registered_model_alias(
            registered_name("pit_stop", models), CHALLENGER, "1"
        )
        produce_session(
            folder, speed=None, run_id=run, start_offset_s=5400, duration_s=90, settings=models
        )
        report = StreamConsumer("dash-test", settings=models).run(until_run=run, idle_timeout_s=60)
        assert report.stop_reason == f"run {run} complete" and report.samples > 0
        scores = live_scores.score_run(run, models)  # needs the versions: inside scratch_models
        assert {(s["label"], s["role"], s["version"]) for s in scores} == {
            ("pit_stop", "champion", 2),
            ("pit_stop", "challenger", 1),
        }, "no lap of the replay matured, or a model was not served"
        with psycopg.connect(stack.postgres_url("telemetry_reader")) as conn:
            latest = conn.execute(
                "SELECT run_id FROM dash_latest_runs WHERE session_key = %s",
                (stack.demo_session,),
            ).fetchone()
        assert latest == (run,), "another replay of the demo session started meanwhile"
        yield run


@pytest.fixture(scope="module")
def imported(stack: Settings, replayed: str) -> bundle.ImportReport:
    return bundle.import_bundle(stack)


@pytest.fixture(scope="module")
def api(stack: Settings) -> Iterator[httpx.Client]:
    with bundle.api_client(stack) as client:
        yield client


def _inventory(api: httpx.Client) -> dict[str, dict[str, int]]:
    """uuid -> id of every chart, dataset, dashboard and database in Superset."""
    found = {}
    for kind in ("chart", "dataset", "dashboard", "database"):
        answer = api.get(f"/api/v1/{kind}/", params={"q": "(columns:!(id,uuid),page_size:100)"})
        answer.raise_for_status()
        assert answer.json()["count"] <= 100  # one page holds them all
        found[kind] = {r["uuid"]: r["id"] for r in answer.json()["result"]}
    return found


def test_importing_twice_changes_no_id_and_duplicates_nothing(
    stack: Settings, imported: bundle.ImportReport, api: httpx.Client
) -> None:
    before = _inventory(api)
    again = bundle.import_bundle(stack)
    assert _inventory(api) == before
    assert again.dashboards == imported.dashboards and not again.deleted_charts
    assert {d.slug for d in imported.dashboards} == {
        "race-telemetry", "predictions", "anomalies", "pipeline-health"
    }  # fmt: skip
    for dashboard in imported.dashboards:
        config = _yaml(bundle.BUNDLE_DIR / "dashboards" / f"{dashboard.slug}.yaml")
        assert dashboard.charts == len(bundle.chart_nodes(config))
        metadata = json.loads(
            api.get(f"/api/v1/dashboard/{dashboard.id}").json()["result"]["json_metadata"]
        )
        assert metadata["refresh_frequency"] == 10
        session = next(f for f in metadata["native_filter_configuration"] if f["name"] == "Session")
        assert session["defaultDataMask"]["filterState"]["value"] == [stack.demo_session]


def test_a_chart_that_left_the_bundle_is_deleted(
    stack: Settings, imported: bundle.ImportReport, api: httpx.Client, tmp_path: Path
) -> None:
    # A copy of the bundle with one more chart on a dashboard, imported, then the real one.
    folder = tmp_path / "bundle"
    shutil.copytree(bundle.BUNDLE_DIR, folder)
    extra = _yaml(folder / "charts" / "anom-count.yaml")
    extra |= {"uuid": str(uuid.uuid4()), "slice_name": "scratch chart"}
    (folder / "charts" / "scratch.yaml").write_text(yaml.safe_dump(extra))
    dashboard = _yaml(folder / "dashboards" / "anomalies.yaml")
    node = dict(dashboard["position"]["CHART-anom-count"])
    node["meta"] = {**node["meta"], "uuid": extra["uuid"], "chartId": 999}
    dashboard["position"]["CHART-scratch"] = {**node, "id": "CHART-scratch"}
    dashboard["position"][node["parents"][-1]]["children"].append("CHART-scratch")
    (folder / "dashboards" / "anomalies.yaml").write_text(yaml.safe_dump(dashboard))

    with_extra = bundle.import_bundle(stack, folder)
    assert extra["uuid"] in _inventory(api)["chart"]
    restored = bundle.import_bundle(stack)
    assert restored.deleted_charts == ["scratch chart"]
    assert extra["uuid"] not in _inventory(api)["chart"]
    assert restored.dashboards == imported.dashboards
    assert [d.charts for d in with_extra.dashboards if d.slug == "anomalies"] == [
        next(d.charts for d in imported.dashboards if d.slug == "anomalies") + 1
    ]


@pytest.mark.parametrize("chart_file", SESSION_CHARTS)
def test_every_chart_answers_rows_for_the_demo_session(
    stack: Settings, imported: bundle.ImportReport, api: httpx.Client, chart_file: str
) -> None:
    chart_uuid = _yaml(bundle.BUNDLE_DIR / "charts" / chart_file)["uuid"]
    result = bundle.chart_data(api, stack, chart_uuid, stack.demo_session)
    assert result["rowcount"] >= 1
    # The column the Session filter targets exists in the chart's dataset.
    assert {"column": "session_key"} in result["applied_filters"]


@pytest.mark.parametrize("chart_file", NO_SESSION_CHARTS)
def test_a_chart_of_no_session_runs_and_no_native_filter_reaches_it(
    stack: Settings, imported: bundle.ImportReport, api: httpx.Client, chart_file: str
) -> None:
    """The scaling charts: their saved query runs and answers a row per point of the
    view (none until a complete experiment is stored), and each native filter of their
    dashboard excludes them from its scope (chart ids remapped on import)."""
    chart = _yaml(bundle.BUNDLE_DIR / "charts" / chart_file)
    result = bundle.chart_data(api, stack, chart["uuid"], stack.demo_session)
    assert result["status"] == "success"
    assert {"column": "session_key", "reason": "not_in_datasource"} in result["rejected_filters"]
    dataset = next(d for d in map(_yaml, DATASET_FILES) if d["uuid"] == chart["dataset_uuid"])
    x_axis, series = chart["params"]["x_axis"], chart["params"]["groupby"]
    with psycopg.connect(stack.postgres_url("telemetry_reader"), autocommit=True) as conn:
        points = conn.execute(
            sql.SQL("SELECT count(DISTINCT ({})) FROM {}").format(
                sql.SQL(", ").join(map(sql.Identifier, [x_axis, *series])),
                sql.Identifier(dataset["schema"], dataset["table_name"]),
            )
        ).fetchone()
    assert points is not None and result["rowcount"] == points[0]
    chart_id = api.get(f"/api/v1/chart/{chart['uuid']}").json()["result"]["id"]
    on = [
        d for d in imported.dashboards
        if any(n["meta"]["uuid"] == chart["uuid"] for n in bundle.chart_nodes(
            _yaml(bundle.BUNDLE_DIR / "dashboards" / f"{d.slug}.yaml")))
    ]  # fmt: skip
    assert on
    for dashboard in on:
        metadata = json.loads(
            api.get(f"/api/v1/dashboard/{dashboard.id}").json()["result"]["json_metadata"]
        )
        for native in metadata["native_filter_configuration"]:
            assert chart_id in native["scope"]["excluded"], (dashboard.slug, native["name"])


def test_every_dashboard_renders_with_no_chart_in_error(
    stack: Settings, imported: bundle.ImportReport
) -> None:
    shots = screenshots.take(stack, stack.stack_dir / "screenshots")
    assert [s.slug for s in shots] == sorted(d.slug for d in imported.dashboards)
    for shot, dashboard in zip(
        shots, sorted(imported.dashboards, key=lambda d: d.slug), strict=True
    ):
        assert shot.charts == dashboard.charts, shot.slug
        assert shot.errors == {}, shot.slug
        assert shot.path.read_bytes().startswith(b"\x89PNG")


def test_a_chart_in_error_is_reported(
    stack: Settings, imported: bundle.ImportReport, api: httpx.Client
) -> None:
    """The screenshots' error detection sees Superset 6.1's error alert (a scratch
    dashboard with a chart whose query fails)."""
    dataset = _yaml(bundle.BUNDLE_DIR / "datasets" / "telemetry" / "dash_anomalies.yaml")
    dataset_id = api.get(f"/api/v1/dataset/{dataset['uuid']}").json()["result"]["id"]
    metric = {"expressionType": "SQL", "sqlExpression": "SUM(no_such_column)", "label": "x"}
    chart = bundle.call(api, stack, "POST", "/api/v1/chart/", json={
        "slice_name": "scratch broken", "viz_type": "big_number_total",
        "datasource_id": dataset_id, "datasource_type": "table",
        "params": json.dumps({"viz_type": "big_number_total", "metric": metric}),
    })["id"]  # fmt: skip
    slug = f"scratch-{uuid.uuid4().hex[:6]}"
    position = {
        "ROOT_ID": {"type": "ROOT", "id": "ROOT_ID", "children": ["GRID_ID"]},
        "GRID_ID": {"type": "GRID", "id": "GRID_ID", "children": ["ROW-1"],
                    "parents": ["ROOT_ID"]},
        "ROW-1": {"type": "ROW", "id": "ROW-1", "children": ["CHART-1"],
                  "parents": ["ROOT_ID", "GRID_ID"], "meta": {}},
        "CHART-1": {"type": "CHART", "id": "CHART-1", "children": [],
                    "parents": ["ROOT_ID", "GRID_ID", "ROW-1"],
                    "meta": {"width": 6, "height": 40, "chartId": chart}},
    }  # fmt: skip
    dashboard = bundle.call(api, stack, "POST", "/api/v1/dashboard/", json={
        "dashboard_title": "scratch", "slug": slug, "position_json": json.dumps(position),
    })["id"]  # fmt: skip
    try:
        bundle.call(api, stack, "PUT", f"/api/v1/chart/{chart}", json={"dashboards": [dashboard]})
        [shot] = screenshots.take(stack, stack.stack_dir / "screenshots", [(slug, "scratch")])
    finally:
        bundle.call(api, stack, "DELETE", f"/api/v1/dashboard/{dashboard}")
        bundle.call(api, stack, "DELETE", f"/api/v1/chart/{chart}")
        (stack.stack_dir / "screenshots" / f"dashboard-{slug}.png").unlink(missing_ok=True)
    assert shot.charts == 1
    assert 'column "no_such_column" does not exist' in shot.errors["scratch broken"]


@pytest.mark.parametrize("dataset_file", DATASET_FILES, ids=lambda p: p.stem)
def test_the_reader_role_selects_every_view(
    stack: Settings, replayed: str, dataset_file: Path
) -> None:
    dataset = _yaml(dataset_file)
    columns = [c["column_name"] for c in dataset["columns"]]
    select = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.Identifier(dataset["schema"], dataset["table_name"]),
    )
    if dataset["table_name"] in NO_SESSION_VIEWS:
        # No session_key, and no rows until a complete experiment is stored: the
        # reader role may select it.
        with psycopg.connect(stack.postgres_url("telemetry_reader"), autocommit=True) as conn:
            conn.execute(select + sql.SQL(" LIMIT 1")).fetchall()
        return
    assert "session_key" in columns  # what the Session filter targets
    with psycopg.connect(stack.postgres_url("telemetry_reader"), autocommit=True) as conn:
        query = select + sql.SQL(" WHERE session_key = %s LIMIT 1")
        row = conn.execute(query, (stack.demo_session,)).fetchone()
    assert row is not None


def test_every_dataset_lists_its_view_columns_in_order(stack: Settings, replayed: str) -> None:
    """Import does not read a view's columns: a chart can only use the ones its
    dataset lists, so every column the view has (appended ones too) is listed."""
    datasets = [_yaml(path) for path in DATASET_FILES]
    listed = {d["table_name"]: [c["column_name"] for c in d["columns"]] for d in datasets}
    with psycopg.connect(stack.postgres_url("telemetry_reader"), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = ANY(%s) "
            "ORDER BY table_name, ordinal_position",
            (list(listed),),
        ).fetchall()
    in_views: dict[str, list[str]] = {}
    for table, column in rows:
        in_views.setdefault(table, []).append(column)
    assert in_views == listed


def test_the_live_score_charts_show_what_was_scored(
    stack: Settings, imported: bundle.ImportReport, api: httpx.Client, replayed: str
) -> None:
    """Both roles of the toy pit stop model, as `live_model_scores` holds them."""
    with psycopg.connect(stack.postgres_url("telemetry_reader"), autocommit=True) as conn:
        stored = conn.execute(
            "SELECT label, role, version, laps, alerts, alert_hits FROM live_model_scores "
            "WHERE run_id = %s",
            (replayed,),
        ).fetchall()
    table, alerts = (
        bundle.chart_data(api, stack, _yaml(bundle.BUNDLE_DIR / "charts" / name)["uuid"],
                          stack.demo_session)["data"]
        for name in ("pred-live-scores.yaml", "pred-alerts.yaml")
    )  # fmt: skip
    assert sorted((r["label"], r["role"], r["version"], r["laps"]) for r in table) == sorted(
        s[:4] for s in stored
    )
    assert [r["role"] for r in table] == ["champion", "challenger"]  # champion first
    assert sorted((r["model"], r["alerts"], r["alert hits"]) for r in alerts) == sorted(
        (f"{label} v{version} ({role})", n, hits) for label, role, version, _, n, hits in stored
    )

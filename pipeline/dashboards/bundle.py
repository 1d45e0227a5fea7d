"""Import the dashboards kept as code in `superset/bundle/` into the running Superset.

The bundle is Superset's own export layout (`metadata.yaml`, `databases/`, `datasets/`,
`charts/`, `dashboards/`), linked by fixed UUIDs, so a dashboard exported from the UI
can be dropped back in. Three things come from the settings, not the files: the
database URI's host and port (the reader role; its password travels only in the
request's `passwords` field, never to disk), the Session filter's default
(`demo_session`), and each chart's `query_context` where the file has none.
`POST /api/v1/assets/import/` overwrites by UUID, so a second import changes nothing.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.stack import superset_server

BUNDLE_DIR = PROJECT_ROOT / "superset" / "bundle"
MASKED_PASSWORD = "XXXXXXXXXX"  # how Superset writes a password into exported URIs
ZIP_ROOT = "f1_dashboards"  # the importer wants exactly one top-level folder

Config = dict[str, Any]


class BundleError(ValueError):
    """The bundle's files do not fit together (a missing or duplicated UUID)."""


class SupersetError(RuntimeError):
    """Superset is down or refused a call; the message says where to look."""


def _kind(path: str) -> str:
    return path.split("/", 1)[0]  # databases, datasets, charts, dashboards


def load_bundle(settings: Settings, folder: Path = BUNDLE_DIR) -> dict[str, Config]:
    """The bundle's files by their path in the bundle (`charts/x.yaml`), ready to
    import: URI, Session default and missing query contexts filled in."""
    files = {
        path.relative_to(folder).as_posix(): yaml.safe_load(path.read_text())
        for path in sorted(folder.rglob("*.yaml"))
    }
    if "metadata.yaml" not in files:
        raise BundleError(f"{folder}: no metadata.yaml, not a Superset bundle")
    check_links(files)
    for path, config in files.items():
        kind = _kind(path)
        if kind == "databases" and config["database_name"] == superset_server.TELEMETRY_DATABASE:
            config["sqlalchemy_uri"] = masked_reader_uri(settings)
        elif kind == "charts" and not config.get("query_context"):
            config["query_context"] = json.dumps(query_context(config["params"]))
        elif kind == "dashboards":
            prepare_filters(config, settings.demo_session)
    return files


def chart_nodes(dashboard: Config) -> list[Config]:
    position = dashboard.get("position") or {}
    return [n for n in position.values() if isinstance(n, dict) and n.get("type") == "CHART"]


def _native_filters(dashboard: Config) -> list[Config]:
    return list((dashboard.get("metadata") or {}).get("native_filter_configuration") or [])


def check_links(files: dict[str, Config]) -> None:
    """Every UUID once per kind and every link resolvable: Superset reports either
    problem as an opaque 500 or, for a chart missing from the bundle, silently drops
    the rest of the dashboard's charts."""
    uuids: dict[str, dict[str, str]] = {}  # kind -> uuid -> path
    for path, config in files.items():
        if path == "metadata.yaml":
            continue
        seen = uuids.setdefault(_kind(path), {})
        uuid = str(config["uuid"])
        if uuid in seen:
            raise BundleError(
                f"{path} and {seen[uuid]} have the same uuid {uuid}: keep one "
                "(a re-exported file replaces the old one)"
            )
        seen[uuid] = path
    problems = []
    for path, config in files.items():
        needs: list[tuple[str, Any]] = []
        if _kind(path) == "datasets":
            needs = [("databases", config["database_uuid"])]
        elif _kind(path) == "charts":
            needs = [("datasets", config["dataset_uuid"])]
        elif _kind(path) == "dashboards":
            needs = [("charts", node["meta"].get("uuid")) for node in chart_nodes(config)]
            needs += [
                ("datasets", target["datasetUuid"])
                for native in _native_filters(config)
                for target in native.get("targets", [])
                if "datasetUuid" in target
            ]
        problems += [
            f"{path}: no {kind} file with uuid {uuid}"
            for kind, uuid in needs
            if str(uuid) not in uuids.get(kind, {})
        ]
    if problems:
        raise BundleError("the bundle's links are broken:\n  " + "\n  ".join(problems))


def masked_reader_uri(settings: Settings) -> str:
    """The reader role's URI from the settings, password masked as in an export."""
    url = urlsplit(settings.postgres_url("telemetry_reader", driver="psycopg2"))
    netloc = f"{url.username}:{MASKED_PASSWORD}@{url.hostname}:{url.port}"
    return url._replace(netloc=netloc).geturl()


def prepare_filters(dashboard: Config, session: str) -> None:
    """Session filter default from the settings; drop `chartsInScope`, which holds
    chart ids of the exporting install and is not remapped on import (the UI
    derives it from `scope`)."""
    metadata = dashboard.get("metadata") or {}
    (metadata.get("global_chart_configuration") or {}).pop("chartsInScope", None)
    for native in _native_filters(dashboard):
        native.pop("chartsInScope", None)
        columns = [t.get("column", {}).get("name") for t in native.get("targets", [])]
        if columns == ["session_key"]:
            native["defaultDataMask"] = {
                "extraFormData": {
                    "filters": [{"col": "session_key", "op": "IN", "val": [session]}]
                },
                "filterState": {"value": [session], "label": session},
                "ownState": {},
            }


def query_context(params: Config) -> Config:
    """The saved query a chart's data API runs (`/api/v1/chart/{id}/data/`, reports,
    cache warm-up), built from `params` the way the frontend's buildQuery does for the
    viz types of this bundle: table (raw and aggregate), echarts_timeseries_line/_bar
    (time or category x axis) and big_number_total. Dashboards do not use it: the
    browser builds its query from `params`. The datasource id is a placeholder that
    the import rewrites."""
    viz = params["viz_type"]
    metrics = list(params.get("metrics") or [])
    query: Config = {"row_limit": params.get("row_limit", 10000), **_filters(params)}
    if viz == "table" and params.get("query_mode") == "raw":
        query["columns"] = params["all_columns"]
        query["orderby"] = [json.loads(o) for o in params.get("order_by_cols", [])]
    elif viz == "table":
        query["columns"] = params.get("groupby", [])
        query["metrics"] = metrics
        query["orderby"] = [[metrics[0], not params.get("order_desc", True)]] if metrics else []
    elif viz.startswith("echarts_timeseries"):
        x_axis = params["x_axis"]
        axis: Config = {
            "columnType": "BASE_AXIS", "expressionType": "SQL",
            "sqlExpression": x_axis, "label": x_axis,
        }  # fmt: skip
        if params.get("time_grain_sqla"):  # a time axis; a category axis has no grain
            axis["timeGrain"] = params["time_grain_sqla"]
            query["orderby"] = [[x_axis, True]]
        else:
            query["orderby"] = [[metrics[0], False]]
        query["columns"] = [axis, *params.get("groupby", [])]
        query["metrics"] = metrics
    elif viz == "big_number_total":
        query["metrics"] = [params["metric"]]
    else:
        raise BundleError(f"no query_context builder for viz_type {viz}: export the chart from "
                          "the UI after saving it, its YAML then carries one")  # fmt: skip
    return {
        "datasource": {"id": 0, "type": "table"},
        "force": False,
        "queries": [query],
        "form_data": params,
        "result_format": "json",
        "result_type": "full",
    }


def _filters(params: Config) -> Config:
    """Adhoc filters: simple ones as query filters, SQL ones as a WHERE clause."""
    simple, where = [], []
    for f in params.get("adhoc_filters") or []:
        if f.get("operator") == "TEMPORAL_RANGE":
            continue  # "No filter" time ranges: nothing to apply
        if f.get("expressionType") == "SQL":
            where.append(f"({f['sqlExpression']})")
        else:
            simple.append({"col": f["subject"], "op": f["operator"], "val": f.get("comparator")})
    return {"filters": simple, "extras": {"where": " AND ".join(where)} if where else {}}


def zip_bundle(files: dict[str, Config]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, config in files.items():
            archive.writestr(f"{ZIP_ROOT}/{path}", yaml.safe_dump(config, sort_keys=False))
    return buffer.getvalue()


# --- the REST side ---------------------------------------------------------------------
def superset_log_hint(settings: Settings) -> str:
    return f"Superset's log: {settings.log_dir / 'superset.log'}"


def call(client: httpx.Client, settings: Settings, method: str, path: str, **kw: Any) -> Any:
    """One API call; any failure becomes a SupersetError naming the call and the log."""
    try:
        answer = client.request(method, path, **kw)
    except httpx.TransportError as err:
        raise SupersetError(
            f"Superset is not reachable at {settings.superset_url} ({err}); start it with "
            f"`f1 stack up`. {superset_log_hint(settings)}"
        ) from err
    if answer.is_error:
        raise SupersetError(
            f"Superset answered {answer.status_code} to {method} {path}: "
            f"{answer.text[:800]}\n{superset_log_hint(settings)}"
        )
    return answer.json() if answer.content else None


@contextmanager
def api_client(settings: Settings) -> Iterator[httpx.Client]:
    """A client logged in as the admin from `.env`, with the CSRF token (and its
    session cookie) that write calls need."""
    with httpx.Client(
        base_url=settings.superset_url,
        timeout=120,
        headers={"Accept": "application/json", "Referer": settings.superset_url},
    ) as client:
        try:
            token = superset_server.login(settings, client)
        except httpx.TransportError as err:
            raise SupersetError(
                f"Superset is not reachable at {settings.superset_url} ({err}); start it "
                f"with `f1 stack up`. {superset_log_hint(settings)}"
            ) from err
        except httpx.HTTPStatusError as err:
            raise SupersetError(
                f"Superset refused the admin login ({err.response.status_code}): check "
                f"SUPERSET_ADMIN_USER/PASSWORD in .env. {superset_log_hint(settings)}"
            ) from err
        client.headers["Authorization"] = f"Bearer {token}"
        csrf = call(client, settings, "GET", "/api/v1/security/csrf_token/")
        client.headers["X-CSRFToken"] = csrf["result"]
        yield client


@dataclass(frozen=True)
class ImportedDashboard:
    title: str
    slug: str
    id: int
    url: str
    charts: int


@dataclass(frozen=True)
class ImportReport:
    dashboards: list[ImportedDashboard]
    deleted_charts: list[str]  # charts that left the bundle, removed from Superset
    seconds: float


def _charts_of(client: httpx.Client, settings: Settings, dashboard_id: int) -> dict[int, Config]:
    q = (
        f"(columns:!(id,uuid,slice_name),filters:!((col:dashboards,opr:rel_m_m,"
        f"value:{dashboard_id})),page_size:100)"
    )
    found = call(client, settings, "GET", "/api/v1/chart/", params={"q": q})["result"]
    return {int(c["id"]): c for c in found}


def _existing_dashboard_ids(
    client: httpx.Client, settings: Settings, uuids: list[str]
) -> dict[str, int]:
    ids = {}
    for uuid in uuids:
        answer = client.get(f"/api/v1/dashboard/{uuid}")
        if answer.status_code == 200:
            ids[uuid] = int(answer.json()["result"]["id"])
    return ids


def import_bundle(
    settings: Settings, folder: Path = BUNDLE_DIR, *, delete_stale_charts: bool = True
) -> ImportReport:
    """Import the bundle (idempotent). With `delete_stale_charts`, a chart that was on
    one of the bundle's dashboards, is not in the bundle and is left on no dashboard
    after the import is deleted; charts anywhere else are never touched."""
    started = time.perf_counter()
    files = load_bundle(settings, folder)
    dashboards = {str(c["uuid"]): c for p, c in files.items() if _kind(p) == "dashboards"}
    bundle_charts = {str(c["uuid"]) for p, c in files.items() if _kind(p) == "charts"}
    password = settings.telemetry_reader_password.get_secret_value()
    with api_client(settings) as client:
        before: dict[int, Config] = {}
        if delete_stale_charts:
            for dashboard_id in _existing_dashboard_ids(
                client, settings, list(dashboards)
            ).values():
                before |= _charts_of(client, settings, dashboard_id)
        call(
            client, settings, "POST", "/api/v1/assets/import/",
            files={"bundle": (f"{ZIP_ROOT}.zip", zip_bundle(files), "application/zip")},
            data={"passwords": json.dumps(
                {path: password for path in files if _kind(path) == "databases"}
            )},
        )  # fmt: skip
        deleted = []
        for chart_id, chart in before.items():
            if chart["uuid"] in bundle_charts:
                continue
            still_on = call(client, settings, "GET", f"/api/v1/chart/{chart_id}")["result"]
            if not still_on.get("dashboards"):
                call(client, settings, "DELETE", f"/api/v1/chart/{chart_id}")
                deleted.append(chart["slice_name"])
        imported = []
        for uuid in dashboards:
            found = call(client, settings, "GET", f"/api/v1/dashboard/{uuid}")["result"]
            imported.append(
                ImportedDashboard(
                    title=found["dashboard_title"],
                    slug=found["slug"],
                    id=int(found["id"]),
                    url=f"{settings.superset_url}{found['url']}",
                    charts=len(_charts_of(client, settings, int(found["id"]))),
                )
            )
    return ImportReport(imported, deleted, time.perf_counter() - started)


def chart_data(client: httpx.Client, settings: Settings, chart_uuid: str, session: str) -> Config:
    """What a chart's saved query answers for one session, through the chart data API
    (the path of reports and cache warm-up): the first query's result."""
    chart = call(client, settings, "GET", f"/api/v1/chart/{chart_uuid}")["result"]
    context = json.loads(chart["query_context"])
    for query in context["queries"]:
        query["filters"] = [
            *query.get("filters", []),
            {"col": "session_key", "op": "==", "val": session},
        ]
    result: Config = call(client, settings, "POST", "/api/v1/chart/data", json=context)["result"][0]
    return {"slice_name": chart["slice_name"], **result}


def bundle_chart_uuids(folder: Path = BUNDLE_DIR) -> list[str]:
    return [
        str(yaml.safe_load(path.read_text())["uuid"])
        for path in sorted(folder.glob("charts/*.yaml"))
    ]


# Views that are no session's replay, so have no session_key: the latest scaling
# experiment. Their charts are left out of every native filter's scope.
NO_SESSION_VIEWS = frozenset({"dash_scaling_latest"})


def session_chart_uuids(folder: Path = BUNDLE_DIR) -> list[str]:
    """The charts that show one session (every chart but those on NO_SESSION_VIEWS)."""
    tables = {
        config["uuid"]: config["table_name"]
        for config in map(yaml.safe_load, map(Path.read_text, folder.glob("datasets/**/*.yaml")))
    }
    charts = [yaml.safe_load(path.read_text()) for path in sorted(folder.glob("charts/*.yaml"))]
    return [
        str(chart["uuid"])
        for chart in charts
        if tables.get(chart["dataset_uuid"]) not in NO_SESSION_VIEWS
    ]

"""The demo `make up` ends with: a replay of the demo race through the f1_stream
DAG, triggered in Airflow so the user watches it there, in Superset and on
the live page; the f1_udp_live DAG listening for the F1 game, so a game
pointed at it shows up in the same places; and, when the models are not
trained yet, f1_train on every race, whose champions swap into the running
demo as they are registered. Nothing new starts if a run of one is already
under way."""

from __future__ import annotations

import time
from typing import Any

from pipeline.settings import Settings
from pipeline.sources.replay import race_start_offset_s
from pipeline.stack import airflow_server

STREAM_DAG = "f1_stream"
UDP_DAG = "f1_udp_live"
TRAIN_DAG = "f1_train"
UDP_LISTEN_S = 24 * 3600  # the DAG's longest listen; trigger it again after a day
LEAD_IN_S = 30.0  # the demo starts this long before lights out (the grid, then the start)


def start_demo(settings: Settings, *, wait_s: float = 180.0) -> dict[str, Any]:
    """Unpause f1_stream and trigger it with the demo settings, unless a run is
    queued or running. Returns the run (existing or new). The replay starts just
    before the race start, not an hour earlier with the session clock."""
    start_offset_s = max(
        0.0, race_start_offset_s(settings.export_dir / settings.demo_session) - LEAD_IN_S
    )
    conf = {
        "session": settings.demo_session,
        "speed": settings.demo_speed,
        "consumers": settings.demo_consumers,
        "start_offset_s": round(start_offset_s, 3),
    }
    with airflow_server.api_client(settings) as api:
        return _trigger(api, STREAM_DAG, conf, "demo replay started by make up", wait_s)


def start_udp_live(settings: Settings, *, wait_s: float = 180.0) -> dict[str, Any]:
    """Unpause f1_udp_live and start it listening on UDP_ADDRESS for a day,
    unless it already is. Returns the run (existing or new)."""
    conf = {"address": settings.udp_address, "duration_s": UDP_LISTEN_S}
    with airflow_server.api_client(settings) as api:
        return _trigger(api, UDP_DAG, conf, "listening for the F1 game, started by make up", wait_s)


def start_training(settings: Settings, *, wait_s: float = 180.0) -> dict[str, Any] | None:
    """Trigger f1_train (every race, its default split) when a model has no champion
    the stream can serve; None when they all have one. It runs beside the demo in
    Airflow (one model after another; `f1 train` took 15 minutes on 2 cores): the
    consumers follow the `champion`
    aliases, so the new models swap in as each finishes."""
    from pipeline.ml.train import needs_training

    if not needs_training(settings):
        return None
    with airflow_server.api_client(settings) as api:
        return _trigger(
            api, TRAIN_DAG, {}, "models trained on every race, started by make up", wait_s
        )


def _trigger(
    api: Any, dag_id: str, conf: dict[str, Any], note: str, wait_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    # On a fresh machine the dag-processor needs a moment to parse the DAGs.
    while api.get(f"/dags/{dag_id}").status_code == 404:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Airflow has not loaded {dag_id} after {wait_s:.0f} s; see the "
                "airflow-dag-processor log in LOG_DIR"
            )
        time.sleep(2)
    api.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    active = api.get(f"/dags/{dag_id}/dagRuns", params={"state": ["queued", "running"]}).json()[
        "dag_runs"
    ]
    if active:
        return {**active[0], "already_running": True}
    answer = api.post(
        f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "note": note, "conf": conf}
    )
    answer.raise_for_status()
    return {**answer.json(), "already_running": False}

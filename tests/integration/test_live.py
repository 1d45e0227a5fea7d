"""The live page: the Airflow plugin on the real api-server, fed by a real replay
through Kafka and the consumer's NOTIFY, watched in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pipeline.bench import live_bench
from pipeline.settings import Settings
from pipeline.stack import airflow_server

ROUTES = ("/f1/live", "/f1/events", "/f1/stats")
# Updates of the test's replay the page must receive (it sends hundreds at 5x).
MIN_UPDATES = 20


def test_the_plugin_mounts_the_page_and_adds_a_navigation_entry(
    airflow_api: httpx.Client,
) -> None:
    plugins = {p["name"]: p for p in airflow_api.get("/plugins").json()["plugins"]}
    live = plugins["f1_live"]
    assert [a["url_prefix"] for a in live["fastapi_apps"]] == ["/f1"]
    (view,) = live["external_views"]
    assert (view["href"], view["destination"]) == ("f1/live", "nav")


@pytest.mark.parametrize("route", ROUTES)
def test_the_live_page_refuses_callers_without_valid_credentials(
    stack: Settings, route: str
) -> None:
    url = f"{stack.airflow_url}{route}"
    anonymous = httpx.get(url, headers={"Accept": "text/html"})
    assert anonymous.status_code == 401
    assert "/auth/login" in anonymous.text  # a browser is told where to sign in
    forged = httpx.get(url, cookies={"_token": "not-a-jwt"})
    assert forged.status_code == 403
    signed = httpx.get(
        f"{stack.airflow_url}/f1/stats",
        headers={"Authorization": f"Bearer {airflow_server.access_token(stack)}"},
    )
    assert signed.status_code == 200


def test_a_replay_reaches_the_browser_and_every_update_is_drawn(
    stack: Settings, race_export: Path
) -> None:
    # 5x with the demo's two consumers: real car data comes in ~3.8 bursts a second
    # and each consumer commits a burst as one update (pipeline/bench/live_bench.py).
    # No rate is asserted (it depends on the machine's load): the page is watched until
    # the replay is over and it has received enough of its updates and drawn the last.
    live = live_bench.run(
        stack,
        race_export,
        seconds=10,
        speed=5.0,
        consumers=2,
        screenshot=stack.stack_dir / "screenshots" / "live.png",
        min_updates=MIN_UPDATES,
        timeout_s=300,
    )
    figures = live_bench.figures(live)
    print("live page:", figures, "updates of the replay:", live.run_updates)
    watched, produced = live.watched, live.produced
    assert produced.delivered > 0 and sum(r["samples"] for r in live.consumed) == produced.delivered
    assert live.run_updates is not None and live.run_updates >= MIN_UPDATES, figures
    assert live.run_updates_drawn, f"the page did not draw the replay's last update: {figures}"
    assert watched.renders_with_cars > 0, figures
    # Every update was timed, and commit happens before the browser has it.
    assert len(watched.latencies_ms) == watched.events
    assert min(watched.latencies_ms) > 0
    # The page shows the cars the consumer stored, with their numbers.
    assert watched.cars_shown == live.cars_stored == 20
    _position, car, lap, speed = watched.first_row[:4]
    assert car.split()[0].isalpha() and lap.isdigit() and speed.isdigit()
    assert watched.screenshot is not None and watched.screenshot.stat().st_size > 10_000

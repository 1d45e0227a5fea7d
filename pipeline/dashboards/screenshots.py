"""Screenshots of the bundle's dashboards in headless Chromium (Debian's, driven by
Playwright), and what a viewer would see wrong: charts in an error state.

Superset's own screenshots need Celery and the THUMBNAILS flag, which this stack
leaves off. Signed in through the login form, like a person.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from pipeline import headless
from pipeline.dashboards.bundle import BUNDLE_DIR, SupersetError, superset_log_hint
from pipeline.settings import Settings

WIDTH = 1600
LOAD_TIMEOUT_MS = 90_000

# Superset 6.1's dashboard DOM: each chart is a `chart-grid-component` (with its name
# in `data-test-chart-name`); a failed query renders an antd error alert inside it,
# a finished one its `slice_container` with no loading spinner left.
CHARTS = '[data-test="chart-grid-component"]'
CHART_STATES = (
    "() => [...document.querySelectorAll('" + CHARTS + "')].map(chart => {"
    """
    const alert = chart.querySelector('[role="alert"], .ant-alert-error');
    const busy = chart.querySelector('[data-test="loading-indicator"], .loading');
    return {
        name: chart.getAttribute('data-test-chart-name'),
        error: alert ? alert.innerText.trim() : null,
        done: Boolean(alert || (chart.querySelector('.slice_container') && !busy)),
    };
})"""
)


@dataclass
class DashboardShot:
    slug: str
    title: str
    path: Path
    charts: int  # charts on the page
    errors: dict[str, str] = field(default_factory=dict)  # chart name -> what it shows
    seconds: float = 0.0


def bundle_dashboards(folder: Path = BUNDLE_DIR) -> list[tuple[str, str]]:
    """(slug, title) of each dashboard in the bundle, sorted by slug."""
    found = [yaml.safe_load(p.read_text()) for p in (folder / "dashboards").glob("*.yaml")]
    return sorted((d["slug"], d["dashboard_title"]) for d in found)


def screenshot_path(out_dir: Path, slug: str) -> Path:
    return out_dir / f"dashboard-{slug}.png"


def take(
    settings: Settings, out_dir: Path, dashboards: list[tuple[str, str]] | None = None
) -> list[DashboardShot]:
    """Open each dashboard signed in, wait until every chart finished (rendered or
    failed), save `dashboard-<slug>.png` (full page, 1600 px wide) in `out_dir`."""
    try:
        httpx.get(f"{settings.superset_url}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise SupersetError(
            f"Superset is not healthy at {settings.superset_url} ({err}); start it with "
            f"`f1 stack up`. {superset_log_hint(settings)}"
        ) from err
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    # Superset's CSP forbids eval, which Playwright's wait_for_function needs.
    with headless.browser_context(
        viewport={"width": WIDTH, "height": 1000}, bypass_csp=True
    ) as context:
        page = context.new_page()
        _log_in(page, settings)
        for slug, title in dashboards or bundle_dashboards():
            shots.append(_shoot(page, settings, slug, title, screenshot_path(out_dir, slug)))
    return shots


def _log_in(page: Any, settings: Settings) -> None:
    page.goto(f"{settings.superset_url}/login/")
    page.fill("#username", settings.superset_admin_user)
    page.fill("#password", settings.superset_admin_password.get_secret_value())
    page.press("#password", "Enter")
    page.wait_for_url(lambda url: "/login" not in url)


def _shoot(page: Any, settings: Settings, slug: str, title: str, path: Path) -> DashboardShot:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    started = time.perf_counter()
    # standalone=1: no navigation bar; title and filter bar (Session preset) stay.
    answer = page.goto(f"{settings.superset_url}/superset/dashboard/{slug}/?standalone=1")
    if answer is None or answer.status != 200:
        raise SupersetError(
            f"dashboard {slug!r} answered {answer and answer.status}: "
            "import the bundle first (`f1 dashboards import`)"
        )
    page.wait_for_selector(CHARTS, timeout=LOAD_TIMEOUT_MS)
    # Charts out of view are not rendered (dashboard virtualization): show them all.
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": WIDTH, "height": max(1000, height)})
    with contextlib.suppress(PlaywrightTimeout):  # reported below: charts never finished
        page.wait_for_function(
            f"({CHART_STATES})().every(chart => chart.done)", timeout=LOAD_TIMEOUT_MS
        )
    states: list[dict[str, Any]] = page.evaluate(CHART_STATES)
    page.set_viewport_size({"width": WIDTH, "height": 1000})  # full_page sizes the picture
    page.wait_for_timeout(1000)  # let the charts' entry animation end before the picture
    errors = {s["name"]: s["error"] for s in states if s["error"]}
    errors |= {
        s["name"]: f"still loading after {LOAD_TIMEOUT_MS // 1000} s"
        for s in states
        if not s["done"]
    }
    page.screenshot(path=str(path), full_page=True)
    return DashboardShot(slug, title, path, len(states), errors, time.perf_counter() - started)

"""The live page in headless Chromium (Debian's, driven by Playwright): what it
received and drew, as the page itself counts it (`window.f1live`).

Signed in the way the Airflow UI is after its login form: Airflow's JWT in the
`_token` cookie, obtained from `POST /auth/token` with the admin from `.env`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import headless
from pipeline.settings import Settings
from pipeline.stack import airflow_server

if TYPE_CHECKING:
    from playwright.sync_api import Page

VIEWPORT = {"width": 1600, "height": 900}


@dataclass
class PageWatch:
    seconds: float  # from the first update received to the last
    events: int  # updates received
    renders: int  # redraws
    renders_with_cars: int
    latencies_ms: list[float] = field(default_factory=list)  # commit -> browser, per update
    cars_shown: int = 0
    first_row: list[str] = field(default_factory=list)  # the cells of the leader's row
    screenshot: Path | None = None

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def renders_per_s(self) -> float:
        return self.renders_with_cars / self.seconds if self.seconds else 0.0


@contextmanager
def signed_in_page(settings: Settings) -> Iterator[Page]:
    """A headless Chromium page carrying the admin's Airflow login."""
    with headless.browser_context(viewport=VIEWPORT) as context:
        token = airflow_server.access_token(settings)
        context.add_cookies([{"name": "_token", "value": token, "url": settings.airflow_url}])
        yield context.new_page()


def watch(settings: Settings, seconds: float, screenshot: Path | None = None) -> PageWatch:
    """Open the live page signed in, keep it open `seconds`, and read its counters."""
    with signed_in_page(settings) as page:
        answer = page.goto(f"{settings.airflow_url}/f1/live")
        if answer is None or answer.status != 200:
            raise RuntimeError(f"live page answered {answer and answer.status}")
        page.wait_for_timeout(seconds * 1000)
        return read_page(page, screenshot)


def read_page(page: Page, screenshot: Path | None = None) -> PageWatch:
    """What an open live page counted and shows (and a screenshot of it)."""
    stats: dict[str, Any] = page.evaluate("window.f1live")
    first_row = page.locator("#cars tr").first
    cells = first_row.locator("td").all_inner_texts() if first_row.count() else []
    cars_shown = page.locator("#cars tr").count()
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
    span_ms = (stats["lastEventAt"] or 0) - (stats["firstEventAt"] or 0)
    return PageWatch(
        seconds=span_ms / 1000,
        events=int(stats["events"]),
        renders=int(stats["renders"]),
        renders_with_cars=int(stats["rendersWithCars"]),
        latencies_ms=[float(v) for v in stats["latenciesMs"]],
        cars_shown=cars_shown,
        first_row=cells,
        screenshot=screenshot,
    )


def screenshot_in_airflow(settings: Settings, path: Path, wait_s: float = 6.0) -> Path:
    """The live page as a user sees it: inside the Airflow UI, under its nav entry."""
    with signed_in_page(settings) as page:
        page.goto(f"{settings.airflow_url}/plugin/f1-live")
        page.wait_for_timeout(wait_s * 1000)
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
    return path

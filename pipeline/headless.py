"""Headless Chromium for screenshots and UI tests: Debian's `chromium` (installed by
`make install`), driven by Playwright, so no browser download is needed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

CHROMIUM = "/usr/bin/chromium"


@contextmanager
def browser_context(**options: Any) -> Iterator[BrowserContext]:
    """A fresh browser context (`options`: Playwright's `new_context` arguments),
    closed with its browser afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to run as root with its sandbox.
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser.new_context(**options)
        finally:
            browser.close()

"""Headless Debian ``chromium`` driven by Playwright (no browser download: ``executable_path`` is the system's).

One browser per test; each :class:`Tab` lives in its own browser context (a fresh cookie jar, like a new
private window), so "a fresh browser" is one call. The small API (``goto`` returns the final URL, ``text``,
``click``, ``screenshot``) is what the tests read as a person's actions.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import Browser as PlaywrightBrowser
from playwright.async_api import Page, async_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--host-resolver-rules=MAP *.localhost 127.0.0.1, MAP localhost 127.0.0.1"]
TIMEOUT_MS = 20_000


class Browser:
    def __init__(self, browser: PlaywrightBrowser) -> None:
        self.browser = browser

    async def new_tab(self) -> Tab:
        """A page in a new browser context (its own cookies): a fresh browser, as far as sites can tell."""
        context = await self.browser.new_context(viewport={"width": 1000, "height": 700})
        context.set_default_timeout(TIMEOUT_MS)
        return Tab(await context.new_page())


class Tab:
    def __init__(self, page: Page) -> None:
        self.page = page

    async def goto(self, url: str) -> str:
        """Navigate (following redirects) until the page has loaded; the final URL."""
        await self.page.goto(url, wait_until="load")
        return self.page.url

    async def click(self, selector: str) -> str:
        """Click and wait for the navigation it starts (a form submit); the final URL."""
        async with self.page.expect_navigation(wait_until="load"):
            await self.page.click(selector)
        return self.page.url

    async def text(self) -> str:
        return await self.page.inner_text("body") if await self.page.query_selector("body") else ""

    async def screenshot(self, path: Path) -> Path:
        await self.page.screenshot(path=str(path))
        return path


@contextlib.asynccontextmanager
async def chromium(extra_flags: tuple[str, ...] = ()) -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        raise RuntimeError("chromium not installed (apt-get install -y chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*FLAGS, *extra_flags])
        try:
            yield Browser(browser)
        finally:
            await browser.close()

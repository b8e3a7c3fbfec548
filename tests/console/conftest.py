"""The web console's tests: a real headless Chromium (Debian's `chromium`, driven by Playwright)
against a real chatgate process and the fake upstream.

`make test` installs Chromium where it can (as root, with apt). Without it the browser tests
skip, saying why; under CI (`CI` set) they fail instead, so they never silently stop running.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support import ChatgateServer

_HERE = Path(__file__).parent
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Installed before any of the page's scripts: records what must never happen on the page, so
# that a test can assert on it. The hook itself is proven by test_the_xss_detector_detects.
WATCH = """
window.__violations = [];
window.__errors = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push({directive: e.violatedDirective, blocked: e.blockedURI, sample: e.sample});
});
window.addEventListener("error", (e) => { window.__errors.push(String(e.message)); });
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.console)


def chromium_path() -> str | None:
    configured = os.environ.get("CHATGATE_TEST_CHROMIUM")
    if configured:
        return configured
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium per test module. Not per session: Playwright's sync API keeps an event
    loop running while it lives, so a later test's `asyncio.run()` in the same worker would fail."""
    path = chromium_path()
    if path is None:
        message = "Chromium is not installed: `apt-get install chromium` (make test does it as root)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the browser tests", pytrace=False)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    """A chatgate server of the module's own (SQLite): the browser tests look at its whole usage."""
    env = {"first_byte_timeout": 2, "idle_timeout": 5, "connect_timeout": 2}
    with ChatgateServer(tmp_path_factory.mktemp("console"), env) as server:
        yield server


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) at desktop size, with the page watch installed."""
    context = browser.new_context(viewport=DESKTOP, color_scheme="light")
    context.add_init_script(WATCH)
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        yield page
    finally:
        context.close()

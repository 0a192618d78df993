"""Debian's chromium driven headless by Playwright, for tests of what a user sees in the Airflow UI.

Playwright never downloads a browser here: it starts the system ``chromium`` (``executable_path``) with a fresh
profile. Screenshots go to ``test-artifacts/browser/`` (git-ignored), or ``$TEST_ARTIFACTS_DIR/browser/``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from harness import REPO_ROOT

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

#: Where Debian's package ``chromium`` puts its launcher.
CHROMIUM_CANDIDATES = ("chromium", "/usr/bin/chromium")
#: Root user, no GPU, closed network: no sandbox, no QUIC, nothing fetched in the background.
LAUNCH_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: Tall enough for the trigger form's first fields, as a laptop window is.
VIEWPORT = {"width": 1440, "height": 900}
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO_ROOT / "test-artifacts") / "browser"


def find_chromium() -> str | None:
    """The path of the system chromium, or None when Debian's package is not installed."""
    for candidate in CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


@contextmanager
def chromium_context(executable: str) -> Iterator[BrowserContext]:
    """A headless chromium with a fresh profile (``--user-data-dir``), closed and removed afterwards.

    :param executable: the chromium binary
    """
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium_profile_")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                headless=True,
                args=list(LAUNCH_ARGS),
                viewport=VIEWPORT,  # type: ignore[arg-type]
            )
            context.set_default_timeout(30_000)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def log_in(page: Page, base_url: str, username: str, password: str) -> None:
    """Sign in through the api-server's login page (SimpleAuthManager) unless the session already is.

    :param page: the page to use
    :param base_url: ``http://127.0.0.1:PORT`` of the api-server
    :param username: the user
    :param password: its password
    """
    page.goto(f"{base_url}/")
    sign_in = page.get_by_role("button", name="Sign in")
    # The UI redirects to the login page in the browser: wait for it or for the signed-in app's user menu.
    sign_in.or_(page.get_by_role("button", name="User")).first.wait_for()
    if not sign_in.is_visible():
        return
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    sign_in.click()
    page.wait_for_url(f"{base_url}/")


def screenshot(page: Page, name: str) -> Path:
    """Save a screenshot of the viewport as ``ARTIFACTS/<name>.png`` and return its path.

    :param page: the page
    :param name: file stem; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.png"
    page.screenshot(path=str(path))
    return path

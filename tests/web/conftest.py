"""The browser of the dashboard tests: Debian's headless Chromium, driven by selenium.

One browser for the whole run (starting Chromium is the slow part). Nothing is downloaded: the
browser and its driver are the system's (``.ci/system-packages`` installs them), and a missing one
fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def _system(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run .ci/system-packages (it installs chromium and chromium-driver)")
    return path


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = _system("chromium")
    driver_path = _system("chromedriver")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager never goes looking for a browser
    profile = tempfile.mkdtemp(prefix="shardon-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)

"""A headless Chromium for the report tests: Debian's `chromium` and `chromium-driver` through Selenium.

    with browser(width=700) as page:
        page.get(path.as_uri())
        page.execute_script("return document.documentElement.scrollWidth")
        screenshot(page, "report-700.png")        # the whole page, not only the window

Nothing here reaches the network: the driver is the system's (no Selenium Manager download) and
the report is a local file. `available()` says why a test must be skipped when there is no browser
(CI installs it: .ci/run).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
from pathlib import Path
from typing import Iterator

DRIVER = "/usr/bin/chromedriver"


def available() -> str | None:
    """None when a browser can run, else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not (shutil.which("chromium") and Path(DRIVER).is_file()):
        return "no chromium/chromedriver (apt-get install -y chromium chromium-driver)"
    return None


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator["object"]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--hide-scrollbars", f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    page = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        page.set_window_size(width, height)
        yield page
    finally:
        page.quit()


def resize(page, width: int, height: int = 900) -> None:
    """The viewport itself (what CSS sees as the window width), not the outer window."""
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def screenshot(page, path: Path) -> Path:
    """A PNG of the whole page, beyond the viewport."""
    shot = page.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path

"""Debian's Chromium driven by Playwright for Python: how the dashboard's browser tests and its figures
(``benchmarks/dashboard.py``) open ``/dashboard``.

Playwright's own browser download does not work on the lab's machines, so it is pointed at the system's
``chromium`` (``apt-get install -y chromium``); Playwright itself is the ``browser`` extra.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import Any

from labkit.errors import LabkitError


@contextlib.contextmanager
def headless_chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), closed at the end.

    Raises:
        LabkitError: Playwright or Chromium is missing (the line says what to install).
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise LabkitError(
            'the dashboard in a browser needs Playwright: python3 -m pip install -e ".[browser]"'
        ) from None
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise LabkitError("the dashboard in a browser needs Chromium: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            yield browser
        finally:
            browser.close()

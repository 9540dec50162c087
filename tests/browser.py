"""A real browser for the page tests: Debian's `chromium` driven by Playwright (Playwright's own browser downloads
do not work on these machines, so the system's executable is named)."""

from __future__ import annotations

import contextlib
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium executable on PATH (Debian: apt-get install chromium fonts-noto-cjk; "
                             "scripts/system_deps.sh does it)")


@contextlib.contextmanager
def launched():
    """Headless chromium for the length of the block."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()

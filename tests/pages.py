"""The page (`loomrun ui`) in a real browser: Debian's chromium driven by selenium, and
`loomrun ui` started as a user starts it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

ARTIFACTS = Path(os.environ.get("LOOMRUN_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def read_lines(proc: subprocess.Popen) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def start_ui(procs, *args) -> tuple[str, str, str]:
    """Start `loomrun ui`; its URL, base address and token, as it printed them."""
    proc = procs.start("ui", *args)
    lines = read_lines(proc)

    def printed():
        for line in list(lines):
            if found := re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line):
                return found
        assert proc.poll() is None, proc.stderr.read()
        return None

    found = wait_for(printed, 30, what="the URL loomrun ui prints")
    return found[0], found[1], found[2]


@contextlib.contextmanager
def chromium_session():
    """A headless chromium (a test is skipped when it is not installed)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (make test installs them "
                    "with apt-get where it runs as root)")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="loomrun-chromium-")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,1600", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()
        shutil.rmtree(profile, ignore_errors=True)

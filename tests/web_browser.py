"""A real browser for the web page's tests: Debian's Chromium (``apt-get install
chromium``: /usr/bin/chromium) driven by Playwright for Python, which downloads nothing
here (``executable_path``; never ``playwright install``).

The microphone is Chromium's fake capture device playing a WAV file in a loop
(``--use-file-for-fake-audio-capture``), the permission prompt is answered yes
(``--use-fake-ui-for-media-stream``), and audio may start without a user gesture.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, as root in a container, and quiet on a closed network: without the
# background-networking flags Chromium keeps trying to reach Google's hosts.
BASE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--autoplay-policy=no-user-gesture-required"]


def microphone_flags(wav: Path | None) -> list[str]:
    """A fake microphone that plays ``wav`` in a loop (None: a beep, Chromium's default)."""
    flags = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    return flags + ([f"--use-file-for-fake-audio-capture={wav}"] if wav else [])


def require_chromium() -> None:
    """Skip (saying why) where no browser can be driven; the README's test command
    installs both, so this happens only where Chromium cannot be installed."""
    pytest.importorskip("playwright", reason="playwright is in the dev extra: "
                                              "pip install -e '.[dev]'")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: apt-get install -y chromium (the README's test command "
                    "does it)")


@asynccontextmanager
async def browser(*flags: str) -> AsyncIterator[Any]:
    """A fresh headless Chromium (empty profile) with these extra flags."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=[*BASE_FLAGS, *flags])
        try:
            yield chromium
        finally:
            await chromium.close()


async def wait_for(page: Any, expression: str, timeout_s: float, arg: Any = None) -> Any:
    """Until the JavaScript ``expression`` (a function of ``arg``) is truthy; its value.
    On timeout, fails with the page's state to show where it stood."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    try:
        handle = await page.wait_for_function(expression, arg=arg, timeout=timeout_s * 1000,
                                              polling=100)
        return await handle.json_value()
    except PlaywrightTimeout:
        state = await page.evaluate(
            "() => window.voicebus && ({state: voicebus.state, notice: voicebus.notice, "
            "played: voicebus.playedSamples, turns: voicebus.turns()})")
        pytest.fail(f"waited {timeout_s:.0f} s for {expression}; the page: {state}")

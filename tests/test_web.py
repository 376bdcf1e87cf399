"""The browser page (``edge/web/``, served by the gateway) in a real headless Chromium
(tests/web_browser.py): its HTTP side, tokens, reconnects, a denied microphone, and the
whole product hearing a real recording through the page's fake microphone."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from edge.audio_io import write_wav
from edge.auth import mint, verify
from edge.gateway import Gateway
from schemas import AudioFrame
from tests.audio import GO_FORWARD, SAMPLES, join, silence, speech
from tests.busutil import read_all
from tests.conftest import ROOT
from tests.conftest import wait_for as wait_until
from tests.support.openai_server import Script, ScriptedOpenAI
from tests.web_browser import browser, microphone_flags, require_chromium, wait_for
from voicebus.supervisor import Supervisor
from workers.backends.audio import float_to_pcm16
from workers.config import Config, GatewayConfig, LlmConfig, RedisConfig
from workers.runtime.keys import Keys

SECRET = "web-test-secret-0123456789abcdef"
SCREENSHOT_ENV = "VOICEBUS_WEB_SCREENSHOT"  # also save the conversation's screenshot here
# The agent's answer: long enough (~25 s of speech) to be still playing when the user
# speaks again, so the barge-in finds audio to cut.
REPLY = ("Going forward ten meters. I will move slowly and carefully, and I will check "
         "the path ahead for anything in the way before every step. When I get there I "
         "will stop, turn around and tell you what I can see from that spot. If anything "
         "blocks the way I will wait for you to tell me what to do next. This may take a "
         "little while, so please be patient with me while I walk.")


# -- the gateway alone (no workers): HTTP, tokens, reconnects --------------------------

async def start_gateway(redis_url: str, prefix: str, port: int = 0) -> Gateway:
    config = Config(redis=RedisConfig(url=redis_url, key_prefix=prefix),
                    gateway=GatewayConfig(port=port, secret=SECRET))
    gateway = Gateway(config, redis_url)
    await gateway.start()
    return gateway


def port_of(gateway: Gateway) -> int:
    assert gateway.server is not None
    return int(gateway.server.sockets[0].getsockname()[1])


@pytest.fixture
async def gateway(redis_url: str, prefix: str) -> AsyncIterator[Gateway]:
    gw = await start_gateway(redis_url, prefix)
    yield gw
    await gw.close()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def test_the_gateway_serves_the_page_and_only_its_files(gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{port_of(gateway)}"
    status, headers, body = await asyncio.to_thread(http_get, f"{base}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script type="module" src="app.js">' in body
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    for name, kind in [("app.js", "text/javascript"), ("capture-worklet.js", "text/javascript"),
                       ("player-worklet.js", "text/javascript"), ("style.css", "text/css")]:
        status, headers, body = await asyncio.to_thread(http_get, f"{base}/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), name
        assert body == (ROOT / "edge" / "web" / name).read_bytes()
    for path in ["/nothing.js", "/../gateway.py", "/%2e%2e/gateway.py", "/web_page.py"]:
        status, _, body = await asyncio.to_thread(http_get, f"{base}{path}")
        assert status == 404, path
    # The WebSocket path still refuses a missing token with the reason.
    status, _, body = await asyncio.to_thread(http_get, f"{base}/v1/session")
    assert status == 401 and b"no token" in body


async def test_the_token_check_says_who_or_why_not(gateway: Gateway) -> None:
    url = f"http://127.0.0.1:{port_of(gateway)}/v1/token"
    good = mint(SECRET.encode(), "alice", 60)
    expired = mint(SECRET.encode(), "alice", 60, now=1_000_000)
    cases = [(good, 200, {"user_id": "alice"}), (expired, 401, {"reason": "token expired"}),
             (good + "x", 401, {"reason": "bad signature"}), ("", 401, {"reason": "no token"})]
    for token, want_status, want_body in cases:
        status, headers, body = await asyncio.to_thread(
            http_get, url, {"Authorization": f"Bearer {token}"})
        assert (status, json.loads(body)) == (want_status, want_body), token
        assert headers["Cache-Control"] == "no-store"


def test_token_url_prints_a_link_that_opens_the_page() -> None:
    env = {**os.environ, "VOICEBUS_GATEWAY__SECRET": SECRET, "VOICEBUS_GATEWAY__PORT": "8799"}

    def token(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "voicebus", "token", *args], cwd=ROOT,
                              env=env, text=True, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert token("--user", "alice", "--url").startswith("http://127.0.0.1:8799/#token=")
    link = token("--user", "bob", "--url", "https://voice.example.com/agent")
    assert link.startswith("https://voice.example.com/agent/#token=")
    assert verify(SECRET.encode(), link.split("#token=")[1]) == "bob"


# -- in Chromium --------------------------------------------------------------------------

async def open_page(chromium: Any, url: str) -> Any:
    page = await chromium.new_page(viewport={"width": 960, "height": 640})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # scripts that threw: every test checks there were none
    await page.goto(url)
    return page


async def test_a_bad_token_shows_why_the_gateway_refused_it(gateway: Gateway) -> None:
    require_chromium()
    expired = mint(SECRET.encode(), "alice", 60, now=1_000_000)
    async with browser(*microphone_flags(None)) as chromium:
        page = await open_page(chromium, f"http://127.0.0.1:{port_of(gateway)}/#token={expired}")
        await wait_for(page, "() => voicebus.state === 'refused'", 20)
        assert "token expired" in await page.evaluate("voicebus.notice")
        assert "token expired" in await page.inner_text("#state")
        assert await page.is_visible("#token-form")  # to paste a new one
        assert "#token" not in page.url  # read, then removed from the address bar
        assert page.errors == []


async def test_the_page_connects_and_reconnects_when_the_gateway_comes_back(
        redis_url: str, prefix: str) -> None:
    require_chromium()
    gateway = await start_gateway(redis_url, prefix)
    port = port_of(gateway)
    token = mint(SECRET.encode(), "carol", 300)
    try:
        async with browser(*microphone_flags(None)) as chromium:
            page = await open_page(chromium, f"http://127.0.0.1:{port}/#token={token}")
            await page.click("#start:not([disabled])")
            await wait_for(page, "() => voicebus.state === 'connected'", 20)
            assert await page.evaluate("voicebus.userId") == "carol"
            # Its microphone streams: 20 ms frames reach the gateway at the page's rate.
            [session] = gateway.sessions.values()
            assert 8000 <= session.rate <= 48000
            await asyncio.to_thread(wait_until, lambda: session.seq >= 25, timeout=20,
                                    what="half a second of the page's microphone")
            await gateway.close()  # the gateway goes away (1001)
            await wait_for(page, "() => voicebus.state === 'reconnecting'", 20)
            assert "trying again" in await page.inner_text("#state")
            gateway = await start_gateway(redis_url, prefix, port)
            await wait_for(page, "() => voicebus.state === 'connected'", 30)
            assert len(gateway.sessions) == 1
            await page.click("#stop")
            await wait_for(page, "() => voicebus.state === 'idle'", 10)
            assert page.errors == []
    finally:
        await gateway.close()


async def test_push_to_talk_sends_the_microphone_only_while_pressed(
        gateway: Gateway, sync_redis: redis.Redis, prefix: str) -> None:
    require_chromium()
    token = mint(SECRET.encode(), "erin", 60)
    async with browser(*microphone_flags(SAMPLES / f"{GO_FORWARD}.wav")) as chromium:
        page = await open_page(chromium, f"http://127.0.0.1:{port_of(gateway)}/#token={token}")
        await page.check('input[name="mode"][value="push"]')
        await page.click("#start:not([disabled])")
        await wait_for(page, "() => voicebus.state === 'connected'", 20)
        [session] = gateway.sessions.values()
        stream = Keys(prefix).audio(session.session_id)

        def frames() -> list[AudioFrame]:
            return [e for e in read_all(sync_redis, stream) if isinstance(e, AudioFrame)]

        def loud(frame: AudioFrame) -> bool:
            return bool(np.frombuffer(frame.pcm, "<i2").any())

        # Released: frames keep flowing (the session is not idle), all silent.
        await asyncio.to_thread(wait_until, lambda: len(frames()) >= 25, timeout=20,
                                what="frames while the button is released")
        assert not any(loud(f) for f in frames())
        await page.hover("#talk")
        await page.mouse.down()
        await asyncio.to_thread(wait_until, lambda: any(loud(f) for f in frames()),
                                timeout=20, what="the microphone while pressed")
        await page.mouse.up()
        pressed_until = len(frames())
        await asyncio.to_thread(
            wait_until, lambda: len(frames()) >= pressed_until + 30 and
            not any(loud(f) for f in frames()[-10:]), timeout=20, what="silence again")
        assert page.errors == []


async def test_without_microphone_permission_the_page_says_so(gateway: Gateway) -> None:
    require_chromium()
    token = mint(SECRET.encode(), "dave", 60)
    async with browser("--use-fake-device-for-media-stream") as chromium:  # no "allow"
        page = await open_page(chromium, f"http://127.0.0.1:{port_of(gateway)}/#token={token}")
        await page.click("#start:not([disabled])")
        notice = await wait_for(page, "() => voicebus.state === 'failed' && voicebus.notice", 20)
        assert "Microphone permission denied" in notice
        assert gateway.sessions == {}  # no microphone, no session


# -- the product, through the page ----------------------------------------------------------

@pytest.fixture(scope="module")
def product(redis_url: str) -> Iterator[Supervisor]:
    """Every worker and the gateway as ``voicebus up`` runs them (real VAD, ASR, TTS);
    the LLM is the scripted server, so the answer is known and long."""
    prefix = f"w{uuid.uuid4().hex[:8]}"
    with ScriptedOpenAI([Script.reply([f"{word} " for word in REPLY.split()])]) as llm:
        env = {"VOICEBUS_REDIS__KEY_PREFIX": prefix, "VOICEBUS_GATEWAY__PORT": "0",
               "VOICEBUS_GATEWAY__SECRET": SECRET, "VOICEBUS_LLM__BASE_URL": llm.url}
        supervisor = Supervisor(redis_url, llm=LlmConfig(base_url=llm.url), env=env,
                                log_stream=open(Path(f"/tmp/voicebus-web-{prefix}.log"), "w"))
        supervisor.start(timeout=180)
        try:
            yield supervisor
        finally:
            supervisor.stop()


def page_url(supervisor: Supervisor, token: str) -> str:
    return supervisor.gateway_url.replace("ws://", "http://").removesuffix("/v1/session") + \
        f"/#token={token}"


@pytest.mark.timeout(300)
async def test_the_page_talks_with_the_agent_plays_it_and_handles_a_barge_in(
        product: Supervisor, tmp_path: Path) -> None:
    require_chromium()
    # The fake microphone loops: "Go forward ten meters", 8 s of a quiet room, again...
    # The second time comes while the (long) answer to the first still plays: a barge-in.
    wav = tmp_path / "microphone.wav"
    write_wav(wav, float_to_pcm16(join(silence(1.0), speech(GO_FORWARD), silence(8.0))), 16_000)
    token = mint(SECRET.encode(), "web-user", 300)
    async with browser(*microphone_flags(wav)) as chromium:
        page = await open_page(chromium, page_url(product, token))
        await page.click("#start:not([disabled])")
        await wait_for(page, "() => voicebus.state === 'connected'", 30)

        # The page shows what the user said and the agent's answer, and plays it.
        heard = await wait_for(page, """() => voicebus.turns().find(t =>
            /go forward/i.test(t.transcript) && t.reply && t.played > 0)""", 120)
        assert heard["reply"].startswith("Going forward ten meters."), heard
        assert await page.evaluate("voicebus.playedSamples") > 0
        captions = await page.inner_text("#turns")
        assert "Go forward" in captions or "go forward" in captions
        assert "Going forward ten meters." in captions

        # The user speaks again: the gateway says flush, the page stops the answer and
        # reports what it played, as `voicebus talk` does.
        cut = await wait_for(page, "() => voicebus.turns().find(t => t.interrupted)", 120)
        assert cut["flushed"] and 0 < cut["played"] < cut["received"], cut
        reports = await page.evaluate("voicebus.reports()")
        assert {"turn": cut["id"], "samples": cut["played"]} in reports
        # The cut turn's queued audio was dropped: once the next answer plays, the
        # speaker has still played exactly what was reported of the cut one.
        await wait_for(page, """(cut) => voicebus.turns().some(t => t.id !== cut.id &&
            /go forward/i.test(t.transcript) && t.played > 0)""", 120, cut)
        after = [t for t in await page.evaluate("voicebus.turns()") if t["id"] == cut["id"]]
        assert after[0]["speakerPlayed"] == after[0]["played"] == cut["played"], after
        assert "interrupted" in await page.inner_text(f'li[data-turn="{cut["id"]}"] .meta')

        shot = tmp_path / "browser.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert page.errors == []
    print(f"screenshot: {shot}")
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])

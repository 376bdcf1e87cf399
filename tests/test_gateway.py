"""The gateway as devices and the bus see it: a real WebSocket server on a real port,
real Redis, raw WebSocket clients (the protocol, byte for byte). The bus side is
played by publishing the events the workers would publish (out streams, the cancel
lane), so ordering, de-duplication, barge-in and limits are tested exactly."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from edge import protocol
from edge.auth import mint
from edge.gateway import Gateway
from schemas import (
    AudioChunk,
    AudioFrame,
    Heard,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    TextChunk,
    Transcript,
    TurnEnded,
    decode,
    encode,
)
from voicebus.redis_server import EmbeddedRedis
from voicebus.status import collect, render
from workers.config import Config, GatewayConfig, RedisConfig
from workers.llm.memory import ConversationMemory
from workers.runtime.bus import FIELD, Bus
from workers.runtime.cancel import CancelLane
from workers.runtime.keys import Keys

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture
async def gateway(redis_url: str, prefix: str) -> AsyncIterator[Gateway]:
    config = Config(redis=RedisConfig(url=redis_url, key_prefix=prefix),
                    gateway=GatewayConfig(port=0, secret=SECRET, max_frames_per_s=60,
                                          idle_timeout_s=2.0, max_frame_bytes=8192))
    gw = Gateway(config, redis_url)
    await gw.start()
    yield gw
    await gw.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


def url_of(gw: Gateway, token: str | None = None) -> str:
    assert gw.server is not None
    port = gw.server.sockets[0].getsockname()[1]
    query = f"?token={token}" if token else ""
    return f"ws://127.0.0.1:{port}{protocol.PATH}{query}"


async def open_session(gw: Gateway, user: str = "alice",
                       rate: int = 16000) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url_of(gw), additional_headers={
        "Authorization": f"Bearer {mint(SECRET.encode(), user, 60)}"})
    await ws.send(json.dumps({"type": "start", "sample_rate": rate}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready" and ready["user_id"] == user
    return ws, ready


async def publish(c: aioredis.Redis, stream: str, *events: Any) -> None:
    for event in events:
        await c.xadd(stream, {FIELD: encode(event)})


async def receive(ws: ClientConnection, until: str, wait_s: float = 10.0) -> list[Any]:
    """Messages (JSON dicts and audio bytes) up to and including a message of type ``until``."""
    got: list[Any] = []
    async with asyncio.timeout(wait_s):
        while True:
            message = await ws.recv()
            got.append(json.loads(message) if isinstance(message, str) else message)
            if isinstance(got[-1], dict) and got[-1]["type"] == until:
                return got


def pcm(value: int, samples: int) -> bytes:
    return value.to_bytes(2, "little", signed=True) * samples


def chunk(sid: str, turn: str, seq: int, part: int, value: int, *, final: bool = True,
          last: bool = False) -> AudioChunk:
    return AudioChunk(session_id=sid, turn_id=turn, seq=seq, part=part, final_part=final,
                      last=last, sample_rate=24000, pcm=pcm(value, 240))


# -- the handshake ---------------------------------------------------------------------
@pytest.mark.parametrize("token, why", [
    (None, "no token"),
    ("not-a-token", "malformed"),
    (mint(b"another-secret-that-is-long", "alice", 60), "bad signature"),
    (mint(SECRET.encode(), "alice", 60, now=time.time() - 3600), "expired"),
    ("%C3%A4bc.d%C3%A9f", "malformed"),  # non-ASCII, as a browser would send it
    (mint(SECRET.encode(), "alice", 60) + "%C3%A9", "malformed"),
])
async def test_bad_tokens_are_refused_at_the_handshake(gateway: Gateway, token: str | None,
                                                       why: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(url_of(gateway, token))
    assert refused.value.response.status_code == 401
    assert why in refused.value.response.body.decode()


async def test_refusals_are_one_short_line_each_and_cannot_flood_the_log(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voicebus.gateway")
    refused = 0
    for i in range(40):
        with pytest.raises(InvalidStatus) as error:
            await connect(url_of(gateway, "%E2%9C%93" * (i % 3 + 1) + ".x"))
        refused += error.value.response.status_code == 401
    assert refused == 40
    lines = [r for r in caplog.records if r.name == "voicebus.gateway"]
    assert 1 <= len(lines) <= 10  # the first few, then counted
    assert all("refused a device" in r.getMessage() and r.exc_info is None for r in lines)
    assert all(len(r.getMessage()) < 200 for r in lines)


async def test_a_tampered_token_is_refused(gateway: Gateway) -> None:
    good = mint(SECRET.encode(), "alice", 60)
    payload, signature = good.split(".")
    import base64
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = "bob"  # the device tries to become another user
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidStatus) as refused:
        await connect(url_of(gateway, f"{forged}.{signature}"))
    assert refused.value.response.status_code == 401


async def test_the_session_belongs_to_the_tokens_user(gateway: Gateway,
                                                      client: aioredis.Redis) -> None:
    ws, ready = await open_session(gateway, "alice")
    keys = gateway.keys
    announced = [decode(f[FIELD]) for _i, f in await client.xrange(keys.sessions())]
    started = [e for e in announced if isinstance(e, SessionStarted)
               and e.session_id == ready["session_id"]]
    assert [(e.user_id, e.sample_rate) for e in started] == [("alice", 16000)]
    # Nothing the device sends can change the user: there is no field for it.
    await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "user_id": "bob"}))
    with pytest.raises(ConnectionClosed) as closed:
        await receive(ws, "never")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.Close.POLICY


async def test_audio_frames_reach_the_session_in_order(gateway: Gateway,
                                                       client: aioredis.Redis) -> None:
    ws, ready = await open_session(gateway, rate=48000)
    sid = ready["session_id"]
    for i in range(20):
        await ws.send(pcm(i, 960))
    await ws.send(json.dumps({"type": "stop"}))
    await ws.wait_closed()
    events = [decode(f[FIELD]) for _i, f in await client.xrange(gateway.keys.audio(sid))]
    frames = [e for e in events if isinstance(e, AudioFrame)]
    assert [f.seq for f in frames] == list(range(20))
    assert [f.pcm for f in frames] == [pcm(i, 960) for i in range(20)]
    assert all(f.sample_rate == 48000 for f in frames)
    assert isinstance(events[-1], SessionEnded)


# -- out: order, once each, captions, latency -------------------------------------------
async def test_reply_audio_is_sent_in_order_once_each(gateway: Gateway,
                                                      client: aioredis.Redis) -> None:
    ws, ready = await open_session(gateway)
    sid = ready["session_id"]
    out = gateway.keys.out(sid)
    for _ in range(5):  # 100 ms of audio, so the speech end can be placed in time
        await ws.send(pcm(0, 320))
    await publish(client, out,
                  SpeechStarted(session_id=sid, turn_id="t1", audio_ms=10),
                  TurnEnded(session_id=sid, turn_id="t1", sample_rate=16000,
                            speech_start_ms=10, speech_end_ms=80, decided_ms=300,
                            rule="smart_turn"),
                  Transcript(session_id=sid, turn_id="t1", text="hello there"),
                  TextChunk(session_id=sid, turn_id="t1", seq=0, text="Hi.", ttft_ms=123.0),
                  TextChunk(session_id=sid, turn_id="t1", seq=1, text="How are you?",
                            last=True),
                  # TTS workers finish out of order, and one part is delivered twice.
                  chunk(sid, "t1", 1, 0, 10, final=False),
                  chunk(sid, "t1", 0, 1, 2),
                  chunk(sid, "t1", 0, 0, 1, final=False),
                  chunk(sid, "t1", 0, 0, 1, final=False),
                  chunk(sid, "t1", 1, 1, 11, last=True))
    got = await receive(ws, "turn_done")
    kinds = [m["type"] if isinstance(m, dict) else "pcm" for m in got]
    assert kinds[:4] == ["speech_started", "transcript", "reply", "reply"]
    audio = [m for m in got if isinstance(m, bytes)]
    assert audio == [pcm(1, 240), pcm(2, 240), pcm(10, 240), pcm(11, 240)]
    announce = [m for m in got if isinstance(m, dict) and m["type"] == "audio"]
    assert announce == [{"type": "audio", "turn_id": "t1", "sample_rate": 24000}]
    done = got[-1]
    assert done["turn_id"] == "t1" and not done["interrupted"] and done["rule"] == "smart_turn"
    lat = done["latency_ms"]
    assert lat["llm_ttft"] == 123.0
    assert {"turn_detect", "asr", "llm_first_text", "tts_first_chunk",
            "end_of_speech_to_first_audio"} <= set(lat)
    # The turn's breakdown is on the bus for `voicebus status` (p50/p95/p99 per stage).
    report = await collect(client, gateway.keys, {})
    assert report.turns == 1 and report.interrupted == 0
    by_stage = {st.stage: st for st in report.latency}
    assert by_stage["llm_ttft"].p50 == by_stage["llm_ttft"].p99 == 123.0
    assert "end_of_speech_to_first_audio" in by_stage and "p99" in render(report)
    # The device played it all: the agent stopped talking, so the turn is no longer live.
    await client.set(gateway.keys.active_turn(sid), "t1")
    await ws.send(json.dumps({"type": "played", "turn_id": "t1", "samples": 960}))
    for _ in range(100):
        if not await client.exists(gateway.keys.active_turn(sid)):
            break
        await asyncio.sleep(0.02)
    assert not await client.exists(gateway.keys.active_turn(sid))
    await ws.close()


async def test_each_reply_chunk_goes_to_the_device_once_and_never_after_its_turn(
        gateway: Gateway, client: aioredis.Redis) -> None:
    ws, ready = await open_session(gateway)
    sid = ready["session_id"]
    out = gateway.keys.out(sid)
    await ws.send(pcm(0, 320))
    await publish(client, out,
                  TextChunk(session_id=sid, turn_id="t1", seq=0, text="Hi."),
                  # An LLM worker frozen past its lease wakes up and writes seq 0 again.
                  TextChunk(session_id=sid, turn_id="t1", seq=0, text="Hello there."),
                  TextChunk(session_id=sid, turn_id="t1", seq=1, text="Bye.", last=True),
                  chunk(sid, "t1", 0, 0, 1), chunk(sid, "t1", 1, 0, 2, last=True))
    got = await receive(ws, "turn_done")
    assert [m["text"] for m in got if isinstance(m, dict) and m["type"] == "reply"] == [
        "Hi.", "Bye."]
    await publish(client, out,
                  TextChunk(session_id=sid, turn_id="t1", seq=0, text="Hello there."),
                  TextChunk(session_id=sid, turn_id="t1", seq=2, text="Late.", last=True),
                  Transcript(session_id=sid, turn_id="t2", text="next"))
    later = await receive(ws, "transcript")
    assert [m["type"] for m in later if isinstance(m, dict)] == ["transcript"]
    await ws.close()


# -- barge-in ----------------------------------------------------------------------------
async def test_barge_in_flushes_stops_audio_and_keeps_what_was_heard(
        gateway: Gateway, client: aioredis.Redis, prefix: str) -> None:
    ws, ready = await open_session(gateway, "carol")
    sid = ready["session_id"]
    out = gateway.keys.out(sid)
    memory = ConversationMemory(client, prefix)
    await memory.append("carol", "user", "Tell me a story.", turn_id="t1")
    await publish(client, out,
                  TextChunk(session_id=sid, turn_id="t1", seq=0, text="Once upon a time."),
                  TextChunk(session_id=sid, turn_id="t1", seq=1,
                            text="There lived a king in a castle."),
                  chunk(sid, "t1", 0, 0, 1), chunk(sid, "t1", 1, 0, 2))
    got = await receive(ws, "reply")
    while len([m for m in got if isinstance(m, bytes)]) < 2:
        got.append(await ws.recv())
    # The device has played chunk 0 and half of chunk 1 when the user speaks up.
    await ws.send(json.dumps({"type": "played", "turn_id": "t1", "samples": 360}))
    bus = Bus(client, Keys(prefix))
    started = time.monotonic()
    await CancelLane(bus, 60).cancel(sid, "t1", "barge-in")
    after = await receive(ws, "turn_done")
    flush = next(m for m in after if isinstance(m, dict) and m["type"] == "flush")
    assert flush["turn_id"] == "t1"
    assert after[-1]["interrupted"] is True
    assert time.monotonic() - started < 1.0
    # Audio of the cancelled turn published later never reaches the device.
    await publish(client, out, chunk(sid, "t1", 2, 0, 3, last=True),
                  SpeechStarted(session_id=sid, turn_id="t2", audio_ms=500))
    rest = await receive(ws, "speech_started")
    assert not any(isinstance(m, bytes) for m in rest)
    # The gateway reports what was heard to the LLM stage (whose memory narrows the
    # reply to it: test_llm_worker); it writes no memory itself.
    heard = await heard_reports(client, Keys(prefix))
    assert [(h.turn_id, h.user_id, h.text, h.played_samples, h.sent_samples)
            for h in heard] == [("t1", "carol", "Once upon a time. There lived a", 360, 480)]
    assert heard[0].session_id == sid
    assert [m.role for m in await memory.history("carol")] == ["user"]
    await ws.close()


async def heard_reports(client: aioredis.Redis, keys: Keys, wait_s: float = 2.0) -> list[Heard]:
    """The Heard events on the LLM queue, once there is one (or after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [decode(f[FIELD]) for _, f in await client.xrange(keys.queue("llm"))]
        heard = [e for e in found if isinstance(e, Heard)]
        if heard or time.monotonic() > deadline:
            return heard
        await asyncio.sleep(0.02)


def turn_ended(sid: str, turn: str, *, tentative: bool) -> TurnEnded:
    return TurnEnded(session_id=sid, turn_id=turn, sample_rate=16000, speech_start_ms=100,
                     speech_end_ms=900, decided_ms=1100, rule="smart_turn",
                     tentative=tentative)


async def test_a_tentative_turn_plays_nothing_until_its_commit(
        gateway: Gateway, client: aioredis.Redis) -> None:
    ws, ready = await open_session(gateway)
    sid = ready["session_id"]
    out = gateway.keys.out(sid)
    await publish(client, out, turn_ended(sid, "t1", tentative=True),
                  TextChunk(session_id=sid, turn_id="t1", seq=0, text="Hello there."),
                  chunk(sid, "t1", 0, 0, 1))
    got = await receive(ws, "reply")
    with pytest.raises(TimeoutError):  # held: the VAD has not committed the turn
        async with asyncio.timeout(0.5):
            while True:
                assert not isinstance(await ws.recv(), bytes), "audio before the commit"
    assert not await client.exists(gateway.keys.audible(sid))
    await publish(client, out, turn_ended(sid, "t1", tentative=False),
                  chunk(sid, "t1", 1, 0, 2, last=True))
    got = await receive(ws, "turn_done")
    assert [m for m in got if isinstance(m, bytes)] == [pcm(1, 240), pcm(2, 240)]
    assert got[-1]["continued"] is False and got[-1]["interrupted"] is False
    turn, _, sent_ns = (await client.get(gateway.keys.audible(sid))).decode().partition(" ")
    assert turn == "t1" and abs(int(sent_ns) - time.time_ns()) < 5e9
    await ws.close()


async def test_a_continued_turn_is_dropped_silently_and_stores_nothing(
        gateway: Gateway, client: aioredis.Redis, prefix: str) -> None:
    ws, ready = await open_session(gateway, "dora")
    sid = ready["session_id"]
    out = gateway.keys.out(sid)
    memory = ConversationMemory(client, prefix)
    await publish(client, out, SpeechStarted(session_id=sid, turn_id="t1", audio_ms=100),
                  TextChunk(session_id=sid, turn_id="t1", seq=0, text="Sure."),
                  chunk(sid, "t1", 0, 0, 1))
    got = await receive(ws, "reply")
    while not any(isinstance(m, bytes) for m in got):
        got.append(await ws.recv())
    # The user goes on before hearing it: the VAD cancels the turn as continued.
    await CancelLane(Bus(client, Keys(prefix)), 60).cancel(sid, "t1", "continued")
    after = await receive(ws, "turn_done")
    flush = next(m for m in after if isinstance(m, dict) and m["type"] == "flush")
    assert flush["reason"] == "continued"
    assert after[-1]["continued"] is True and after[-1]["interrupted"] is False
    await publish(client, out, SpeechStarted(session_id=sid, turn_id="t2", audio_ms=2000,
                                             continues="t1"))
    started = await receive(ws, "speech_started")
    assert started[-1]["continues"] == "t1"
    await asyncio.sleep(0.5)  # (a barge-in would have reported what was heard by now)
    assert await heard_reports(client, Keys(prefix), wait_s=0) == []
    assert await memory.history("dora") == []
    await ws.close()


# -- limits ------------------------------------------------------------------------------
async def test_an_oversized_frame_closes_only_that_session(gateway: Gateway) -> None:
    ws, _ = await open_session(gateway)
    other, _ = await open_session(gateway, "dave")
    await ws.send(b"\0" * 10_000)
    with pytest.raises(ConnectionClosed) as closed:
        await receive(ws, "never")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.Close.TOO_BIG
    await other.send(pcm(0, 320))  # the other device carries on
    await other.send(json.dumps({"type": "stop"}))
    await other.wait_closed()
    assert other.close_code == protocol.Close.NORMAL


async def test_a_flood_is_cut_off(gateway: Gateway) -> None:
    ws, _ = await open_session(gateway)
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(500):
            await ws.send(pcm(0, 16))
        await receive(ws, "never")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.Close.RATE
    assert "too many frames" in closed.value.rcvd.reason


async def test_an_idle_device_is_closed(gateway: Gateway) -> None:
    ws, _ = await open_session(gateway)
    with pytest.raises(ConnectionClosed) as closed:
        await receive(ws, "never", wait_s=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.Close.IDLE


async def test_bad_messages_close_with_a_reason(gateway: Gateway) -> None:
    for bad, words in (("{not json", "not JSON"), (json.dumps({"type": "dance"}), "unknown"),
                       (json.dumps({"type": "start", "sample_rate": 4000}), "sample_rate")):
        ws = await connect(url_of(gateway, mint(SECRET.encode(), "eve", 60)))
        await ws.send(bad)
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws, "never")
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == protocol.Close.POLICY
        assert words in closed.value.rcvd.reason


# -- teardown ----------------------------------------------------------------------------
async def test_disconnect_leaves_nothing_behind(gateway: Gateway,
                                                client: aioredis.Redis) -> None:
    tasks_before = len(gateway.tasks)
    ws, ready = await open_session(gateway)
    sid = ready["session_id"]
    await client.set(gateway.keys.active_turn(sid), "t9")
    await ws.send(pcm(0, 320))
    await publish(client, gateway.keys.out(sid),
                  TextChunk(session_id=sid, turn_id="t9", seq=0, text="Still talking."))
    await receive(ws, "reply")
    await ws.close()
    for _ in range(200):
        if sid not in gateway.sessions and len(gateway.tasks) == tasks_before:
            break
        await asyncio.sleep(0.02)
    assert sid not in gateway.sessions and gateway.keys.out(sid) not in gateway.tap.positions
    assert len(gateway.tasks) == tasks_before  # the session's tasks are gone
    # Its live turn was cancelled, the VAD told the session ended, every key expires.
    assert await client.hget(gateway.keys.cancelled(sid), "t9") is not None
    audio = [decode(f[FIELD]) for _i, f in await client.xrange(gateway.keys.audio(sid))]
    assert isinstance(audio[-1], SessionEnded)
    session_keys = gateway.keys.audio(sid).removesuffix("audio") + "*"
    keys = [k async for k in client.scan_iter(session_keys)]
    assert keys, "the session had keys"
    for key in keys:
        ttl = await client.ttl(key)
        assert ttl > 0, (key, ttl)
    assert not await client.exists(gateway.keys.active_turn(sid))
    assert await client.ttl(gateway.keys.out(sid)) <= 60  # nobody reads it any more
    # The VAD's release, run after the gateway's teardown as it mostly is, keeps them.
    await gateway.bus.shorten_ttls({gateway.keys.out(sid): 3600, gateway.keys.audio(sid): 60})
    assert await client.ttl(gateway.keys.out(sid)) <= 60
    assert await client.ttl(gateway.keys.audio(sid)) <= 60


async def test_teardown_expiries_do_not_depend_on_who_runs_last(
        gateway: Gateway, client: aioredis.Redis) -> None:
    bus, key = gateway.bus, f"{gateway.keys.prefix}:{{s1}}:out"
    vad, gw = {key: 3600}, {key: 60}
    for first, second in ((vad, gw), (gw, vad)):
        await client.xadd(key, {FIELD: b"x"})
        assert await client.ttl(key) == -1
        await bus.shorten_ttls(first)
        await bus.shorten_ttls(second)
        assert 0 < await client.ttl(key) <= 60
        await client.delete(key)
    await bus.shorten_ttls(gw)
    assert not await client.exists(key)  # a key that is gone stays gone


async def test_a_new_sessions_audio_stream_expires_even_without_a_teardown(
        gateway: Gateway, client: aioredis.Redis) -> None:
    ws, ready = await open_session(gateway)
    await ws.send(pcm(0, 320))
    stream = gateway.keys.audio(ready["session_id"])
    for _ in range(100):
        if await client.exists(stream):
            break
        await asyncio.sleep(0.02)
    ttl = await client.ttl(stream)
    assert gateway.config.redis.session_ttl_s < ttl <= gateway.config.session_streams_ttl_s()
    await ws.close()


# -- Redis outages -------------------------------------------------------------------------
@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    yield server
    server.stop()


async def outage_gateway(server: EmbeddedRedis, outage_s: float,
                         max_frames_per_s: int = 100) -> Gateway:
    config = Config(redis=RedisConfig(url=server.url, key_prefix="out"),
                    gateway=GatewayConfig(port=0, secret=SECRET, idle_timeout_s=1.0,
                                          bus_outage_s=outage_s,
                                          max_frames_per_s=max_frames_per_s))
    gw = Gateway(config, server.url)
    await gw.start()
    return gw


async def audio_seqs(client: aioredis.Redis, stream: str) -> list[int]:
    return [decode(f[FIELD]).seq for _i, f in await client.xrange(stream)  # type: ignore[attr-defined]
            if isinstance(decode(f[FIELD]), AudioFrame)]


async def test_a_redis_restart_keeps_the_device_connected_and_loses_no_audio(
        own_redis: EmbeddedRedis) -> None:
    gw = await outage_gateway(own_redis, outage_s=15.0)
    try:
        ws, ready = await open_session(gw)
        stream = gw.keys.audio(ready["session_id"])
        for _ in range(5):
            await ws.send(pcm(1, 320))
        client = aioredis.Redis.from_url(own_redis.url)
        for _ in range(100):
            if len(await audio_seqs(client, stream)) == 5:
                break
            await asyncio.sleep(0.02)
        await client.aclose()
        own_redis.stop(keep_data=True)
        for _ in range(30):  # 3 s of a device talking into an outage (idle_timeout_s 1)
            await ws.send(pcm(2, 320))
            await asyncio.sleep(0.1)
        own_redis.start()
        back = time.monotonic()
        await ws.send(pcm(3, 320))
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            for _ in range(200):
                if len(await audio_seqs(client, stream)) >= 36:
                    break
                await asyncio.sleep(0.02)
            assert time.monotonic() - back < 2.0
            # Every frame, in order; one sent twice by a retry is dropped by the VAD.
            assert sorted(set(await audio_seqs(client, stream))) == list(range(36))
        finally:
            await client.aclose()
        await ws.send(json.dumps({"type": "stop"}))  # still connected: a clean goodbye
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws, "never")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.Close.NORMAL
    finally:
        await gw.close()


async def test_an_outage_longer_than_the_budget_closes_the_device_with_1011(
        own_redis: EmbeddedRedis) -> None:
    gw = await outage_gateway(own_redis, outage_s=1.0)
    try:
        ws, _ = await open_session(gw)
        await ws.send(pcm(1, 320))
        await asyncio.sleep(0.2)
        own_redis.stop(keep_data=True)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.send(pcm(2, 320))
                await asyncio.sleep(0.1)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == protocol.Close.SERVER_ERROR
        assert 1.0 <= time.monotonic() - started < 5.0
    finally:
        await gw.close()


async def test_a_device_that_connects_while_redis_is_away_is_served_when_it_is_back(
        own_redis: EmbeddedRedis) -> None:
    gw = await outage_gateway(own_redis, outage_s=15.0)
    try:
        ws, first = await open_session(gw)  # the pool now holds a connection Redis will drop
        await ws.close()
        own_redis.stop(keep_data=True)
        opening = asyncio.create_task(open_session(gw, user="bob"))
        await asyncio.sleep(1.5)
        assert not opening.done()  # waiting for Redis, not closed with 1011
        own_redis.start()
        ws, ready = await asyncio.wait_for(opening, 10)
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            announced = [decode(f[FIELD]) for _i, f in await client.xrange(gw.keys.sessions())]
        finally:
            await client.aclose()
        assert [e.session_id for e in announced] == [first["session_id"], ready["session_id"]]
        await ws.close()
    finally:
        await gw.close()


@pytest.mark.parametrize("outage", ["stopped", "paused"])
async def test_the_burst_of_frames_held_by_an_outage_is_not_taken_for_a_flood(
        own_redis: EmbeddedRedis, outage: str) -> None:
    gw = await outage_gateway(own_redis, outage_s=15.0, max_frames_per_s=20)
    try:
        ws, ready = await open_session(gw)
        stream = gw.keys.audio(ready["session_id"])
        await ws.send(pcm(1, 320))
        await asyncio.sleep(0.2)
        # Stopped: connections refused. Paused (SIGSTOP): a Redis that takes seconds to
        # answer, with no error at all until the socket times out (5 s).
        if outage == "stopped":
            own_redis.stop(keep_data=True)
        else:
            os.kill(own_redis.pid or 0, signal.SIGSTOP)
        for _ in range(40):  # 2 s at the allowed rate, held back by the outage
            await ws.send(pcm(2, 320))
            await asyncio.sleep(0.05)
        if outage == "stopped":  # ... and now they all come at once
            own_redis.start()
        else:
            os.kill(own_redis.pid or 0, signal.SIGCONT)
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            for _ in range(300):
                if len(set(await audio_seqs(client, stream))) >= 41:
                    break
                await asyncio.sleep(0.02)
            assert sorted(set(await audio_seqs(client, stream))) == list(range(41))
        finally:
            await client.aclose()
        for _ in range(5):  # the device talks on at its rate: still connected
            await ws.send(pcm(3, 320))
            await asyncio.sleep(0.05)
        await ws.send(json.dumps({"type": "stop"}))
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws, "never")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.Close.NORMAL
    finally:
        await gw.close()

"""Streams stay bounded; consumers that are gone are removed, never with work in hand."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from schemas import AudioChunk
from workers.runtime import janitor
from workers.runtime.bus import Bus
from workers.runtime.keys import Keys


@pytest.fixture
async def client(redis_url: str):  # type: ignore[no-untyped-def]
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_trim_keeps_everything_pending_or_undelivered(client, prefix) -> None:  # type: ignore[no-untyped-def]
    stream = f"{prefix}:q:asr"
    await client.xgroup_create(stream, "asr", id="0", mkstream=True)
    await client.xgroup_create(stream, "audit", id="0")
    ids = [await client.xadd(stream, {"e": str(i)}) for i in range(1000)]
    # Group asr: 800 delivered, the first 600 acked; 200 pending (600..799).
    await client.xreadgroup("asr", "a", {stream: ">"}, count=800)
    await client.xack(stream, "asr", *ids[:600])
    # Group audit: read and acked 900: its position is further on.
    await client.xreadgroup("audit", "b", {stream: ">"}, count=900)
    await client.xack(stream, "audit", *ids[:900])

    removed = await janitor.trim_consumed(client, stream)
    assert removed > 0
    left = [i for i, _ in await client.xrange(stream)]
    assert ids[600] in left  # the oldest pending entry survives, and all after it
    assert left[-400:] == ids[600:]
    assert len(left) < 1000

    # Once everything is acked by both groups, the stream shrinks to (about) nothing.
    await client.xreadgroup("asr", "a", {stream: ">"})
    await client.xreadgroup("audit", "b", {stream: ">"})
    await client.xack(stream, "asr", *ids)
    await client.xack(stream, "audit", *ids)
    await janitor.trim_consumed(client, stream)
    assert await client.xlen(stream) < 200  # ~ trimming works on whole radix-tree nodes


async def test_trim_without_groups_does_nothing(client, prefix) -> None:  # type: ignore[no-untyped-def]
    stream = f"{prefix}:q:none"
    for i in range(300):
        await client.xadd(stream, {"e": str(i)})
    assert await janitor.trim_consumed(client, stream) == 0
    assert await client.xlen(stream) == 300


async def test_idle_consumers_go_but_never_with_pending_work(client, prefix) -> None:  # type: ignore[no-untyped-def]
    stream = f"{prefix}:q:llm"
    await client.xgroup_create(stream, "llm", id="0", mkstream=True)
    await client.xadd(stream, {"e": "job"})
    await client.xgroup_createconsumer(stream, "llm", "gone-idle")
    await client.xreadgroup("llm", "gone-holding-work", {stream: ">"})
    await client.xgroup_createconsumer(stream, "llm", "me")
    await client.xgroup_createconsumer(stream, "llm", "alive-idle")
    keys = Keys(prefix)
    await client.set(keys.alive("alive-idle"), 1, px=5000)
    await asyncio.sleep(0.3)

    # Gone: no heartbeat and idle past dead_after_ms. A live one waits for idle_s.
    removed = await janitor.remove_idle_consumers(client, keys, stream, "llm", 60,
                                                  keep="me", dead_after_ms=200)
    assert removed == ["gone-idle"]
    names = {c["name"].decode() for c in await client.xinfo_consumers(stream, "llm")}
    assert names == {"gone-holding-work", "me", "alive-idle"}
    removed = await janitor.remove_idle_consumers(client, keys, stream, "llm", 0.2,
                                                  keep="me", dead_after_ms=200)
    assert removed == ["alive-idle"]
    assert len(await client.xpending_range(stream, "llm", "-", "+", 10)) == 1

    assert not await janitor.remove_consumer_if_idle(client, stream, "llm", "gone-holding-work")
    assert await janitor.remove_consumer_if_idle(client, stream, "llm", "me")


async def test_the_work_of_a_consumer_without_heartbeat_is_taken_once(client, prefix) -> None:  # type: ignore[no-untyped-def]
    stream, keys = f"{prefix}:q:tts", Keys(prefix)
    await client.xgroup_create(stream, "tts", id="0", mkstream=True)
    for i in range(3):
        await client.xadd(stream, {"e": str(i)})
    await client.xreadgroup("tts", "dead", {stream: ">"}, count=2)
    await client.xreadgroup("tts", "live", {stream: ">"}, count=1)
    await client.set(keys.alive("live"), 1, px=5000)
    assert await janitor.dead_holders(client, keys, stream, "tts", "me") == ["dead"]
    await asyncio.sleep(0.1)
    taken = await janitor.claim_from(client, stream, "tts", "me", "dead", 10, min_idle_ms=50)
    assert [e[1][b"e"] for e in taken] == [b"0", b"1"]
    # A second peer racing for them gets nothing: the claim reset their idle time.
    assert await janitor.claim_from(client, stream, "tts", "peer", "me", 10,
                                    min_idle_ms=50) == []
    assert await janitor.dead_holders(client, keys, stream, "tts", "me") == []


def _audio(session: str, turn: str, seq: int) -> AudioChunk:
    """Half a second of reply audio (24 kHz PCM16): each entry is bigger than a stream
    node (4 KB), so trimming removes exactly the entries that are too old."""
    return AudioChunk(session_id=session, turn_id=turn, seq=seq, sample_rate=24_000,
                      pcm=b"\x01\x00" * 12_000)


async def test_a_sessions_out_stream_keeps_only_its_recent_past(client, prefix) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    bus = Bus(client, keys, out_keep_ms=400)
    out, queue = keys.out("s1"), keys.queue("tts")
    # The emit path (a worker's output, written once while the input is its own)...
    source = keys.queue("llm")
    await client.xgroup_create(source, "tts", id="0", mkstream=True)
    job = await client.xadd(source, {"e": b"job"})
    await client.xreadgroup("tts", "w1", {source: ">"})
    old = [await bus.emit(source, "tts", "w1", job.decode(), i, out, _audio("s1", "t1", i))
           for i in range(3)]
    # ... and the plain one (the gateway's).
    old.append(await bus.publish(out, _audio("s1", "t1", 3)))
    for i in range(3):
        await bus.publish(queue, _audio("s1", "t1", i))
    await asyncio.sleep(0.5)
    emitted = await bus.emit(source, "tts", "w1", job.decode(), 10, out, _audio("s1", "t2", 0))
    assert [i.decode() for i, _ in await client.xrange(out)] == [emitted]
    await asyncio.sleep(0.5)
    published = await bus.publish(out, _audio("s1", "t2", 1))
    assert [i.decode() for i, _ in await client.xrange(out)] == [published]
    assert await client.xlen(queue) == 3  # only a session's out stream is cut by age
    assert all(old)

    unbounded = Bus(client, keys)  # out_keep_ms 0: only maxlen.out bounds it
    other = keys.out("s2")
    for i in range(3):
        await unbounded.publish(other, _audio("s2", "t1", i))
    await asyncio.sleep(0.1)
    await unbounded.publish(other, _audio("s2", "t1", 3))
    assert await client.xlen(other) == 4

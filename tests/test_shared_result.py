"""Work done once across workers (``workers.runtime.shared_result``), on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from workers.runtime import shared_result
from workers.runtime.keys import Keys
from workers.runtime.shared_result import SharedResult


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_the_second_asker_waits_for_the_first_ones_result(client: aioredis.Redis,
                                                               prefix: str) -> None:
    first, second = (SharedResult(client, f"{prefix}:r1", 30) for _ in range(2))
    assert await first.claim()
    waiter = asyncio.create_task(second.claim_or_wait(lambda: False))
    async with first.working():
        await asyncio.sleep(0.1)
        assert not waiter.done()  # pending: it waits
        await first.publish(b"the words")
    assert await waiter == (False, b"the words")
    assert not await SharedResult(client, f"{prefix}:r1", 30).claim()  # done: kept


async def test_a_lapsed_claim_is_taken_over_and_a_release_frees_it(
        client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_result, "LEASE_MS", 200)
    dead = SharedResult(client, f"{prefix}:r2", 30)
    assert await dead.claim()  # and never renews: its worker died
    claimed, value = await SharedResult(client, f"{prefix}:r2", 30).claim_or_wait(
        lambda: False)
    assert (claimed, value) == (True, None)
    failed = SharedResult(client, f"{prefix}:r3", 30)
    assert await failed.claim()
    await failed.release()
    assert await SharedResult(client, f"{prefix}:r3", 30).claim()


async def test_a_cancelled_waiter_stops_waiting(client: aioredis.Redis, prefix: str) -> None:
    assert await SharedResult(client, f"{prefix}:r4", 30).claim()
    got = await asyncio.wait_for(SharedResult(client, f"{prefix}:r4", 30).claim_or_wait(
        lambda: True), 2)
    assert got == (False, None)


async def test_a_claim_whose_worker_has_no_heartbeat_is_taken_over_before_its_lease_ends(
        client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_result, "LEASE_MS", 600_000)  # the lease alone: 10 minutes
    keys = Keys(prefix)

    def result(key: str, owner: str) -> SharedResult:
        return SharedResult(client, f"{prefix}:{key}", 30, owner=owner, alive_key=keys.alive)

    await client.set(keys.alive("asr-a"), 1, px=600_000)
    assert await result("r5", "asr-a").claim()  # a live worker's claim is waited for
    waiting = asyncio.create_task(result("r5", "asr-c").claim_or_wait(lambda: False))
    await asyncio.sleep(0.5)  # five looks at its heartbeat
    assert not waiting.done()
    await result("r5", "asr-a").publish(b"the words")
    assert await waiting == (False, b"the words")

    assert await result("r6", "asr-b").claim()  # asr-b has no heartbeat: it died
    taken = await asyncio.wait_for(result("r6", "asr-c").claim_or_wait(lambda: False), 10)
    assert taken == (True, None)
    assert await client.get(f"{prefix}:r6") == b"pending:asr-c"

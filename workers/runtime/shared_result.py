"""Work done once across workers: a result in Redis that the first worker to claim it
computes while the others wait for it (the speculative ASR: a transcript computed at
a pause is the final turn's, when the user did not go on).

A key holds ``PENDING`` (with a short lease the computing worker keeps renewing) or
the finished value (with a TTL). Claiming first means work that arrives after its
result was asked for is not done twice; a worker that dies mid-way lets its lease
lapse, and a waiter then claims the work itself. Everything here is best effort: a
Redis error is logged and the caller goes on as if the result were not there (it
does the work itself), so the turn never depends on the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
T = TypeVar("T")

PENDING = b"pending"  # the value while its work runs
LEASE_MS = 3_000  # the pending marker expires this long after its owner stops renewing it
POLL_S = 0.01  # how often a waiter looks for a result another worker is computing
WAIT_LIMIT_S = 120.0  # a waiter never waits longer than this for a pending result


class SharedResult:
    def __init__(self, client: aioredis.Redis, key: str, ttl_s: int) -> None:
        self.redis, self.key, self.ttl_s = client, key, ttl_s

    async def claim(self) -> bool:
        """Take the work if nobody has it or its result (False also on Redis trouble)."""
        return bool(await _best_effort(self.redis.set(self.key, PENDING, nx=True,
                                                      px=LEASE_MS)))

    async def claim_or_wait(self, cancelled: Callable[[], bool]) -> tuple[bool, bytes | None]:
        """(True, None): the work is ours; (False, value): another worker's result;
        (False, None): do the work without the cache (Redis trouble, cancelled, or a
        wait past ``WAIT_LIMIT_S``)."""
        deadline = time.monotonic() + WAIT_LIMIT_S
        try:
            while True:
                if await self.redis.set(self.key, PENDING, nx=True, px=LEASE_MS):
                    return True, None
                value = await self.redis.get(self.key)
                if value is None:
                    continue  # it just expired or its work failed: claim it
                if value != PENDING:
                    return False, value.encode() if isinstance(value, str) else value
                if time.monotonic() > deadline or cancelled():
                    return False, None
                await asyncio.sleep(POLL_S)
        except (RedisError, OSError) as exc:
            log.warning("shared result unavailable (%s: %s); working without it",
                        type(exc).__name__, exc)
            return False, None

    @contextlib.asynccontextmanager
    async def working(self) -> AsyncIterator[None]:
        """Keep the claim's lease alive while the block runs, so waiters keep waiting."""
        renew = asyncio.ensure_future(self._renew())
        try:
            yield
        finally:
            renew.cancel()

    async def publish(self, value: bytes) -> None:
        """The finished result, for waiters and for a redelivery of the same work."""
        await _best_effort(self.redis.set(self.key, value, ex=self.ttl_s))

    async def release(self) -> None:
        """The work failed or was dropped: let the next one claim it."""
        await _best_effort(self.redis.delete(self.key))

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(LEASE_MS / 3000)
            await _best_effort(self.redis.pexpire(self.key, LEASE_MS))


async def _best_effort(op: Awaitable[T]) -> T | None:
    try:
        return await op
    except (RedisError, OSError) as exc:
        log.warning("shared result unavailable (%s: %s); carrying on without it",
                    type(exc).__name__, exc)
        return None

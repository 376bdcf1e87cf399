"""Work done once across workers: a result in Redis that the first worker to claim it
computes while the others wait for it (the speculative ASR: a transcript computed at
a pause is the final turn's, when the user did not go on).

A key holds ``PENDING`` and the computing worker's name (with a short lease it keeps
renewing) or the finished value (with a TTL). Claiming first means work that arrives
after its result was asked for is not done twice; a worker that dies mid-way is seen
dead by its heartbeat key (``Keys.alive``) and a waiter then takes the work over at
once, or, where no heartbeat is known, when the lease lapses. Everything here is best effort: a
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
OWNER_CHECK_S = 0.1  # how often a waiter asks whether the computing worker still lives
# Delete the key only if it still holds the dead owner's claim: two waiters that both
# saw it die must not delete the claim the first of them has just made.
_DROP_IF = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) end return 0")


def is_pending(value: bytes | str) -> bool:
    """Is this a claim (work under way), not a result?"""
    return (value.encode() if isinstance(value, str) else value).startswith(PENDING)


class SharedResult:
    def __init__(self, client: aioredis.Redis, key: str, ttl_s: int, *, owner: str = "",
                 alive_key: Callable[[str], str] | None = None) -> None:
        self.redis, self.key, self.ttl_s = client, key, ttl_s
        self.claim_value = PENDING + (b":" + owner.encode() if owner else b"")
        self.alive_key = alive_key  # the heartbeat key of a worker, by its name

    async def claim(self) -> bool:
        """Take the work if nobody has it or its result (False also on Redis trouble)."""
        return bool(await _best_effort(self.redis.set(self.key, self.claim_value, nx=True,
                                                      px=LEASE_MS)))

    async def claim_or_wait(self, cancelled: Callable[[], bool]) -> tuple[bool, bytes | None]:
        """(True, None): the work is ours; (False, value): another worker's result;
        (False, None): do the work without the cache (Redis trouble, cancelled, or a
        wait past ``WAIT_LIMIT_S``)."""
        deadline = time.monotonic() + WAIT_LIMIT_S
        next_check = time.monotonic() + OWNER_CHECK_S
        try:
            while True:
                if await self.redis.set(self.key, self.claim_value, nx=True, px=LEASE_MS):
                    return True, None
                value = await self.redis.get(self.key)
                if value is None:
                    continue  # it just expired or its work failed: claim it
                if isinstance(value, str):
                    value = value.encode()
                if not is_pending(value):
                    return False, value
                if time.monotonic() > deadline or cancelled():
                    return False, None
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + OWNER_CHECK_S
                    if await self._owner_is_dead(value):
                        await self.redis.eval(_DROP_IF, 1, self.key, value)
                        continue
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

    async def _owner_is_dead(self, claim: bytes) -> bool:
        """The claim names a worker whose heartbeat key is gone (it died or froze)."""
        owner = claim[len(PENDING) + 1:].decode(errors="replace")
        if not owner or self.alive_key is None:
            return False
        return not await self.redis.exists(self.alive_key(owner))

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

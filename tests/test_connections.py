"""Cancelling a task in the middle of a Redis command must not corrupt a shared client.

A cancelled command's reply must never be read as the answer to the next command
on the same connection (redis-py's CVE-2023-28858/28859 class of bug). The runtime
relies on this: it cancels handlers whose lease was lost, and tasks at shutdown.
"""

from __future__ import annotations

import asyncio
import random

from workers.runtime.connection import connect


async def test_cancelled_commands_never_leak_replies(redis_url: str, prefix: str) -> None:
    client = connect(redis_url)
    try:
        await client.mset({f"{prefix}:k{i}": f"v{i}" for i in range(200)})
        rng = random.Random(7)
        wrong = 0

        async def get(i: int) -> None:
            nonlocal wrong
            value = await client.get(f"{prefix}:k{i}")
            if value != f"v{i}".encode():
                wrong += 1

        for _round in range(20):
            tasks = [asyncio.create_task(get(rng.randrange(200))) for _ in range(50)]
            await asyncio.sleep(rng.uniform(0, 0.002))
            for task in rng.sample(tasks, 20):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Every command that was not cancelled got its own reply.
        assert wrong == 0
        assert await client.get(f"{prefix}:k5") == b"v5"
    finally:
        await client.aclose()

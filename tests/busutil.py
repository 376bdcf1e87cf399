"""Helpers for tests that talk to the bus from the outside (as the gateway will)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import redis

from schemas import Event, decode, encode
from voicebus.redis_cluster import LocalRedisCluster
from workers.runtime.bus import FIELD
from workers.runtime.connection import connect_sync
from workers.runtime.keys import Keys


def publish(r: redis.Redis, stream: str, event: Event) -> str:
    return r.xadd(stream, {FIELD: encode(event)}).decode()


def read_all(r: redis.Redis, stream: str) -> list[Event]:
    return [decode(fields[FIELD]) for _id, fields in r.xrange(stream)]


def dead_letters(r: redis.Redis, keys: Keys) -> list[Event]:
    return read_all(r, keys.dead_letter())


def pending(r: redis.Redis, stream: str, group: str) -> list[dict]:  # type: ignore[type-arg]
    try:
        return r.xpending_range(stream, group, min="-", max="+", count=10_000)
    except redis.ResponseError:
        return []


def cancel_turn(url: str, keys: Keys, session_id: str, turn_id: str, reason: str = "") -> None:
    """Cancel a turn on the cancel lane, as the VAD or the gateway does on barge-in."""
    from workers.runtime.bus import Bus
    from workers.runtime.cancel import CancelLane
    from workers.runtime.connection import connect

    async def cancel() -> None:
        client = connect(url)
        try:
            await CancelLane(Bus(client, keys), 60).cancel(session_id, turn_id, reason)
        finally:
            await client.aclose()

    asyncio.run(cancel())


def cluster_prefix(cluster: LocalRedisCluster) -> Iterator[str]:
    """A fresh key prefix on ``cluster`` (conftest's ``prefix``, for a cluster), its keys
    deleted afterwards through a node still alive, whatever a failover test killed."""
    value = f"t{uuid.uuid4().hex[:10]}"
    yield value
    client = connect_sync(cluster.url)
    for key in client.scan_iter(f"{value}:*", count=1000):
        client.delete(key)
    client.close()

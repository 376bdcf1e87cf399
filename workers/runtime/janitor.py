"""Housekeeping that keeps streams bounded and consumer lists clean, and finds the
consumers of dead processes (their heartbeat key has expired).

Trimming never removes an entry some group still needs: a stream is trimmed up
to the oldest entry that is pending or not yet delivered in any of its groups
(``XTRIM MINID``). The ``MAXLEN ~`` cap on every ``XADD`` is the hard bound
behind it, for a stream whose consumers are gone for good.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

from workers.runtime.bus import as_str
from workers.runtime.keys import Keys

log = logging.getLogger(__name__)

# Delete a consumer only if it holds nothing: checked and done in one atomic step.
_DELETE_IF_IDLE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


def _successor(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def trim_consumed(redis: aioredis.Redis, stream: str) -> int:
    """Drop entries every group has acknowledged; returns how many went."""
    groups = await redis.xinfo_groups(stream)
    if not groups:
        return 0
    keep_from: str | None = None
    for group in groups:
        name = as_str(group["name"])
        candidate = _successor(as_str(group["last-delivered-id"]))
        if int(group["pending"]):
            summary = await redis.xpending(stream, name)
            if summary["min"] is not None:  # else: acked since XINFO looked
                candidate = min(candidate, as_str(summary["min"]), key=_id_key)
        if keep_from is None or _id_key(candidate) < _id_key(keep_from):
            keep_from = candidate
    if keep_from is None or keep_from == "0-1":
        return 0
    return int(await redis.xtrim(stream, minid=keep_from, approximate=True))


async def dead_holders(redis: aioredis.Redis, keys: Keys, stream: str, group: str,
                       me: str) -> list[str]:
    """Consumers holding pending entries whose process is gone (no heartbeat key)."""
    summary = await redis.xpending(stream, group)
    holders = [as_str(c["name"]) for c in summary.get("consumers") or []
               if int(c["pending"]) and as_str(c["name"]) != me]
    if not holders:
        return []
    pipe = redis.pipeline(transaction=False)
    for holder in holders:
        pipe.exists(keys.alive(holder))
    return [h for h, up in zip(holders, await pipe.execute(), strict=True) if not up]


async def claim_from(redis: aioredis.Redis, stream: str, group: str, me: str, dead: str,
                     count: int, min_idle_ms: int) -> list[Any]:
    """Take over up to ``count`` of a dead consumer's pending entries, as ``XCLAIM``
    replies them (``None`` for one trimmed away). ``min_idle_ms`` makes the claim one
    peer's: the first claim resets the entry's idle time."""
    rows = await redis.xpending_range(stream, group, min="-", max="+", count=count,
                                      consumername=dead)
    ids: list[Any] = [r["message_id"] for r in rows]
    return list(await redis.xclaim(stream, group, me, min_idle_ms, ids)) if ids else []


async def claim_from_dead(redis: aioredis.Redis, keys: Keys, stream: str, group: str, me: str,
                          count: int, min_idle_ms: int) -> list[Any]:
    """Take over up to ``count`` pending entries of consumers whose process is gone."""
    claimed: list[Any] = []
    for dead in await dead_holders(redis, keys, stream, group, me):
        if len(claimed) >= count:
            break
        taken = await claim_from(redis, stream, group, me, dead, count - len(claimed),
                                 min_idle_ms)
        if taken:
            log.info("%s: %s is gone (no heartbeat): took over %d entries", me, dead,
                     len(taken))
        claimed += taken
    return claimed


async def remove_idle_consumers(
    redis: aioredis.Redis, keys: Keys, stream: str, group: str, idle_s: float, keep: str,
    dead_after_ms: int,
) -> list[str]:
    """Delete consumers with nothing pending that have been idle for ``idle_s``, or
    for ``dead_after_ms`` with no heartbeat (their process is gone).

    A consumer that still holds pending entries is never deleted: deleting it
    would drop those entries from the group. Its work is reclaimed first.
    """
    removed: list[str] = []
    delete_if_idle = redis.register_script(_DELETE_IF_IDLE)
    for consumer in await redis.xinfo_consumers(stream, group):
        name, idle = as_str(consumer["name"]), int(consumer["idle"])
        if name == keep or int(consumer["pending"]) or idle < dead_after_ms:
            continue
        if idle < idle_s * 1000 and await redis.exists(keys.alive(name)):
            continue
        if int(await delete_if_idle(keys=[stream], args=[group, name])) >= 0:
            removed.append(name)
    if removed:
        log.info("removed idle consumers from %s/%s: %s", stream, group, ", ".join(removed))
    return removed


async def remove_consumer_if_idle(redis: aioredis.Redis, stream: str, group: str,
                                  consumer: str) -> bool:
    """Delete one consumer if it holds no pending entries (atomic check-and-delete)."""
    delete_if_idle = redis.register_script(_DELETE_IF_IDLE)
    return int(await delete_if_idle(keys=[stream], args=[group, consumer])) >= 0

"""The cancel lane: a turn can be cancelled, and every stage can check it cheaply.

A cancel is written twice: into the session's ``cancelled`` hash (authoritative,
expires with the session) and onto the control stream, which every worker tails
so that checks between chunks are a local set lookup, not a round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis

from schemas import SchemaError, TurnCancelled, decode
from workers.runtime.bus import FIELD, Bus, as_str, read

log = logging.getLogger(__name__)

_LOCAL_LIMIT = 50_000  # cancelled turns remembered in memory (oldest dropped first)


class CancelLane:
    def __init__(self, bus: Bus, ttl_s: int) -> None:
        self.bus = bus
        self.ttl_s = ttl_s
        self._cancelled: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._waiters: dict[tuple[str, str], asyncio.Event] = {}
        self._last_seen: str | None = None  # control-stream position, kept across reconnects
        # Called with (session_id, turn_id, reason) the first time a cancel is seen (the
        # gateway uses it to stop a session's audio the moment its turn is cancelled).
        self.listeners: list[Callable[[str, str, str], None]] = []

    async def cancel(self, session_id: str, turn_id: str, reason: str = "") -> None:
        key = self.bus.keys.cancelled(session_id)
        pipe = self.bus.redis.pipeline(transaction=True)
        pipe.hset(key, turn_id, reason)
        pipe.expire(key, self.ttl_s)
        await pipe.execute()
        self._remember(session_id, turn_id, reason)
        await self.bus.publish(
            self.bus.keys.control(),
            TurnCancelled(session_id=session_id, turn_id=turn_id, reason=reason),
        )

    def is_cancelled_local(self, session_id: str, turn_id: str) -> bool:
        """O(1), no I/O: use between chunks."""
        return (session_id, turn_id) in self._cancelled

    async def is_cancelled(self, session_id: str, turn_id: str) -> bool:
        """Authoritative: also sees cancels made before this worker started."""
        if self.is_cancelled_local(session_id, turn_id):
            return True
        reason = await self.bus.redis.hget(self.bus.keys.cancelled(session_id), turn_id)
        if reason is None:
            return False
        self._remember(session_id, turn_id, as_str(reason))
        return True

    def reason(self, session_id: str, turn_id: str) -> str | None:
        """Why a turn was cancelled ("barge-in", "continued", ...), as far as seen here."""
        return self._cancelled.get((session_id, turn_id))

    def waiter(self, session_id: str, turn_id: str) -> asyncio.Event:
        """An event set when the turn is cancelled (to race a long model call against)."""
        key = (session_id, turn_id)
        event = self._waiters.setdefault(key, asyncio.Event())
        if key in self._cancelled:
            event.set()
        return event

    def release(self, session_id: str, turn_id: str) -> None:
        self._waiters.pop((session_id, turn_id), None)

    def _remember(self, session_id: str, turn_id: str, reason: str) -> None:
        key = (session_id, turn_id)
        new = key not in self._cancelled
        self._cancelled[key] = reason
        self._cancelled.move_to_end(key)
        while len(self._cancelled) > _LOCAL_LIMIT:
            self._cancelled.popitem(last=False)
        waiter = self._waiters.get(key)
        if waiter is not None:
            waiter.set()
        if new:
            for listener in self.listeners:
                listener(session_id, turn_id, reason)

    async def watch(self, reader: aioredis.Redis, block_ms: int, stop: asyncio.Event) -> None:
        """Tail the control stream until ``stop`` (errors propagate to the caller's retry)."""
        stream = self.bus.keys.control()
        if self._last_seen is None:
            newest = await reader.xrevrange(stream, count=1)
            self._last_seen = as_str(newest[0][0] or b"0-0") if newest else "0-0"
        assert self._last_seen is not None
        while not stop.is_set():
            for _name, entries in await read(reader, {stream: self._last_seen}, 256, block_ms):
                for entry_id, fields in entries:
                    self._last_seen = entry_id
                    try:
                        event = decode(fields.get(FIELD, b""))
                    except SchemaError as exc:
                        log.warning("undecodable control entry %s: %s", entry_id, exc)
                        continue
                    if isinstance(event, TurnCancelled):
                        self._remember(event.session_id, event.turn_id, event.reason)

"""The gateway's view of the bus: one task tails the out streams of every session of
this process in a single ``XREAD`` and hands each event to its session's inbox;
another tails the cancel lane. Both reconnect with the runtime's back-off.

On a Redis Cluster one read may only name keys of one slot: there, one task per
session bucket with sessions here (``workers.runtime.keys.SESSION_BUCKETS``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from schemas import Event, SchemaError, decode
from workers.runtime.bus import FIELD, read
from workers.runtime.cancel import CancelLane
from workers.runtime.connection import is_cluster
from workers.runtime.keys import slot_tag
from workers.runtime.retry import Backoff

log = logging.getLogger("voicebus.gateway")

OUT_BLOCK_MS = 50  # the out-stream reader's XREAD block: also how soon new sessions join


class BusTap:
    """Out streams and cancels for the sessions of this gateway process."""

    def __init__(self, reader: aioredis.Redis, control_reader: aioredis.Redis,
                 cancel: CancelLane, stop: asyncio.Event) -> None:
        self.reader, self.control_reader = reader, control_reader
        self.cancel = cancel
        self.stop = stop
        self.positions: dict[str, str] = {}  # out stream -> last id read
        self.deliver: dict[str, Callable[[Event], None]] = {}  # out stream -> its session
        self._readers: dict[str, asyncio.Task[None]] = {}  # on a cluster: hash tag -> reader

    def follow(self, stream: str, deliver: Callable[[Event], None]) -> None:
        self.positions[stream] = "0-0"
        self.deliver[stream] = deliver
        tag = slot_tag(stream)
        if is_cluster(self.reader) and tag not in self._readers:
            self._readers[tag] = asyncio.create_task(self.read_out_streams(tag))

    def unfollow(self, stream: str) -> None:
        self.positions.pop(stream, None)
        self.deliver.pop(stream, None)

    async def read_out_streams(self, tag: str | None = None) -> None:
        """One XREAD for the out streams of every session here (of one hash tag, on a
        cluster: that loop ends with the tag's last session); events to their session."""
        if tag is None and is_cluster(self.reader):  # the readers per tag do the work
            await self.stop.wait()
            for task in self._readers.values():
                task.cancel()
            await asyncio.gather(*self._readers.values(), return_exceptions=True)
            return
        backoff = Backoff(first=0.1)
        while not self.stop.is_set():
            positions = {s: p for s, p in self.positions.items()
                         if tag is None or slot_tag(s) == tag}
            if not positions:
                if tag is not None:
                    self._readers.pop(tag, None)
                    return
                await asyncio.sleep(OUT_BLOCK_MS / 1000)
                continue
            try:
                replies = await read(self.reader, positions, 256, OUT_BLOCK_MS)
                backoff.reset()
            except (RedisError, OSError) as exc:
                delay = backoff.next()
                log.warning("reading out streams failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            for stream, entries in replies:
                if stream not in self.positions:
                    continue  # the session ended meanwhile
                self.positions[stream] = entries[-1][0]
                deliver = self.deliver.get(stream)
                for _entry_id, fields in entries:
                    try:
                        event = decode(fields.get(FIELD, b""))
                    except SchemaError as exc:
                        log.warning("undecodable entry on %s: %s", stream, exc)
                        continue
                    if deliver is not None:
                        deliver(event)

    async def watch_cancels(self) -> None:
        """Tail the cancel lane (its listeners hand each cancel to the session)."""
        backoff = Backoff(first=0.1)
        while not self.stop.is_set():
            try:
                await self.cancel.watch(self.control_reader, 1000, self.stop)
            except (RedisError, OSError) as exc:
                log.warning("reading the cancel lane failed (%s); retrying", exc)
                await asyncio.sleep(backoff.next())

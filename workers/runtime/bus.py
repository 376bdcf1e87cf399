"""The stream operations every worker and publisher shares.

Writes that must not be half-done are Lua scripts (atomic in Redis):

* ``emit``: write one output of an input entry *once*, and only while the entry
  is still the writer's (fencing). The output's ordinal within that entry's
  handling is recorded in a small dedup hash, so when the entry is handled again
  (a retry, or a peer reclaiming it after a crash) the outputs already written are
  not written twice. A write to a session's out stream also trims what is older than
  ``out_keep_ms`` there (``Bus.trim_before``).
* ``ack``: acknowledge entries and drop their dedup hashes in one step.
* ``dead_letter``: record the entry on the dead-letter stream and ack it.
* ``renew``: re-claim our own in-flight entries (a lease), but only those still
  ours: an entry a peer has taken over is reported back as lost.
* ``shorten_ttls``: a session's teardown expiries, order-independent (the shortest
  TTL asked for wins), so the gateway and the VAD can both tear a session down.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas import DeadLetter, Event, SchemaError, decode, encode
from workers.runtime.connection import is_cluster
from workers.runtime.keys import Keys, StreamKind

FIELD = b"e"  # the one field of every entry: the encoded event


class LeaseLost(Exception):
    """The input entry was taken over by a peer: this worker must not write for it."""

# KEYS[1] = a key; ARGV[1] = the value we set. Deletes it only if it still holds that
# value (a lock or marker that may have expired and been set again by someone else).
DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: dedup hash, output stream[, input stream]; ARGV: ordinal, maxlen, payload, dedup
# TTL ms, session stream TTL ms, group, input entry id, consumer, delivery, trim-before id
# ('0': none; ``Bus.trim_before``).
# Fencing, so that a worker frozen past its lease, whose entry a peer took over (and
# maybe acked), cannot write its outputs again when it wakes up (returns 0 then):
# * with the input stream (one Redis: every key is on it) the output is written only
#   while the input entry is still pending to the writer;
# * on a cluster the input is on another slot, so the dedup hash (on the output's slot)
#   keeps the highest delivery that wrote there ('f'): each takeover is a later
#   delivery, and an earlier one may write no more. The runtime also checks the entry
#   is still its own before writing after any stall (``Worker._still_ours``).
# ARGV[5] > 0: the output stream belongs to a session; if this write created it, it
# expires in ARGV[5] ms (longer than a session lives), so no event for a session that
# never existed, or one whose teardown was missed, leaves a stream forever.
_EMIT = """
if KEYS[3] then
  local p = redis.call('XPENDING', KEYS[3], ARGV[6], ARGV[7], ARGV[7], 1)
  if not p[1] or p[1][2] ~= ARGV[8] then return 0 end
else
  local fence = tonumber(redis.call('HGET', KEYS[1], 'f') or '0')
  local delivery = tonumber(ARGV[9])
  if delivery < fence then return 0 end
  if delivery > fence then redis.call('HSET', KEYS[1], 'f', delivery) end
end
if redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 0 then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[3])
if ARGV[10] ~= '0' then redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[10]) end
if tonumber(ARGV[5]) > 0 and redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return id
"""

# KEYS: keys; ARGV: a TTL in seconds for each. Sets it only where it shortens the key's
# life (or the key has none; a missing key is left missing), so whoever tears a session
# down, in whatever order, the shortest TTL anyone asked for wins (Redis 7's EXPIRE LT,
# on 6.2 too).
SHORTEN_TTLS = """
for i, key in ipairs(KEYS) do
  local ttl = tonumber(ARGV[i])
  local now = redis.call('TTL', key)
  if now == -1 or now > ttl then redis.call('EXPIRE', key, ttl) end
end
return 0
"""

# One Redis only. KEYS[1] = stream, KEYS[2..] = dedup hashes; ARGV[1] = group,
# ARGV[2..] = ids
_ACK = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
if #KEYS > 1 then redis.call('DEL', unpack(KEYS, 2)) end
return n
"""

# One Redis only. KEYS: stream, dead-letter stream, dedup hashes...; ARGV: group, id,
# maxlen, payload
_DEAD_LETTER = """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[4])
if #KEYS > 2 then redis.call('DEL', unpack(KEYS, 3)) end
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS[1] = stream; ARGV: group, consumer, ids... Returns the ids still ours.
_RENEW = """
local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


# On a cluster, how long an acked entry's dedup hashes stay as its fence (``ack_many``):
# far longer than any stall between a worker's last ownership check and its write.
FENCE_AFTER_ACK_MS = 120_000

Entry = tuple[str, dict[bytes, bytes]]
Replies = list[tuple[str, list[Entry]]]


def _entries(reply: Any) -> Replies:
    """redis-py's stream replies, with ids and stream names as str."""
    return [(as_str(name), [(as_str(i), f) for i, f in entries]) for name, entries in reply or []]


async def read_group(client: aioredis.Redis, group: str, consumer: str,
                     streams: Mapping[str, str], count: int, block_ms: int) -> Replies:
    if is_cluster(client):
        return await _read_on_cluster(client, "XREADGROUP", ["GROUP", group, consumer],
                                      streams, count, block_ms)
    reply = await client.xreadgroup(group, consumer, cast(Any, dict(streams)),
                                    count=count, block=block_ms)
    return _entries(reply)


async def read(client: aioredis.Redis, streams: Mapping[str, str], count: int,
               block_ms: int) -> Replies:
    if is_cluster(client):
        return await _read_on_cluster(client, "XREAD", [], streams, count, block_ms)
    return _entries(await client.xread(cast(Any, dict(streams)), count=count, block=block_ms))


async def _read_on_cluster(client: aioredis.Redis, command: str, head: list[Any],
                           streams: Mapping[str, str], count: int, block_ms: int) -> Replies:
    """A blocking stream read on a cluster, sent to the master of the streams' slot.

    redis-py's cluster client sends XREAD/XREADGROUP to its *default* node (the first
    it met) and follows the MOVED reply; when that node dies, every read fails for
    good (measured: still failing 28 s after its replica took over). So the read names
    its node, and when that node cannot be reached the slot map is read again, so the
    next read goes to the slot's new master once one is elected.
    """
    cluster = cast(RedisCluster, client)
    await cluster.initialize()  # a new client learns the slot map here (at once later)
    try:
        node = cluster.get_node_from_key(next(iter(streams)))
    except RedisClusterException as exc:  # no master for the slot yet: an outage to callers
        raise RedisConnectionError(str(exc)) from exc
    try:
        reply = await cluster.execute_command(
            command, *head, "COUNT", count, "BLOCK", block_ms, "STREAMS", *streams,
            *streams.values(), target_nodes=node)
    except (RedisConnectionError, RedisTimeoutError, OSError):
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await cluster.nodes_manager.initialize()
        raise
    return _entries(reply)


async def newest_first(client: aioredis.Redis, stream: str, limit: int,
                       page: int = 128) -> AsyncIterator[Event]:
    """The events of ``stream`` newest first, ``limit`` entries at most, a page at a
    time (what a worker taking over reads back of a session). Entries that do not
    decode are passed over: poison is the gateway's to dead-letter."""
    end, read_so_far = "+", 0
    while read_so_far < limit:
        entries: list[Any] = await client.xrevrange(
            stream, max=end, count=min(page, limit - read_so_far)) or []
        if not entries:
            return
        read_so_far += len(entries)
        for _, fields in entries:
            raw = (fields or {}).get(FIELD)
            if not isinstance(raw, bytes):
                continue
            try:
                yield decode(raw)
            except SchemaError:
                continue
        end = "(" + as_str(entries[-1][0])  # the next page: older than this one's oldest


def consumer_name(stage: str) -> str:
    """Unique per process: ``stage-host-pid-random``."""
    return f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Bus:
    """Stream operations on one Redis, under one key prefix."""

    redis: aioredis.Redis
    keys: Keys
    maxlen: dict[str, int] = field(default_factory=dict)
    dedup_ttl_ms: int = 3_600_000
    session_stream_ttl_ms: int = 7_200_000  # a session's streams, from their creation
    out_keep_ms: int = 0  # how much of a session's out stream is kept (redis.out_keep_s)

    def __post_init__(self) -> None:
        self._emit = self.redis.register_script(_EMIT)
        self._ack = self.redis.register_script(_ACK)
        self._dead = self.redis.register_script(_DEAD_LETTER)
        self._renew = self.redis.register_script(_RENEW)
        self._shorten = self.redis.register_script(SHORTEN_TTLS)

    def maxlen_for(self, stream: str) -> int:
        kind: StreamKind | None = self.keys.kind(stream)
        return self.maxlen.get(kind or "queue", 10_000)

    def trim_before(self, stream: str) -> str:
        """The id below which a write to ``stream`` trims it: on a session's out stream,
        entries older than ``out_keep_ms`` ('0' elsewhere, or when it is 0).

        The out stream carries the reply audio, which the device has had long before
        (the gateway reads it as it comes); kept to ``maxlen.out`` entries it grows with
        the session, to tens of MB in an hour. What is read back is recent: the open turn
        of a VAD takeover (a turn is at most ``vad.fallback.max_turn_duration``; the config
        refuses a shorter window), the reply of an LLM resume. The id's time is this
        process's clock against Redis's, so a skew of seconds moves the cut by as much."""
        if self.out_keep_ms and self.keys.kind(stream) == "out":
            return str(max(0, time.time_ns() // 1_000_000 - self.out_keep_ms))
        return "0"

    async def publish(self, stream: str, event: Event) -> str:
        """Append an event (not on behalf of an input entry: no dedup)."""
        trim_before = self.trim_before(stream)
        if trim_before == "0":
            entry_id = await self.redis.xadd(
                stream, {FIELD: encode(event)}, maxlen=self.maxlen_for(stream),
                approximate=True)
            return as_str(entry_id)
        async with self.redis.pipeline(transaction=False) as pipe:  # one slot: one node
            pipe.xadd(stream, {FIELD: encode(event)}, maxlen=self.maxlen_for(stream),
                      approximate=True)
            pipe.xtrim(stream, minid=trim_before, approximate=True)
            entry_id, _ = await pipe.execute()
        return as_str(entry_id)

    @property
    def cluster(self) -> bool:
        return is_cluster(self.redis)

    async def emit(self, source: str, group: str, consumer: str, entry_id: str,
                   ordinal: int, stream: str, event: Event, delivery: int = 1) -> str | None:
        """Write output ``ordinal`` of input ``entry_id`` once; None if already written.

        Raises ``LeaseLost`` if the entry is no longer ``consumer``'s (``_EMIT``).
        """
        in_session = self.keys.kind(stream) in ("out", "audio")
        keys = [self.keys.dedup(stream, group, source, entry_id), stream]
        if not self.cluster:
            keys.append(source)
        result = await self._emit(
            keys=keys,
            args=[ordinal, self.maxlen_for(stream), encode(event), self.dedup_ttl_ms,
                  self.session_stream_ttl_ms if in_session else 0, group, entry_id, consumer,
                  delivery, self.trim_before(stream)],
        )
        if result == 0:
            raise LeaseLost(f"{entry_id} on {source} is no longer {consumer}'s")
        return as_str(result) if result else None

    async def shorten_ttls(self, ttls: Mapping[str, int]) -> None:
        """Give each key the TTL (s) where that shortens its life (``SHORTEN_TTLS``)."""
        if ttls:
            await self._shorten(keys=list(ttls), args=list(ttls.values()))

    async def ack(self, stream: str, group: str, entry_ids: Sequence[str],
                  dedup: Sequence[str] = ()) -> int:
        """Ack entries; ``dedup`` are the dedup hashes their outputs wrote (they go)."""
        if not entry_ids:
            return 0
        if self.cluster:
            await self.ack_many([(stream, group, entry_ids, dedup)])
            return len(entry_ids)
        return int(await self._ack(keys=[stream, *dedup], args=[group, *entry_ids]))

    async def ack_many(self, acks: Sequence[tuple[str, str, Sequence[str], Sequence[str]]]) -> None:
        """Several ``ack(stream, group, ids, dedup)`` in one pipelined round trip.

        On a cluster the dedup hashes are on their outputs' slots: they are not deleted
        with the ack but kept for ``FENCE_AFTER_ACK_MS``, since they are also the fence
        that stops a frozen worker's late write (``_EMIT``)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream, group, entry_ids, dedup in acks:
            if self.cluster:
                pipe.xack(stream, group, *entry_ids)
                for key in dedup:
                    pipe.pexpire(key, FENCE_AFTER_ACK_MS)
            else:
                await self._ack(keys=[stream, *dedup], args=[group, *entry_ids], client=pipe)
        await pipe.execute()

    async def dead_letter(self, stream: str, group: str, entry_id: str,
                          letter: DeadLetter, dedup: Sequence[str] = ()) -> None:
        dead = self.keys.dead_letter()
        if self.cluster:  # three slots: recorded first, so a crash between can only repeat it
            await self.publish(dead, letter)
            await self.ack(stream, group, [entry_id], dedup)
            return
        await self._dead(keys=[stream, dead, *dedup],
                         args=[group, entry_id, self.maxlen_for(dead), encode(letter)])

    async def renew(self, stream: str, group: str, consumer: str,
                    entry_ids: Sequence[str]) -> set[str]:
        """Renew our lease on in-flight entries; returns those still ours."""
        if not entry_ids:
            return set()
        kept = await self._renew(keys=[stream], args=[group, consumer, *entry_ids])
        return {as_str(i) for i in kept}

    async def ensure_group(self, stream: str, group: str, start: str = "0") -> None:
        try:
            await self.redis.xgroup_create(stream, group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def holder(self, stream: str, group: str, entry_id: str) -> str | None:
        """The consumer an entry is pending to, or None (acked, or never delivered)."""
        rows = await self.redis.xpending_range(stream, group, min=entry_id, max=entry_id,
                                               count=1)
        return as_str(cast(bytes, rows[0]["consumer"])) if rows else None

    async def deliveries(self, stream: str, group: str, entry_ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending entry has been delivered."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        counts: dict[str, int] = {}
        for entry_id, rows in zip(entry_ids, await pipe.execute(), strict=True):
            counts[entry_id] = int(rows[0]["times_delivered"]) if rows else 0
        return counts

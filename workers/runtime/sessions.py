"""Session-affine consumption: each session's events are handled in order by one owner.

Sessions are announced (``SessionStarted``) on the sessions stream. A worker
that reads an announcement owns that session and keeps the announcement
*pending* while the session lives, re-claiming it as a heartbeat. It reads the
session's own audio stream through a consumer group and handles the entries one
after another. When the owner dies, its announcement goes idle, a peer
``XAUTOCLAIM``s it, takes over the session's pending audio entries, and carries
on from the group's position: per-session order holds with any number of
workers. On a graceful stop the owner hands its sessions straight back
(ack + re-announce in one transaction) so a peer need not wait for the idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from schemas import Event, SchemaError, SessionEnded, SessionStarted, decode
from workers.observability.logs import log_context
from workers.runtime.ack_batch import AckBatcher
from workers.runtime.bus import FIELD, as_str, read_group
from workers.runtime.connection import is_cluster
from workers.runtime.contract import Context, Emit, RuntimeSettings
from workers.runtime.handling import IO_ERRORS
from workers.runtime.keys import slot_tag
from workers.runtime.retry import Stopping, wait_event
from workers.runtime.worker import Worker

log = logging.getLogger(__name__)

_BACKLOG = 64  # entries queued per session before we stop reading its stream
BUCKET_BLOCK_MS = 100  # on a cluster, a session bucket's blocking read (see _read_loop)


class SessionHandler(Protocol):
    """Per-session state (e.g. a VAD's recurrent state) and its handler.

    The runtime never runs it twice on one event in-process: a retry would feed its
    state the event again (a VAD's detector would hear a frame twice). An event it
    raises on is dead-lettered with the error, and the session goes on.

    A handler may have a ``keeps_pending`` attribute: while it is true, the events
    handled stay unacked (they are acked together once it turns false), so a peer
    that takes the session over after this process dies replays them and rebuilds
    the state they made (a VAD's turn in progress).
    """

    def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SessionStage:
    """A session-affine stage: ``open`` is called once per session this worker owns."""

    name: str
    open: Callable[[SessionStarted], SessionHandler]


@dataclass(eq=False)
class _Owned:
    started: SessionStarted
    announce_id: str
    announce_raw: bytes
    stream: str
    handler: SessionHandler
    queue: asyncio.Queue[tuple[str, Any, int]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    busy: bool = False  # handling a batch right now
    ended: bool = False
    held: list[str] = field(default_factory=list)  # handled, unacked: keeps_pending
    held_emitted: list[str] = field(default_factory=list)  # ...the dedup hashes they wrote


class SessionWorker(Worker):
    retries_handlers = False  # its handlers keep state across events (SessionHandler)

    def __init__(self, stage: SessionStage, settings: RuntimeSettings,
                 consumer: str | None = None) -> None:
        super().__init__(stage.name, settings, consumer)
        self.stage = stage
        self.announcements = self.keys.sessions()
        self._owned: dict[str, _Owned] = {}  # session_id -> state
        self._by_stream: dict[str, _Owned] = {}
        self._wake = asyncio.Event()  # a session's backlog drained
        self._acks = AckBatcher(self)
        self._readers: dict[str, asyncio.Task[None]] = {}  # on a cluster: hash tag -> reader

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {"read": self._read_loop, "heartbeat": self._heartbeat_loop,
                "reclaim": self._reclaim_loop, "acks": self._acks.run, **super().loops()}

    def streams_to_tidy(self) -> list[str]:
        return [self.announcements, *self._by_stream]

    async def ensure_groups(self) -> None:
        await self.bus.ensure_group(self.announcements, self.group)
        await self.redis.xgroup_createconsumer(self.announcements, self.group, self.consumer)
        for owned in list(self._owned.values()):
            await self.bus.ensure_group(owned.stream, self.group)

    @property
    def sessions(self) -> list[str]:
        return list(self._owned)

    # -- reading -----------------------------------------------------------
    def _wanted(self, tag: str | None) -> dict[str, str]:
        """The streams to read now (of one hash tag's slot, on a cluster): new
        announcements while there is room, and each session not backlogged."""
        streams: dict[str, str] = {}
        if (tag is None or tag == slot_tag(self.announcements)) \
                and len(self._owned) < self.settings.worker.max_sessions:
            streams[self.announcements] = ">"
        for stream, owned in self._by_stream.items():
            if (tag is None or slot_tag(stream) == tag) and not owned.ended \
                    and owned.queue.qsize() < _BACKLOG:
                streams[stream] = ">"
        return streams

    async def _read_loop(self, tag: str | None = None) -> None:
        """Read announcements and the owned sessions' audio: on one Redis all in one
        blocking read; on a cluster (a read names keys of one slot) one loop per hash
        tag, i.e. per session bucket (``keys.SESSION_BUCKETS``) with sessions here."""
        await self.ensure_groups()
        await self.alive.wait()  # peers must see our heartbeat before we hold anything
        if tag is None and is_cluster(self.reader):
            tag = slot_tag(self.announcements)
        block_ms = self.settings.redis.block_ms
        if tag is not None and tag != slot_tag(self.announcements):
            # A session adopted into this bucket joins the read only when the current
            # one returns: keep that short.
            block_ms = min(block_ms, BUCKET_BLOCK_MS)
        while not self.stopping.is_set():
            streams = self._wanted(tag)
            if not streams:  # full and every session backlogged: wait for one to drain
                if tag is not None and self._bucket_empty(tag):
                    self._readers.pop(tag, None)  # no session of ours here any more
                    return
                self._wake.clear()
                await wait_event(self._wake, 1.0)
                continue
            replies = await read_group(
                self.reader, self.group, self.consumer, streams,
                self.settings.worker.read_count, block_ms)
            self._note_up()
            for stream, entries in replies:
                if stream == self.announcements:
                    for entry_id, fields in entries:
                        await self._adopt(entry_id, fields, 1)
                    continue
                target = self._by_stream.get(stream)
                for entry in entries:
                    if target is not None:  # else: dropped meanwhile; the entry stays pending
                        target.queue.put_nowait((*entry, 1))

    def _bucket_empty(self, tag: str) -> bool:
        return tag != slot_tag(self.announcements) and not any(
            slot_tag(stream) == tag for stream in self._by_stream)

    def _read_bucket(self, stream: str) -> None:
        """On a cluster: make sure the reader of ``stream``'s bucket runs."""
        if not is_cluster(self.reader) or (tag := slot_tag(stream)) in self._readers:
            return
        self._readers[tag] = asyncio.create_task(
            self._supervise(f"read {tag}", partial(self._read_loop, tag)),
            name=f"{self.consumer}:read {tag}")

    async def _adopt(self, announce_id: str, fields: dict[bytes, bytes] | None,
                     deliveries: int) -> None:
        raw = (fields or {}).get(FIELD, b"")
        try:
            started = decode(raw, max_bytes=self.settings.redis.max_event_bytes)
        except SchemaError as exc:
            await self.dead_letter(self.announcements, announce_id, raw, str(exc), deliveries)
            return
        if not isinstance(started, SessionStarted):
            await self.dead_letter(self.announcements, announce_id, raw,
                                   f"expected session_started, got {started.type}", deliveries,
                                   started)
            return
        if deliveries > self.settings.redis.max_deliveries:
            await self.dead_letter(
                self.announcements, announce_id, raw,
                f"session announced {deliveries} times; its owners keep dying", deliveries,
                started)
            return
        sid = started.session_id
        with log_context(session_id=sid):
            await self._take(sid, started, announce_id, raw)

    async def _take(self, sid: str, started: SessionStarted, announce_id: str,
                    raw: bytes) -> None:
        if sid in self._owned:  # a duplicate announcement of a session we already own
            await self.io(lambda: self.bus.ack(self.announcements, self.group, [announce_id]))
            return
        stream = self.keys.audio(sid)
        await self.bus.ensure_group(stream, self.group, "0")
        owned = _Owned(started, announce_id, raw, stream, self.stage.open(started))
        # Take over whatever a previous owner left pending, in stream order, before
        # reading anything new: that is what keeps the session's order.
        cursor, recovered = "0-0", []
        while True:
            reply = await self.redis.xautoclaim(stream, self.group, self.consumer, 0,
                                                start_id=cursor, count=256)
            recovered.extend(reply[1])
            cursor = as_str(reply[0])
            if cursor == "0-0":
                break
        for entry in await self.pending_deliveries(stream, recovered):
            owned.queue.put_nowait(entry)
        self._owned[sid] = owned
        self._by_stream[stream] = owned
        self._read_bucket(stream)
        owned.task = asyncio.create_task(self._serve(owned), name=f"{self.consumer}:{sid}")
        self.stats["sessions_adopted"] += 1
        log.info("%s: owns session %s%s", self.consumer, sid,
                 f" (took over {len(recovered)} pending entries)" if recovered else "")

    # -- one session, in order ---------------------------------------------
    async def _serve(self, owned: _Owned) -> None:
        with log_context(session_id=owned.started.session_id):
            await self._serve_in_order(owned)

    async def _serve_in_order(self, owned: _Owned) -> None:
        stream = owned.stream
        try:
            while not owned.ended:
                batch = [await owned.queue.get()]
                owned.busy = True
                while not owned.queue.empty() and len(batch) < 256:
                    batch.append(owned.queue.get_nowait())
                done: list[str] = []
                emitted: list[str] = []
                for entry_id, fields, deliveries in batch:
                    if owned.ended:
                        break
                    outcome, event = await self.handle_entry(
                        stream, entry_id, fields, deliveries, owned.handler.handle)
                    written = self.written_by(stream, entry_id)
                    if outcome not in ("acked", "lost"):
                        done.append(entry_id)
                        emitted += written
                    if isinstance(event, SessionEnded):
                        owned.ended = True
                    # A frame that emits nothing never suspends: yield, so a backlog of
                    # frames cannot starve the heartbeat (peers would take the session).
                    await asyncio.sleep(0)
                owned.held += done
                owned.held_emitted += emitted
                if owned.ended or not getattr(owned.handler, "keeps_pending", False):
                    await self._acks.ack(stream, owned.held, owned.held_emitted)
                    owned.held, owned.held_emitted = [], []
                owned.busy = owned.ended  # an ended session stays busy until released
                self._wake.set()
            await self._release(owned)
            self._wake.set()
        except (asyncio.CancelledError, Stopping):
            pass
        except Exception:
            log.exception("%s: session %s failed; leaving it for a peer", self.consumer,
                          owned.started.session_id)
            self._forget(owned)

    async def _release(self, owned: _Owned) -> None:
        """The session ended: close it, ack its announcement, let its keys expire."""
        await owned.handler.close()
        ttl = self.settings.redis.session_ttl_s
        await self.io(lambda: self.bus.ack(self.announcements, self.group, [owned.announce_id]))
        sid = owned.started.session_id
        # The gateway tears the session down too; the shortest TTL wins, in any order.
        await self.io(lambda: self.bus.shorten_ttls({
            owned.stream: min(ttl, 60),  # read to its end: nobody needs it any more
            self.keys.cancelled(sid): ttl, self.keys.out(sid): ttl}))
        self._forget(owned)
        self.stats["sessions_ended"] += 1
        log.info("%s: session %s ended", self.consumer, owned.started.session_id)

    def _forget(self, owned: _Owned) -> None:
        self._owned.pop(owned.started.session_id, None)
        self._by_stream.pop(owned.stream, None)

    # -- leases ------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        """Keep our announcements pending and fresh; drop sessions a peer took over.

        Runs on while stopping, until the sessions are handed back."""
        while True:
            await asyncio.sleep(self.settings.redis.claim_idle_ms / 3000)
            owned = list(self._owned.values())
            kept = await self.leases.renew(self.announcements, self.group, self.consumer,
                                        [o.announce_id for o in owned])
            for lost in (o for o in owned if o.announce_id not in kept):
                if lost.ended:
                    continue
                self.stats["lost_sessions"] += 1
                with log_context(session_id=lost.started.session_id):
                    log.warning("%s: session %s was taken over by a peer; dropping it",
                                self.consumer, lost.started.session_id)
                self._forget(lost)
                if lost.task is not None:
                    lost.task.cancel()
                with contextlib.suppress(Exception):
                    await lost.handler.close()

    async def _reclaim_loop(self) -> None:
        """Adopt the sessions of owners that died (their heartbeat key is gone: at once)
        or stopped renewing their lease (after ``claim_idle_ms``)."""
        await self.ensure_groups()
        cursor, next_sweep = "0-0", 0.0
        while not self.stopping.is_set():
            await self.sleep(self.settings.worker.liveness_ms / 5000 * random.uniform(0.8, 1.2))
            room = self.settings.worker.max_sessions - len(self._owned)
            if room <= 0 or self.stopping.is_set():
                continue
            found = await self.claim_from_dead(self.announcements, min(room, 16))
            if not found and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.settings.redis.claim_idle_ms / 2000
                reply = await self.leases.redis.xautoclaim(
                    self.announcements, self.group, self.consumer,
                    self.settings.redis.claim_idle_ms, start_id=cursor, count=min(room, 16))
                cursor, found = as_str(reply[0]), reply[1]
            mine = {o.announce_id for o in self._owned.values()}
            claimed = [e for e in found if e is None or as_str(e[0]) not in mine]
            for entry_id, fields, deliveries in await self.pending_deliveries(
                    self.announcements, claimed):
                self.stats["sessions_reclaimed"] += 1
                await self._adopt(entry_id, fields, deliveries)

    # -- stopping ----------------------------------------------------------
    async def drain(self) -> None:
        """Finish what was already read for each session (ended ones: until released)."""
        while any(o.busy or not o.queue.empty() for o in self._owned.values()):
            self._wake.clear()
            await wait_event(self._wake, 0.1)

    async def on_stopped(self) -> None:
        """Hand each live session back to the group at once, for a peer to adopt."""
        for reader in self._readers.values():
            reader.cancel()
        await asyncio.gather(*self._readers.values(), return_exceptions=True)
        for owned in list(self._owned.values()):
            if owned.task is not None:
                owned.task.cancel()
                await asyncio.gather(owned.task, return_exceptions=True)
            with contextlib.suppress(Exception):
                await owned.handler.close()
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(self.announcements, self.group, owned.announce_id)
            pipe.xadd(self.announcements, {FIELD: owned.announce_raw},
                      maxlen=self.bus.maxlen_for(self.announcements), approximate=True)
            with contextlib.suppress(*IO_ERRORS):
                await pipe.execute()
                log.info("%s: handed session %s back", self.consumer, owned.started.session_id)
            with contextlib.suppress(*IO_ERRORS):
                await self.remove_own_consumer(owned.stream)
        await self.remove_own_consumer(self.announcements)

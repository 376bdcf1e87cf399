"""``JobWorker``: a work-queue consumer, any free worker takes the next job.

A stage's queue may be sharded (``redis.queue_shards``): a session's jobs always go
to one shard (``Keys.job_queue``), so they keep their order, and each worker reads
every shard. On a Redis Cluster the shards are different keys on different slots,
so one stage's traffic is not one hot key on one master.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial

from workers.runtime.bus import as_str, read_group
from workers.runtime.contract import JobStage, RuntimeSettings
from workers.runtime.retry import Stopping
from workers.runtime.worker import Worker

log = logging.getLogger(__name__)

InFlight = tuple[str, str]  # (shard stream, entry id): ids are unique per stream only


class JobWorker(Worker):
    """A work-queue consumer: any free worker takes the next job from the stage's queue."""

    def __init__(self, stage: JobStage, settings: RuntimeSettings, consumer: str | None = None,
                 *, span: str | None = None):
        super().__init__(stage.name, settings, consumer)
        self.span_name = span
        self.stage = stage
        self.queues = self.keys.queues(stage.name)
        self.capacity = stage.concurrency or settings.worker.concurrency
        self._in_flight: dict[InFlight, asyncio.Task[None]] = {}
        # Each shard's reader fetches up to the free capacity, so with several shards a
        # worker can hold a few more jobs than it handles at once: those wait here for a
        # slot (their leases are kept) rather than run past the stage's concurrency.
        self._slots = asyncio.Semaphore(self.capacity)
        self._slot_free = asyncio.Event()

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        per_shard: dict[str, Callable[[], Awaitable[None]]] = {}
        for queue in self.queues:
            per_shard[f"read {queue}"] = partial(self._read_loop, queue)
            per_shard[f"lease {queue}"] = partial(self._lease_loop, queue)
            per_shard[f"reclaim {queue}"] = partial(self._reclaim_loop, queue)
        return {**per_shard, **super().loops()}

    def streams_to_tidy(self) -> list[str]:
        return list(self.queues)

    async def ensure_groups(self) -> None:
        for queue in self.queues:
            await self.bus.ensure_group(queue, self.group)
            # Visible to `voicebus status` at once, not only after its first job.
            await self.redis.xgroup_createconsumer(queue, self.group, self.consumer)

    @property
    def free(self) -> int:
        return self.capacity - len(self._in_flight)

    async def _read_loop(self, queue: str) -> None:
        await self.ensure_groups()
        await self.alive.wait()  # peers must see our heartbeat before we hold anything
        while not self.stopping.is_set():
            if self.free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            replies = await read_group(self.reader, self.group, self.consumer,
                                       {queue: ">"}, self.free, self.settings.redis.block_ms)
            self._note_up()
            for _stream, entries in replies:
                for entry_id, fields in entries:
                    self._start(queue, entry_id, fields, 1)

    def _start(self, queue: str, entry_id: str, fields: dict[bytes, bytes] | None,
               deliveries: int) -> None:
        if (queue, entry_id) in self._in_flight:
            return
        task = asyncio.create_task(self._process(queue, entry_id, fields, deliveries))
        self._in_flight[queue, entry_id] = task

    async def _process(self, queue: str, entry_id: str, fields: dict[bytes, bytes] | None,
                       deliveries: int) -> None:
        try:
            async with self._slots:
                outcome, _ = await self.handle_entry(
                    queue, entry_id, fields, deliveries, self.stage.handle, self.stage.accepts)
            dedup = self.written_by(queue, entry_id)
            if outcome not in ("acked", "lost"):
                await self.io(lambda: self.bus.ack(queue, self.group, [entry_id], dedup))
        except (asyncio.CancelledError, Stopping):
            self.stats["left_pending"] += 1
        except Exception:  # a bug in the runtime itself: keep serving, the entry stays pending
            log.exception("%s: unexpected error on %s", self.consumer, entry_id)
        finally:
            self.written.pop((queue, entry_id), None)
            self._in_flight.pop((queue, entry_id), None)
            self._slot_free.set()

    def _held(self, queue: str) -> list[str]:
        return [entry_id for shard, entry_id in self._in_flight if shard == queue]

    async def _lease_loop(self, queue: str) -> None:
        """Renew our claim on in-flight entries so peers do not take them (also while
        draining on shutdown, until cancelled)."""
        while True:
            await asyncio.sleep(self.settings.redis.claim_idle_ms / 3000)
            ids = self._held(queue)
            kept = await self.leases.renew(queue, self.group, self.consumer, ids)
            for entry_id in set(ids) - kept:
                task = self._in_flight.get((queue, entry_id))
                if task is not None and not task.done():
                    self.stats["lost_leases"] += 1
                    log.warning("%s: lost the lease on %s to a peer; abandoning it",
                                self.consumer, entry_id)
                    task.cancel()

    async def _reclaim_loop(self, queue: str) -> None:
        """Take over entries left pending by consumers that died: at once when their
        heartbeat is gone, else (a consumer alive but stuck) after ``claim_idle_ms``."""
        await self.ensure_groups()
        cursor, next_sweep = "0-0", 0.0
        while not self.stopping.is_set():
            await self.sleep(self.settings.worker.liveness_ms / 5000 * random.uniform(0.8, 1.2))
            if self.free <= 0 or self.stopping.is_set():
                continue
            found = await self.claim_from_dead(queue, self.free)
            if not found and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.settings.redis.claim_idle_ms / 2000
                reply = await self.leases.redis.xautoclaim(
                    queue, self.group, self.consumer, self.settings.redis.claim_idle_ms,
                    start_id=cursor, count=self.free)
                cursor, found = as_str(reply[0]), reply[1]
            held = set(self._held(queue))
            claimed = [e for e in found if e is None or as_str(e[0]) not in held]
            for entry_id, fields, deliveries in await self.pending_deliveries(queue, claimed):
                self.stats["reclaimed"] += 1
                log.info("%s: reclaimed %s (delivery %d)", self.consumer, entry_id, deliveries)
                self._start(queue, entry_id, fields, deliveries)

    async def drain(self) -> None:
        while self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def on_stopped(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        for queue in self.queues:
            await self.remove_own_consumer(queue)

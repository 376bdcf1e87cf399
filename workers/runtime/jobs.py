"""``JobWorker``: a work-queue consumer, any free worker takes the next job."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from workers.runtime.bus import as_str, read_group
from workers.runtime.contract import JobStage, RuntimeSettings
from workers.runtime.retry import Stopping
from workers.runtime.worker import Worker

log = logging.getLogger(__name__)


class JobWorker(Worker):
    """A work-queue consumer: any free worker takes the next job from the stage's queue."""

    def __init__(self, stage: JobStage, settings: RuntimeSettings, consumer: str | None = None,
                 *, span: str | None = None):
        super().__init__(stage.name, settings, consumer)
        self.span_name = span
        self.stage = stage
        self.queue = self.keys.queue(stage.name)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._slot_free = asyncio.Event()

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {"read": self._read_loop, "lease": self._lease_loop,
                "reclaim": self._reclaim_loop, **super().loops()}

    def streams_to_tidy(self) -> list[str]:
        return [self.queue]

    async def ensure_groups(self) -> None:
        await self.bus.ensure_group(self.queue, self.group)
        # Visible to `voicebus status` at once, not only after its first job.
        await self.redis.xgroup_createconsumer(self.queue, self.group, self.consumer)

    @property
    def free(self) -> int:
        return (self.stage.concurrency or self.settings.worker.concurrency) - len(self._in_flight)

    async def _read_loop(self) -> None:
        await self.ensure_groups()
        await self.alive.wait()  # peers must see our heartbeat before we hold anything
        while not self.stopping.is_set():
            if self.free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            replies = await read_group(self.reader, self.group, self.consumer,
                                       {self.queue: ">"}, self.free, self.settings.redis.block_ms)
            self._note_up()
            for _stream, entries in replies:
                for entry_id, fields in entries:
                    self._start(entry_id, fields, 1)

    def _start(self, entry_id: str, fields: dict[bytes, bytes] | None, deliveries: int) -> None:
        if entry_id in self._in_flight:
            return
        task = asyncio.create_task(self._process(entry_id, fields, deliveries))
        self._in_flight[entry_id] = task

    async def _process(self, entry_id: str, fields: dict[bytes, bytes] | None,
                       deliveries: int) -> None:
        try:
            outcome, _ = await self.handle_entry(
                self.queue, entry_id, fields, deliveries, self.stage.handle, self.stage.accepts)
            if outcome not in ("acked", "lost"):
                emitted = [entry_id] if outcome == "emitted" else []
                await self.io(lambda: self.bus.ack(self.queue, self.group, [entry_id], emitted))
        except (asyncio.CancelledError, Stopping):
            self.stats["left_pending"] += 1
        except Exception:  # a bug in the runtime itself: keep serving, the entry stays pending
            log.exception("%s: unexpected error on %s", self.consumer, entry_id)
        finally:
            self._in_flight.pop(entry_id, None)
            self._slot_free.set()

    async def _lease_loop(self) -> None:
        """Renew our claim on in-flight entries so peers do not take them (also while
        draining on shutdown, until cancelled)."""
        while True:
            await asyncio.sleep(self.settings.redis.claim_idle_ms / 3000)
            ids = list(self._in_flight)
            kept = await self.leases.renew(self.queue, self.group, self.consumer, ids)
            for entry_id in set(ids) - kept:
                task = self._in_flight.get(entry_id)
                if task is not None and not task.done():
                    self.stats["lost_leases"] += 1
                    log.warning("%s: lost the lease on %s to a peer; abandoning it",
                                self.consumer, entry_id)
                    task.cancel()

    async def _reclaim_loop(self) -> None:
        """Take over entries left pending by consumers that died: at once when their
        heartbeat is gone, else (a consumer alive but stuck) after ``claim_idle_ms``."""
        await self.ensure_groups()
        cursor, next_sweep = "0-0", 0.0
        while not self.stopping.is_set():
            await self.sleep(self.settings.worker.liveness_ms / 5000 * random.uniform(0.8, 1.2))
            if self.free <= 0 or self.stopping.is_set():
                continue
            found = await self.claim_from_dead(self.queue, self.free)
            if not found and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.settings.redis.claim_idle_ms / 2000
                reply = await self.leases.redis.xautoclaim(
                    self.queue, self.group, self.consumer, self.settings.redis.claim_idle_ms,
                    start_id=cursor, count=self.free)
                cursor, found = as_str(reply[0]), reply[1]
            claimed = [e for e in found if e is None or as_str(e[0]) not in self._in_flight]
            for entry_id, fields, deliveries in await self.pending_deliveries(self.queue, claimed):
                self.stats["reclaimed"] += 1
                log.info("%s: reclaimed %s (delivery %d)", self.consumer, entry_id, deliveries)
                self._start(entry_id, fields, deliveries)

    async def drain(self) -> None:
        while self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def on_stopped(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        await self.remove_own_consumer(self.queue)

"""The worker runtime: every stage runs inside it; no stage writes its own read loop.

A stage is a handler: it takes one decoded event and yields the events it
causes (``Emit``). The runtime owns everything else:

* reading with ``XREADGROUP`` only as many entries as it has free capacity for;
* writing the handler's outputs (each exactly once, see ``workers.runtime.bus``) and
  ``XACK``-ing an entry only after its outputs are written;
* retrying a handler that raised, then dead-lettering the entry with the reason;
  dead-lettering entries that do not decode or were delivered too many times;
* renewing the lease on its in-flight entries, and reclaiming (``XAUTOCLAIM``)
  the entries of consumers that died;
* the cancel lane, trimming, consumer clean-up, reconnecting with back-off, and
  graceful shutdown (stop reading, finish within a grace period, leave the rest
  pending for a peer).

Two ways to consume: ``JobWorker`` (``workers.runtime.jobs``) for work-queue stages where any
free worker takes the next job, and ``SessionWorker`` (``workers.runtime.sessions``) for
stages that must see a session's events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from workers.runtime import janitor
from workers.runtime.bus import Bus, consumer_name
from workers.runtime.cancel import CancelLane
from workers.runtime.connection import connect
from workers.runtime.contract import RuntimeSettings
from workers.runtime.handling import IO_ERRORS, EntryHandling
from workers.runtime.keys import Keys
from workers.runtime.retry import Backoff, Stopping, wait_event

log = logging.getLogger(__name__)
T = TypeVar("T")

class Worker(EntryHandling):
    """What both consumption modes share. Subclasses provide the loops."""

    # A handler that raises is run again on the same event, up to
    # ``handler_attempts`` times, unless it keeps state across events (see sessions).
    retries_handlers = True

    def __init__(self, name: str, settings: RuntimeSettings, consumer: str | None = None) -> None:
        self.name = self.group = name
        # The span opened around each turn event's handling (the stage registry's), or None.
        self.span_name: str | None = None
        self.settings = settings
        self.consumer = consumer or consumer_name(name)
        self.keys = Keys.of(settings.redis)
        self.redis = connect(settings.url)
        self.reader = connect(settings.url, blocking_ms=settings.redis.block_ms)
        self._control_reader = connect(settings.url, blocking_ms=settings.redis.block_ms)
        self.bus = Bus(self.redis, self.keys, settings.redis.maxlen.model_dump(),
                       session_stream_ttl_ms=settings.session_streams_ttl_s * 1000,
                       out_keep_ms=int(settings.redis.out_keep_s * 1000))
        # Leases and reclaiming get their own connections: a heartbeat must never
        # queue behind hundreds of sessions' acks, or peers would think us dead.
        self._lease_client = connect(settings.url)
        self.leases = Bus(self._lease_client, self.keys, settings.redis.maxlen.model_dump())
        self.cancel = CancelLane(self.bus, settings.redis.session_ttl_s)
        self.stopping = asyncio.Event()
        self.stats: Counter[str] = Counter()
        self._give_up = asyncio.Event()  # set when the grace period is over
        self.alive = asyncio.Event()  # our heartbeat key exists: we may take work
        self._down_since: float | None = None
        # (input stream, entry id) -> the dedup hashes its outputs were written under.
        self.written: dict[tuple[str, str], set[str]] = {}

    # -- lifecycle -------------------------------------------------------
    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping (finishing in-flight work)", self.consumer)
        self.stopping.set()

    async def run(self, *, install_signals: bool = False) -> None:
        if install_signals:
            self._install_signals()
        log.info("%s: started (group %s, prefix %s)", self.consumer, self.group, self.keys.prefix)
        background = [
            asyncio.create_task(self._supervise(name, loop), name=f"{self.consumer}:{name}")
            for name, loop in self.loops().items()
        ]
        try:
            await self.stopping.wait()
            await self._finish_in_flight()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            with contextlib.suppress(*IO_ERRORS, ResponseError):
                await self.on_stopped()
            for client in (self.redis, self.reader, self._control_reader, self._lease_client):
                await client.aclose()
            log.info("%s: stopped; %s", self.consumer, dict(self.stats) or "nothing handled")

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {
            "cancel-lane": lambda: self.cancel.watch(
                self._control_reader, self.settings.redis.block_ms, self.stopping
            ),
            "janitor": self._janitor_loop,
            "liveness": self._liveness_loop,
        }

    async def _liveness_loop(self) -> None:
        """Keep our liveness key: when it expires (the process died or froze), peers
        take our pending work at once instead of after ``claim_idle_ms``. Runs until
        cancelled, after the drain; then the key goes."""
        key, ttl = self.keys.alive(self.consumer), self.settings.worker.liveness_ms
        try:
            while True:
                await self.leases.redis.set(key, 1, px=ttl)
                self.alive.set()
                await asyncio.sleep(ttl / 5000)
        finally:
            with contextlib.suppress(*IO_ERRORS, asyncio.CancelledError):
                await self.leases.redis.delete(key)

    async def _finish_in_flight(self) -> None:
        try:
            await asyncio.wait_for(self.drain(), self.settings.worker.shutdown_grace_s)
        except TimeoutError:
            log.warning("%s: grace period over; unfinished work stays pending for a peer",
                        self.consumer)
        self._give_up.set()

    async def drain(self) -> None:
        """Wait until in-flight work is done (called once reading has stopped)."""

    async def on_stopped(self) -> None:
        """Hand back what is left and remove our consumer where it holds nothing."""

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stopping.is_set():  # a second signal: stop waiting for in-flight work
            self._give_up.set()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        self.request_stop()

    # -- resilience ------------------------------------------------------
    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop until it returns: back off while Redis is away, never die of an error.

        Loops that feed new work return once stopping; those that keep in-flight
        work safe (leases, acks) run until they are cancelled after the drain.
        """
        backoff = Backoff()
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Stopping:
                return  # shutdown gave up on Redis: nothing left to do
            except IO_ERRORS as exc:
                self._note_down(name, exc)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: recreate our groups
                    log.warning("%s: %s: consumer group missing, recreating", self.consumer, name)
                    with contextlib.suppress(*IO_ERRORS):
                        await self.ensure_groups()
                else:
                    log.exception("%s: %s loop failed", self.consumer, name)
            except Exception:
                log.exception("%s: %s loop failed", self.consumer, name)
            if time.monotonic() - started > 2 * backoff.cap:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    def _note_down(self, where: str, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("%s: Redis unreachable (%s: %s); retrying with back-off",
                        self.consumer, where, exc)
        self.stats["redis_errors"] += 1

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.info("%s: Redis reachable again after %.1f s", self.consumer,
                     time.monotonic() - self._down_since)
            self._down_since = None

    async def io(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis write, retrying through an outage until it succeeds.

        Gives up (``Stopping``) only once shutdown's grace period is over; the
        entry then stays pending and a peer redoes it.
        """
        backoff = Backoff()
        while True:
            try:
                result = await op()
                self._note_up()
                return result
            except IO_ERRORS as exc:
                self._note_down("write", exc)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_groups()
                continue
            if self._give_up.is_set():
                raise Stopping
            await wait_event(self._give_up, backoff.next())

    async def ensure_groups(self) -> None:
        """Create the consumer groups this worker reads (idempotent)."""

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when stopping."""
        await wait_event(self.stopping, seconds)

    # -- housekeeping ----------------------------------------------------
    def streams_to_tidy(self) -> list[str]:
        return []

    async def _janitor_loop(self) -> None:
        while not self.stopping.is_set():
            await self.sleep(self.settings.worker.janitor_interval_s * random.uniform(0.8, 1.2))
            for stream in self.streams_to_tidy():
                trimmed = await janitor.trim_consumed(self.redis, stream)
                self.stats["trimmed"] += trimmed
                await janitor.remove_idle_consumers(
                    self.redis, self.keys, stream, self.group,
                    self.settings.redis.consumer_gc_idle_s, keep=self.consumer,
                    dead_after_ms=2 * self.settings.worker.liveness_ms)

    async def claim_from_dead(self, stream: str, count: int) -> list[Any]:
        """Pending entries of consumers whose process is gone, now ours (``count`` at
        most), as ``XCLAIM`` replies them."""
        return await janitor.claim_from_dead(
            self.leases.redis, self.keys, stream, self.group, self.consumer, count,
            min_idle_ms=self.settings.worker.liveness_ms // 5)

    async def remove_own_consumer(self, stream: str) -> None:
        """On shutdown: leave no consumer behind unless it still holds work."""
        await janitor.remove_consumer_if_idle(self.redis, stream, self.group, self.consumer)



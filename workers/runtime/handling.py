"""Handling one entry, the part of the worker runtime (``workers.runtime.worker``) that
runs a stage's handler: decode and check the entry, skip a cancelled turn, open the
stage's span, run the handler (retried when it raises, not when Redis is away), write
each output once and only while the entry is still ours, dead-letter what cannot be
handled."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from opentelemetry.trace import SpanKind
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas import DeadLetter, Event, SchemaError, TurnEvent, decode
from workers.observability import metrics, semconv, telemetry
from workers.observability.logs import log_context
from workers.runtime.bus import FIELD, Bus, LeaseLost, as_str
from workers.runtime.cancel import CancelLane
from workers.runtime.contract import Context, Handler, Outcome, RuntimeSettings
from workers.runtime.keys import Keys
from workers.runtime.retry import Backoff, Stopping, wait_event

log = logging.getLogger("workers.runtime.worker")
T = TypeVar("T")

# Errors that mean "Redis is not reachable right now": wait and try again. On a cluster
# that includes a slot whose master is failing over (CLUSTERDOWN, TRYAGAIN, no node
# serving the slot yet).
IO_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError,
             ClusterDownError, TryAgainError, SlotNotCoveredError)



class EntryHandling:
    """What ``Worker`` does with one entry; the attributes are the worker's."""

    name: str
    group: str
    consumer: str
    span_name: str | None
    retries_handlers: bool
    settings: RuntimeSettings
    keys: Keys
    bus: Bus
    cancel: CancelLane
    stats: Counter[str]
    written: dict[tuple[str, str], set[str]]  # (stream, entry id) -> dedup hashes written
    _give_up: asyncio.Event

    async def io(self, op: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def _note_down(self, where: str, exc: BaseException) -> None:
        raise NotImplementedError

    async def handle_entry(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes] | None, deliveries: int,
        handler: Handler, accepts: tuple[type[Event], ...] = (),
    ) -> tuple[Outcome, Event | None]:
        """Decode, check, run the handler with retries, write its outputs.

        Does not ack (callers batch acks), except for entries it dead-letters: those that
        do not decode and events of a type not in ``accepts`` (when it is not empty).
        """
        raw = (fields or {}).get(FIELD, b"")
        try:
            event = decode(raw, max_bytes=self.settings.redis.max_event_bytes)
        except SchemaError as exc:
            await self.dead_letter(stream, entry_id, raw, str(exc), deliveries)
            return "acked", None
        if accepts and not isinstance(event, accepts):
            takes = ", ".join(sorted(str(t.__struct_config__.tag) for t in accepts))
            reason = f"the {self.name} stage does not handle {event.type} events (it takes {takes})"
            await self.dead_letter(stream, entry_id, raw, reason, deliveries, event)
            return "acked", event
        if deliveries > self.settings.redis.max_deliveries:
            reason = (f"delivered {deliveries} times (limit {self.settings.redis.max_deliveries}); "
                      "it may crash the workers that take it")
            await self.dead_letter(stream, entry_id, raw, reason, deliveries, event)
            return "acked", event
        with log_context(session_id=event.session_id,
                         turn_id=getattr(event, "turn_id", None)):
            if isinstance(event, TurnEvent) and await self.io(
                lambda: self.cancel.is_cancelled(event.session_id, event.turn_id)
            ):
                self.stats["skipped_cancelled"] += 1
                log.info("skipping %s of a cancelled turn", event.type)
                return "cancelled", event
            return await self._run_handler(stream, entry_id, raw, deliveries, event, handler)

    async def _run_handler(
        self, stream: str, entry_id: str, raw: bytes, deliveries: int, event: Event,
        handler: Handler,
    ) -> tuple[Outcome, Event | None]:
        span_name = self.span_name
        if span_name is None or not isinstance(event, TurnEvent):
            return await self._attempt_inner(stream, entry_id, raw, deliveries, event, handler)
        # The stage's span, a child of the turn's root span named by the event's trace
        # context (also when this worker reclaimed the entry from one that died).
        with telemetry.tracer().start_as_current_span(
                span_name, context=telemetry.parent_of(event.traceparent, event.tracestate),
                kind=SpanKind.CONSUMER, attributes={
                    semconv.STAGE: self.name, semconv.CONSUMER: self.consumer,
                    semconv.DELIVERIES: deliveries, semconv.SESSION_ID: event.session_id,
                    semconv.TURN_ID: event.turn_id}) as span:
            outcome, handled = await self._attempt_inner(stream, entry_id, raw, deliveries,
                                                         event, handler)
            span.set_attribute(semconv.OUTCOME, outcome)
            return outcome, handled

    async def _attempt_inner(
        self, stream: str, entry_id: str, raw: bytes, deliveries: int, event: Event,
        handler: Handler,
    ) -> tuple[Outcome, Event | None]:
        try:
            return await self._attempt_handler(stream, entry_id, raw, deliveries, event, handler)
        finally:
            if isinstance(event, TurnEvent):  # drop the turn's cancel waiter, if one was made
                self.cancel.release(event.session_id, event.turn_id)

    async def _attempt_handler(
        self, stream: str, entry_id: str, raw: bytes, deliveries: int, event: Event,
        handler: Handler,
    ) -> tuple[Outcome, Event | None]:
        attempts = self.settings.redis.handler_attempts if self.retries_handlers else 1
        attempt, outage = 0, Backoff()
        while attempt < attempts:
            attempt += 1
            ctx = Context(self.bus, self.cancel, self.consumer, stream, entry_id, deliveries, event,
                          attempt)
            ordinal, checked = 0, None
            written = self.written.setdefault((stream, entry_id), set())
            try:
                async for out in handler(event, ctx):
                    if self.bus.cluster and (checked is None or time.monotonic() - checked
                                             > self.settings.worker.liveness_ms / 2000):
                        await self._still_ours(stream, entry_id)
                        checked = time.monotonic()
                    written.add(self.keys.dedup(out.stream, self.group, stream, entry_id))
                    await self.io(lambda o=out, n=ordinal: self.bus.emit(  # type: ignore[misc]
                        stream, self.group, self.consumer, entry_id, n, o.stream, o.event,
                        deliveries))
                    ordinal += 1
                self.stats["handled"] += 1
                return ("emitted" if ordinal else "handled"), event
            except (asyncio.CancelledError, Stopping):
                raise
            except LeaseLost:
                self.stats["lost_leases"] += 1
                log.warning("%s: lost %s to a peer (frozen past its lease?); "
                            "its output is not written", self.consumer, entry_id)
                return "lost", event
            except Exception as exc:
                if self.retries_handlers and isinstance(exc, IO_ERRORS):
                    # Redis away (an outage, a cluster failover): not the handler's
                    # failure. Do not spend an attempt on it; try again once Redis
                    # answers. (A stateful handler is never run twice: as any error.)
                    self._note_down("handler", exc)
                    if self._give_up.is_set():
                        raise Stopping from exc
                    attempt -= 1
                    await wait_event(self._give_up, outage.next())
                    continue
                self.stats["handler_errors"] += 1
                if attempt == attempts:
                    log.exception("handler failed %d times on %s %s; dead-lettering",
                                  attempts, event.type, entry_id)
                    reason = f"handler raised {type(exc).__name__}: {exc} ({attempts} attempts)"
                    await self.dead_letter(stream, entry_id, raw, reason, deliveries, event)
                    return "acked", event
                log.warning("handler raised on %s %s (attempt %d/%d): %r",
                            event.type, entry_id, attempt, attempts, exc)
                await self.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def _still_ours(self, stream: str, entry_id: str) -> None:
        """On a cluster the write script cannot see the input entry (another slot): so
        before a handling's first write, and after any gap longer than half a heartbeat
        (the process may have been frozen), check the entry is still pending to us."""
        if await self.io(lambda: self.bus.holder(stream, self.group, entry_id)) != self.consumer:
            raise LeaseLost(f"{entry_id} on {stream} is no longer {self.consumer}'s")

    def written_by(self, stream: str, entry_id: str) -> list[str]:
        """The dedup hashes an entry's handling wrote (its ack drops them); forgotten here."""
        return sorted(self.written.pop((stream, entry_id), ()))

    async def dead_letter(self, stream: str, entry_id: str, raw: bytes, reason: str,
                          deliveries: int, event: Event | None = None) -> None:
        self.stats["dead_lettered"] += 1
        metrics.dead_letters.add(1, {"stream": self.keys.kind(stream) or "other"})
        log.warning("dead-lettering %s %s: %s", stream, entry_id, reason)
        letter = DeadLetter(
            session_id=event.session_id if event else "",
            stream=stream, entry_id=entry_id, group=self.group, consumer=self.consumer,
            reason=reason[:1024], deliveries=deliveries, payload=bytes(raw[:65_536]),
        )
        dedup = self.written_by(stream, entry_id)
        await self.io(lambda: self.bus.dead_letter(stream, self.group, entry_id, letter, dedup))

    async def pending_deliveries(self, stream: str,
                                 entries: list[Any]) -> list[tuple[str, Any, int]]:
        """Claimed entries with their delivery counts; entries trimmed away are skipped."""
        live = [(as_str(e[0]), e[1]) for e in entries if e is not None]
        if len(live) < len(entries):
            log.warning("%s: %d claimed entries of %s were already trimmed", self.consumer,
                        len(entries) - len(live), stream)
        counts = await self.bus.deliveries(stream, self.group, [i for i, _ in live])
        return [(i, f, counts.get(i, 1)) for i, f in live]

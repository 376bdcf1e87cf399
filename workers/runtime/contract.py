"""The stage contract: a handler takes one decoded event and its ``Context`` and
yields ``Emit``s; ``JobStage`` names a work-queue stage; ``RuntimeSettings`` is what a
worker runs with. Everything else about consuming is the runners' (``worker``,
``jobs``, ``sessions``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import redis.asyncio as aioredis

from schemas import DEFAULT_MAX_EVENT_BYTES, Event, TurnEvent
from workers.config import Config
from workers.runtime.keys import Keys

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Emit:
    """One output of a handler: ``event`` is appended to ``stream``."""

    stream: str
    event: Event


@dataclass(frozen=True)
class RuntimeSettings:
    url: str
    prefix: str = "vb"
    claim_idle_ms: int = 5_000
    block_ms: int = 1_000
    max_deliveries: int = 5
    handler_attempts: int = 3
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    consumer_gc_idle_s: float = 600.0
    session_ttl_s: int = 3_600
    session_streams_ttl_s: int = 7_200
    maxlen: Mapping[str, int] = field(default_factory=dict)
    concurrency: int = 4
    max_sessions: int = 1_000
    shutdown_grace_s: float = 10.0
    janitor_interval_s: float = 10.0
    liveness_ms: int = 1_500
    read_count: int = 8

    @classmethod
    def from_config(cls, config: Config, url: str) -> RuntimeSettings:
        r, w = config.redis, config.worker
        return cls(
            url=url,
            prefix=r.key_prefix,
            claim_idle_ms=r.claim_idle_ms,
            block_ms=r.block_ms,
            max_deliveries=r.max_deliveries,
            handler_attempts=r.handler_attempts,
            max_event_bytes=r.max_event_bytes,
            consumer_gc_idle_s=r.consumer_gc_idle_s,
            session_ttl_s=r.session_ttl_s,
            session_streams_ttl_s=config.session_streams_ttl_s(),
            maxlen=r.maxlen.model_dump(),
            concurrency=w.concurrency,
            max_sessions=w.max_sessions,
            read_count=w.read_count,
            shutdown_grace_s=w.shutdown_grace_s,
            janitor_interval_s=w.janitor_interval_s,
            liveness_ms=w.liveness_ms,
        )


class BusView(Protocol):
    """What a handler sees of the bus (``workers.runtime.bus.Bus`` in a worker): the key
    names, and Redis for the state a stage keeps there (memory, caches, markers)."""

    @property
    def keys(self) -> Keys: ...

    @property
    def redis(self) -> aioredis.Redis: ...


class CancelView(Protocol):
    """What a handler sees of the cancel lane (``workers.runtime.cancel.CancelLane``)."""

    def is_cancelled_local(self, session_id: str, turn_id: str) -> bool: ...

    def reason(self, session_id: str, turn_id: str) -> str | None: ...

    def waiter(self, session_id: str, turn_id: str) -> asyncio.Event: ...

    async def cancel(self, session_id: str, turn_id: str, reason: str = "") -> None: ...


@dataclass
class Context:
    """What a handler may use while it handles one entry. The runtime gives it the real
    bus and cancel lane; a handler test can give it in-memory ones (``tests/support/
    handlers.py``), since a handler touches nothing else."""

    bus: BusView
    cancel: CancelView
    consumer: str
    stream: str
    entry_id: str
    deliveries: int
    event: Event

    @property
    def keys(self) -> Keys:
        return self.bus.keys

    def cancelled(self) -> bool:
        """Has this event's turn been cancelled? Local, no I/O: check between chunks."""
        event = self.event
        return isinstance(event, TurnEvent) and self.cancel.is_cancelled_local(
            event.session_id, event.turn_id
        )

    def cancel_reason(self) -> str | None:
        """Why this event's turn was cancelled ("barge-in", "continued", ...), or None."""
        event = self.event
        if not isinstance(event, TurnEvent):
            return None
        return self.cancel.reason(event.session_id, event.turn_id)

    def cancel_event(self) -> asyncio.Event:
        """Set when this event's turn is cancelled: race a long model call against it."""
        event = self.event
        if not isinstance(event, TurnEvent):
            return asyncio.Event()  # never set: only turns can be cancelled
        return self.cancel.waiter(event.session_id, event.turn_id)


Handler = Callable[[Event, Context], AsyncIterator[Emit]]


@dataclass(frozen=True)
class JobStage:
    """A work-queue stage: ``handle`` is called for every event on ``keys.queue(name)``."""

    name: str
    handle: Handler
    # The event types it handles; anything else on its queue is dead-lettered with the
    # reason (a producer's bug must show, not vanish). Empty: every type.
    accepts: tuple[type[Event], ...] = ()
    # Jobs at once in one process; None: ``worker.concurrency``. A model that runs one
    # inference at a time (ASR) wants 1, and more processes to scale.
    concurrency: int | None = None


# What became of an entry: "acked" (dead-lettered, already acked), "emitted" (handled
# and wrote outputs), "handled" (no outputs), "cancelled" (its turn was cancelled),
# "lost" (a peer took it over: not ours to ack).
Outcome = Literal["acked", "emitted", "handled", "cancelled", "lost"]



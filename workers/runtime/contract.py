"""The stage contract: a handler takes one decoded event and its ``Context`` and
yields ``Emit``s; ``JobStage`` names a work-queue stage; ``RuntimeSettings`` is what a
worker runs with. Everything else about consuming is the runners' (``worker``,
``jobs``, ``sessions``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import redis.asyncio as aioredis

from schemas import Event, TurnEvent
from workers.config import Config, RedisConfig, WorkerConfig
from workers.runtime.keys import Keys

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Emit:
    """One output of a handler: ``event`` is appended to ``stream``."""

    stream: str
    event: Event


@dataclass(frozen=True)
class RuntimeSettings:
    """What a worker runs with: the config's ``redis`` and ``worker`` sections (their
    defaults and checks are the config's), the Redis URL it resolved, and how long a
    session's streams live (``Config.session_streams_ttl_s``)."""

    url: str
    redis: RedisConfig = field(default_factory=RedisConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    session_streams_ttl_s: int = field(
        default_factory=lambda: Config().session_streams_ttl_s())

    @classmethod
    def from_config(cls, config: Config, url: str) -> RuntimeSettings:
        return cls(url, config.redis, config.worker, config.session_streams_ttl_s())


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
    attempt: int = 1  # this process's try at the entry (in-process retries count up)

    @property
    def keys(self) -> Keys:
        return self.bus.keys

    @property
    def handled_before(self) -> bool:
        """Was this entry handled before, here or by a dead peer? Its outputs written
        then are already out (the runtime writes each output ordinal once)."""
        return self.deliveries > 1 or self.attempt > 1

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
    """A work-queue stage: ``handle`` is called for every event on its queue's
    shards (``keys.queues(name)``)."""

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



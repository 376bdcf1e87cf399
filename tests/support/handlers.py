"""The fast tier: a stage's handler run on a list of events, in memory.

No Redis and no processes: the handler gets a ``Context`` whose cancel lane lives in
memory and whose bus has the real key names but no Redis (a handler that reaches for
Redis fails loudly here: test it in the bus tier, through a real redis-server). What
the handler yields is collected in order, as the runtime would write it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas import Event
from workers.runtime import Context, Emit, Handler
from workers.runtime.keys import Keys


class NoRedis:
    """Any use is a test error: this handler is not for the fast tier."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the handler used Redis ({name}): test it through a real "
                             "redis-server, not in the fast tier")


@dataclass
class MemoryBus:
    keys: Keys = field(default_factory=Keys)
    redis: Any = field(default_factory=NoRedis)


class MemoryCancels:
    """The cancel lane's local view, with cancels made by the test (or the handler)."""

    def __init__(self) -> None:
        self.cancelled: dict[tuple[str, str], str] = {}
        self._waiters: dict[tuple[str, str], asyncio.Event] = {}

    def is_cancelled_local(self, session_id: str, turn_id: str) -> bool:
        return (session_id, turn_id) in self.cancelled

    def reason(self, session_id: str, turn_id: str) -> str | None:
        return self.cancelled.get((session_id, turn_id))

    def waiter(self, session_id: str, turn_id: str) -> asyncio.Event:
        event = self._waiters.setdefault((session_id, turn_id), asyncio.Event())
        if (session_id, turn_id) in self.cancelled:
            event.set()
        return event

    async def cancel(self, session_id: str, turn_id: str, reason: str = "") -> None:
        self.cancelled[(session_id, turn_id)] = reason
        self.waiter(session_id, turn_id).set()


# Called after each emit with what was emitted so far; may cancel (a barge-in mid-way).
OnEmit = Callable[[list[Emit], MemoryCancels], Awaitable[None]]


async def run_handler(handle: Handler, events: Iterable[Event], *,
                      cancels: MemoryCancels | None = None,
                      on_emit: OnEmit | None = None,
                      redis: Any = None, keys: Keys | None = None) -> list[Emit]:
    """Every event through ``handle`` in order, as one delivery each; all emits. With
    ``redis`` (a real client: the bus tier) the handler keeps its state there."""
    cancels = cancels or MemoryCancels()
    bus = MemoryBus(keys or Keys(), redis if redis is not None else NoRedis())
    out: list[Emit] = []
    for i, event in enumerate(events):
        ctx = Context(bus, cancels, "test-consumer", "test-stream", f"{i + 1}-0", 1, event)
        async for emit in handle(event, ctx):
            out.append(emit)
            if on_emit is not None:
                await on_emit(out, cancels)
    return out

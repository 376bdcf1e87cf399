"""Waiting and retrying, shared by the runtime's loops and the gateway: back-off with
jitter, a wait on an event with a timeout, and the signal that shutdown gave up."""

from __future__ import annotations

import asyncio
import random


class Stopping(Exception):
    """Raised inside I/O retries when shutdown gives up on Redis."""


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds``; True if it is set.

    Not ``asyncio.wait_for(event.wait(), ...)``: on Python 3.11 that swallows a
    cancellation arriving just as the event is set (gh-86296), which left a
    worker's background task running forever at shutdown.
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=seconds)
        return bool(done)
    finally:
        waiter.cancel()


class Backoff:
    """Exponential back-off with full jitter; resets after a quiet period."""

    # The cap bounds how long a worker takes to notice Redis is back (a refused
    # connection costs nothing), so it resumes within a second of an outage's end.
    def __init__(self, first: float = 0.05, cap: float = 1.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay = random.uniform(self.delay / 2, self.delay)
        self.delay = min(self.cap, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first

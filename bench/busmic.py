"""A simulated microphone that writes straight onto the bus (no gateway), for benchmarks
that measure the workers alone: it streams one session's audio in real time, the
queued utterances and silence in between, as a device would."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from schemas import AudioFrame, SessionEnded, SessionStarted
from workers.backends.audio import MODEL_RATE, float_to_pcm16
from workers.runtime.bus import Bus

FRAME_MS = 32


class Microphone:
    """Streams one session's audio in real time, like a device would: the queued
    utterances, and silence in between (a mic never stops sending)."""

    def __init__(self, bus: Bus, session_id: str, rate: int = MODEL_RATE) -> None:
        self.bus, self.session_id, self.rate = bus, session_id, rate
        self.step = rate * FRAME_MS // 1000
        self._queue = np.zeros(0, dtype=np.float32)
        self.sent = 0  # samples sent: the session's audio time
        self.started_ns = 0  # wall clock of audio time 0

    def say(self, audio: np.ndarray) -> None:
        self._queue = np.concatenate([self._queue, audio])

    def wall_ns(self, audio_ms: int) -> int:
        """When audio time ``audio_ms`` had been captured, on the wall clock."""
        return self.started_ns + audio_ms * 1_000_000

    async def run(self, stop: asyncio.Event) -> None:
        keys = self.bus.keys
        await self.bus.publish(keys.sessions(), SessionStarted(
            session_id=self.session_id, user_id="demo", sample_rate=self.rate))
        t0 = time.monotonic()
        self.started_ns = time.time_ns()
        seq = 0
        while not stop.is_set():
            chunk = self._queue[:self.step]
            self._queue = self._queue[self.step:]
            if chunk.size < self.step:
                chunk = np.concatenate([chunk, np.zeros(self.step - chunk.size, np.float32)])
            # A frame leaves once all of its audio would have been captured.
            await asyncio.sleep(max(0.0, t0 + (seq + 1) * FRAME_MS / 1000 - time.monotonic()))
            await self.bus.publish(keys.audio(self.session_id), AudioFrame(
                session_id=self.session_id, seq=seq, sample_rate=self.rate,
                pcm=float_to_pcm16(chunk)))
            self.sent += self.step
            seq += 1
        await self.bus.publish(keys.audio(self.session_id),
                               SessionEnded(session_id=self.session_id, reason="demo over"))

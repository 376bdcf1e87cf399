"""TTS stage (job). PLACEHOLDER until Piper/espeak-ng synthesis lands (issue 4).

``beep_tts`` "speaks" a text chunk as a quiet 440 Hz tone, 60 ms per word, so the
audio path to the device can be exercised before a voice exists.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator
from typing import Any

from schemas import AudioChunk, Event, TextChunk
from workers.runtime import Context, Emit, JobStage

SAMPLE_RATE = 24_000


def _tone(seconds: float) -> bytes:
    n = int(seconds * SAMPLE_RATE)
    return struct.pack(f"<{n}h", *(int(3000 * math.sin(2 * math.pi * 440 * i / SAMPLE_RATE))
                                   for i in range(n)))


async def beep_tts(event: Event, ctx: Context) -> AsyncIterator[Emit]:
    if not isinstance(event, TextChunk):
        return
    words = max(1, len(event.text.split()))
    yield Emit(ctx.keys.out(event.session_id), AudioChunk(
        session_id=event.session_id, turn_id=event.turn_id, seq=event.seq,
        sample_rate=SAMPLE_RATE, pcm=_tone(0.06 * words), last=event.last,
        traceparent=event.traceparent))


def build(config: Any) -> JobStage:
    return JobStage("tts", beep_tts)

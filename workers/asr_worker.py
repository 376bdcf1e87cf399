"""ASR stage (job). PLACEHOLDER until faster-whisper lands (issue 3).

``PlaceholderAsr`` transcribes nothing: it answers each turn with a transcript
that says how much audio it got, marked so nobody mistakes it for speech.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from schemas import Event, Transcript, TurnEnded
from workers.runtime import Context, Emit, JobStage


async def placeholder_asr(event: Event, ctx: Context) -> AsyncIterator[Emit]:
    if not isinstance(event, TurnEnded):
        return
    seconds = len(event.audio) / 2 / event.sample_rate
    transcript = Transcript(
        session_id=event.session_id, turn_id=event.turn_id, final=True,
        text=f"[placeholder ASR: {seconds:.1f} s of audio]", traceparent=event.traceparent)
    yield Emit(ctx.keys.out(event.session_id), transcript)
    yield Emit(ctx.keys.queue("llm"), transcript)


def build(config: Any) -> JobStage:
    return JobStage("asr", placeholder_asr)

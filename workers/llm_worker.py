"""LLM stage (job). PLACEHOLDER until the streaming LLM worker lands (issue 4).

``echo_llm`` answers every final transcript by repeating it, as one text chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from schemas import Event, TextChunk, Transcript
from workers.runtime import Context, Emit, JobStage


async def echo_llm(event: Event, ctx: Context) -> AsyncIterator[Emit]:
    if not isinstance(event, Transcript) or not event.final:
        return
    text = "Sorry, could you say that again?" if event.failed else f"You said: {event.text}"
    chunk = TextChunk(session_id=event.session_id, turn_id=event.turn_id, seq=0, text=text,
                      last=True, traceparent=event.traceparent)
    yield Emit(ctx.keys.out(event.session_id), chunk)
    yield Emit(ctx.keys.queue("tts"), chunk)


def build(config: Any) -> JobStage:
    return JobStage("llm", echo_llm)

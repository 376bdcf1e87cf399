"""Stages used by the tests: small, real handlers run inside the real runtime."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from schemas import AudioChunk, AudioFrame, Event, SessionStarted, Transcript, TurnEnded
from workers.runtime import Context, Emit, JobStage
from workers.runtime.sessions import SessionStage

# Seconds a handler sleeps before answering (to have something to kill mid-way).
DELAY = float(os.environ.get("TEST_STAGE_DELAY", "0"))


class EchoSession:
    """Echoes every frame of a session to its out stream as an audio chunk, same seq."""

    def __init__(self, started: SessionStarted) -> None:
        self.session_id = started.session_id
        self.heard = 0  # state across events: frames taken in

    async def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]:
        if isinstance(event, AudioFrame):
            self.heard += 1
            if event.pcm == b"boom":  # fails after changing the state
                raise RuntimeError("this frame breaks the handler")
            if DELAY:
                await asyncio.sleep(DELAY)
            yield Emit(ctx.keys.out(self.session_id), AudioChunk(
                session_id=self.session_id, turn_id=f"echo-{self.heard}", seq=event.seq,
                sample_rate=event.sample_rate, pcm=event.pcm))

    async def close(self) -> None:
        pass


async def transcribe_slowly(event: Event, ctx: Context) -> AsyncIterator[Emit]:
    """A job stage: TurnEnded -> one Transcript on the session's out stream."""
    if isinstance(event, TurnEnded):
        if event.rule == "poison":
            raise RuntimeError("this turn always fails")
        if event.rule == "hold_first_delivery" and ctx.deliveries == 1:
            await asyncio.Event().wait()  # mid-job until a peer takes it over (lease tests)
        if event.rule == "answer_on_go" and ctx.deliveries == 1:
            # Its answer in hand, it waits for the test's go (fencing tests).
            while not await ctx.bus.redis.exists(f"{ctx.keys.prefix}:test:go"):  # noqa: ASYNC110 (a key in Redis, set by the test process)
                await asyncio.sleep(0.005)
            text = f"heard {len(event.audio)} bytes by {ctx.consumer} (late)"
            yield Emit(ctx.keys.out(event.session_id), Transcript(
                session_id=event.session_id, turn_id=event.turn_id, text=text))
            return
        if event.rule == "redis_on_go":
            # Mid-job until the test's go file appears (Redis may be down by then: a
            # file, not a key), then a call of its own to Redis (outage tests).
            while not os.path.exists(os.environ["TEST_GO_FILE"]):  # noqa: ASYNC110, ASYNC240 (a tiny stat of a file the test creates)
                await asyncio.sleep(0.01)
            await ctx.bus.redis.incr(f"{ctx.keys.prefix}:test:calls")
        if DELAY:
            await asyncio.sleep(DELAY)
        yield Emit(ctx.keys.out(event.session_id), Transcript(
            session_id=event.session_id, turn_id=event.turn_id,
            text=f"heard {len(event.audio)} bytes by {ctx.consumer}"))


async def chunked_until_cancelled(event: Event, ctx: Context) -> AsyncIterator[Emit]:
    """Streams 50 chunks, 20 ms apart, stopping at the first chunk after a cancel."""
    if isinstance(event, TurnEnded):
        for i in range(50):
            if ctx.cancelled():
                return
            yield Emit(ctx.keys.out(event.session_id), AudioChunk(
                session_id=event.session_id, turn_id=event.turn_id, seq=i,
                sample_rate=16000, pcm=b"\0\0" * 160))
            await asyncio.sleep(0.02)


async def long_call_raced_against_cancel(event: Event, ctx: Context) -> AsyncIterator[Emit]:
    """A 30 s "model call" that is abandoned the moment its turn is cancelled."""
    if isinstance(event, TurnEnded):
        call = asyncio.create_task(asyncio.sleep(30))
        cancelled = asyncio.create_task(ctx.cancel_event().wait())
        await asyncio.wait({call, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        call.cancel()
        cancelled.cancel()
        text = "abandoned" if ctx.cancelled() else "finished"
        yield Emit(ctx.keys.out(event.session_id), Transcript(
            session_id=event.session_id, turn_id=event.turn_id, text=text))


STAGES = {
    "echo-session": SessionStage("vad", EchoSession),
    "slow-asr": JobStage("asr", transcribe_slowly, accepts=(TurnEnded,)),
    "chunker": JobStage("tts", chunked_until_cancelled),
    "long-call": JobStage("llm", long_call_raced_against_cancel),
}

"""VAD stage (session-affine). PLACEHOLDER until the hybrid VAD lands (issue 3).

``PassthroughVad`` detects nothing: it treats a session's whole audio, up to the
session's end (or every ``MAX_TURN_S`` of audio), as one turn. It exists so the
bus can be run end to end before the speech models do; it is named as such in
logs and in the turn's ``rule``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from schemas import AudioFrame, Event, SessionEnded, SessionStarted, SpeechStarted, TurnEnded
from workers.runtime import Context, Emit
from workers.sessions import SessionStage

MAX_TURN_S = 10.0


class PassthroughVad:
    def __init__(self, started: SessionStarted) -> None:
        self.session_id = started.session_id
        self.sample_rate = started.sample_rate
        self.samples_seen = 0  # audio time of the session, in samples
        self.turn_id: str | None = None
        self.turn_start = 0
        self.audio = bytearray()

    async def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]:
        if isinstance(event, AudioFrame):
            if self.turn_id is None:
                self.turn_id = uuid.uuid4().hex[:12]
                self.turn_start = self.samples_seen
                yield Emit(ctx.keys.out(self.session_id), SpeechStarted(
                    session_id=self.session_id, turn_id=self.turn_id,
                    audio_ms=self._ms(self.samples_seen), traceparent=event.traceparent))
            self.audio += event.pcm
            self.samples_seen += event.samples
            if self.samples_seen - self.turn_start >= MAX_TURN_S * self.sample_rate:
                yield self._end_turn(ctx, event)
        elif isinstance(event, SessionEnded) and self.turn_id is not None:
            yield self._end_turn(ctx, event)

    def _end_turn(self, ctx: Context, cause: Event) -> Emit:
        assert self.turn_id is not None
        turn = TurnEnded(
            session_id=self.session_id, turn_id=self.turn_id, sample_rate=self.sample_rate,
            audio=bytes(self.audio), speech_start_ms=self._ms(self.turn_start),
            speech_end_ms=self._ms(self.samples_seen), decided_ms=self._ms(self.samples_seen),
            rule="placeholder", traceparent=cause.traceparent)
        self.turn_id, self.audio = None, bytearray()
        return Emit(ctx.keys.queue("asr"), turn)

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.sample_rate

    async def close(self) -> None:
        self.audio = bytearray()


def build(config: Any) -> SessionStage:
    return SessionStage("vad", PassthroughVad)

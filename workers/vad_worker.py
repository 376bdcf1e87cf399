"""VAD stage (session-affine): speech start/stop and the end of the user's turn.

Each session's frames arrive in capture order; any input rate is resampled to
16 kHz and re-blocked into Silero's 32 ms windows, and ``TurnDetector`` decides
in audio time. Per turn it emits:

* ``SpeechStarted`` / ``SpeechStopped`` to the session's out stream;
* ``TurnEnded`` with the utterance to the ASR queue (and, without the audio,
  to the out stream: the record of which rule ended the turn, the model's
  probability and how long after the last speech the decision came);
* speculative ``TurnEnded``s at pauses, so ASR can start before the turn ends.

Barge-in: when the user starts speaking while an agent turn is being prepared
or played (``keys.active_turn``), that turn is cancelled on the cancel lane.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from schemas import (
    AudioFrame,
    Event,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
)
from workers import semconv, telemetry
from workers.backends.audio import Reblocker, StreamResampler, float_to_pcm16, pcm16_to_float
from workers.backends.silero import WINDOW, SileroModel
from workers.backends.smart_turn import SmartTurnModel
from workers.bus import as_str
from workers.config import Config
from workers.logs import log_context
from workers.runtime import Context, Emit
from workers.sessions import SessionStage
from workers.turn_detection import (
    RATE,
    Action,
    Blip,
    NeedsTurnCheck,
    SpeechStart,
    SpeechStop,
    TurnDetector,
    TurnEnd,
)

log = logging.getLogger(__name__)

ACTIVE_TURN_TTL_S = 120  # an agent turn nobody finished is forgotten after this


@dataclass
class VadModels:
    """Loaded once per process, shared by every session it owns."""

    silero: SileroModel
    smart_turn: SmartTurnModel | None

    @classmethod
    def load(cls, config: Config) -> VadModels:
        vad = config.vad
        smart = None
        if vad.type != "silero":
            smart = SmartTurnModel(vad.smart_turn.model_path, vad.device, vad.smart_turn.threads)
        return cls(SileroModel(device=vad.device), smart)


def _ms(samples: int) -> int:
    return samples * 1000 // RATE


class HybridVad:
    """One session's VAD state."""

    def __init__(self, started: SessionStarted, models: VadModels, config: Config) -> None:
        self.session_id = started.session_id
        self.user_id = started.user_id  # from the device's token; carried to the LLM's memory
        self.models = models
        self.rate = started.sample_rate
        self.resample = StreamResampler(self.rate)
        self.reblock = Reblocker(WINDOW)
        self.detector = TurnDetector(config.vad, models.silero.stream())
        self.turn_id: str | None = None
        self.traceparent = ""  # the turn's W3C trace context: one trace per turn
        # (audio ms at a frame's end, its created_ns): places audio time on the wall
        # clock for the turn-detection span, as the gateway does for its latency.
        self.frame_clock: deque[tuple[int, int]] = deque(maxlen=4096)
        self.input_samples = 0
        self.barge_in = config.vad.barge_in

    async def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]:
        if isinstance(event, AudioFrame):
            if event.sample_rate != self.rate:  # the device changed its rate mid-session
                log.info("input rate changed %d -> %d Hz", self.rate, event.sample_rate)
                self.rate = event.sample_rate
                self.resample = StreamResampler(self.rate)
            self.input_samples += len(event.pcm) // 2
            self.frame_clock.append((self.input_samples * 1000 // self.rate, event.created_ns))
            audio = self.resample(pcm16_to_float(event.pcm))
            for window in self.reblock(audio):
                for action in self.detector.push(window):
                    async for out in self._act(action, ctx, event):
                        yield out
        elif isinstance(event, SessionEnded):
            for action in self.detector.flush():
                async for out in self._act(action, ctx, event):
                    yield out

    async def _act(self, action: Action, ctx: Context, cause: Event) -> AsyncIterator[Emit]:
        sid, out = self.session_id, ctx.keys.out(self.session_id)
        if isinstance(action, SpeechStart):
            self.turn_id = uuid.uuid4().hex[:16]
            self.traceparent = new_traceparent()
            if self.barge_in:
                await self._barge_in(ctx)
            yield Emit(out, SpeechStarted(session_id=sid, turn_id=self.turn_id,
                                          audio_ms=_ms(action.at),
                                          traceparent=self.traceparent))
        elif isinstance(action, SpeechStop) and self.turn_id:
            yield Emit(out, SpeechStopped(session_id=sid, turn_id=self.turn_id,
                                          audio_ms=_ms(action.at),
                                          traceparent=self.traceparent))
        elif isinstance(action, NeedsTurnCheck) and self.models.smart_turn is not None:
            # ~50 ms of CPU: off the event loop, so leases and other sessions go on.
            probability = await asyncio.to_thread(self.models.smart_turn.probability,
                                                  action.audio)
            for follow_up in self.detector.judged(probability):
                async for emitted in self._act(follow_up, ctx, cause):
                    yield emitted
        elif isinstance(action, TurnEnd) and self.turn_id:
            async for emitted in self._turn_ended(action, ctx, cause):
                yield emitted
        elif isinstance(action, Blip):
            log.debug("ignored a %d ms blip at %d ms", _ms(action.speech), _ms(action.start))

    async def _turn_ended(self, end: TurnEnd, ctx: Context, cause: Event) -> AsyncIterator[Emit]:
        assert self.turn_id is not None
        turn = TurnEnded(
            session_id=self.session_id, turn_id=self.turn_id, sample_rate=RATE,
            audio=float_to_pcm16(end.audio), speech_start_ms=_ms(end.start),
            speech_end_ms=_ms(end.speech_end), decided_ms=_ms(end.decided), rule=end.rule,
            probability=end.probability, speculative=end.speculative,
            user_id=self.user_id, traceparent=self.traceparent)
        yield Emit(ctx.keys.queue("asr"), turn)
        if end.speculative:
            return
        yield Emit(ctx.keys.out(self.session_id), _without_audio(turn))
        self._record_span(end)
        await ctx.bus.redis.set(ctx.keys.active_turn(self.session_id), self.turn_id,
                                ex=ACTIVE_TURN_TTL_S)
        with log_context(session_id=self.session_id, turn_id=self.turn_id):
            log.info("turn %s ended by %s (p=%s) %d ms after the last speech; %.2f s of speech",
                     self.turn_id, end.rule,
                     "-" if end.probability is None else f"{end.probability:.2f}",
                     end.delay_ms, (end.speech_end - end.start) / RATE)
        self.turn_id = None

    def _record_span(self, end: TurnEnd) -> None:
        """The turn-detection span: from when the audio of the speech end was captured
        (its frame's ``created_ns``) to the decision (now)."""
        now = time.time_ns()
        speech_end_ms = _ms(end.speech_end)
        arrived = next((ns for ms, ns in self.frame_clock if ms >= speech_end_ms), None)
        span = telemetry.tracer().start_span(
            semconv.TURN_DETECTION, context=telemetry.parent_of(self.traceparent),
            start_time=min(arrived or now - end.delay_ms * 1_000_000, now), attributes={
                semconv.STAGE: "vad", semconv.SESSION_ID: self.session_id,
                semconv.TURN_ID: self.turn_id or "", semconv.TURN_RULE: end.rule,
                semconv.SPEECH_MS: _ms(end.speech_end - end.start)})
        if end.probability is not None:
            span.set_attribute(semconv.TURN_PROBABILITY, round(end.probability, 4))
        span.end(end_time=now)

    async def _barge_in(self, ctx: Context) -> None:
        """The user speaks while the agent's previous turn is still live: cancel it."""
        key = ctx.keys.active_turn(self.session_id)
        previous = await ctx.bus.redis.getdel(key)
        if previous:
            turn = as_str(previous)
            await ctx.cancel.cancel(self.session_id, turn, "barge-in")
            with log_context(session_id=self.session_id, turn_id=turn):
                log.info("barge-in: cancelled agent turn %s", turn)

    async def close(self) -> None:
        self.reblock = Reblocker(WINDOW)


def new_traceparent() -> str:
    """A W3C traceparent starting a new trace (the turn's): every stage copies it onto
    the events it makes, so one turn is one trace id across processes."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _without_audio(turn: TurnEnded) -> TurnEnded:
    return msgspec.structs.replace(turn, audio=b"")


def build(config: Config) -> SessionStage:
    models = VadModels.load(config)
    log.info("VAD models loaded: %s%s", models.silero.path.name,
             f", {models.smart_turn.path.name}" if models.smart_turn else "")
    return SessionStage("vad", lambda started: HybridVad(started, models, config))


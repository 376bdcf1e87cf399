"""VAD stage (session-affine): speech start/stop and the end of the user's turn.

Each session's frames arrive in capture order; any input rate is resampled to
16 kHz and re-blocked into Silero's 32 ms windows, and ``TurnDetector`` decides
in audio time. Per turn it emits:

* ``SpeechStarted`` / ``SpeechStopped`` to the session's out stream;
* ``TurnEnded`` with the utterance to the ASR queue (and, without the audio,
  to the out stream: the record of which rule ended the turn, the model's
  probability, what the transcript said and how long after the last speech the
  decision came);
* speculative ``TurnEnded``s at pauses, so ASR can start before the turn ends. At
  each pause the worker runs Smart Turn, and looks for ASR's speculative transcript
  of the turn so far with every frame that follows (at most for
  ``endpointing.text_wait``): both go to the detector. A turn the detector ends
  before the transcript is in is *tentative*: its ``TurnEnded(tentative=True)``
  starts ASR and the LLM, and a second ``TurnEnded`` (tentative=False, out stream
  only) commits it once the text agrees (or the silence timeout passes): the
  gateway plays nothing of a turn before its commit.

When the user starts speaking while an agent turn is pending or playing
(``keys.active_turn``):

* **continuation** — none of its reply was heard yet (the gateway marks the first
  audio it sends in ``keys.audible``; the speech began before that, or within
  ``continuation.heard_after`` of it): the agent turn is cancelled with reason
  ``continued`` (dropped silently) and the detector goes on with the user's turn;
  the next ``TurnEnded`` covers the whole utterance and names the turn it replaces
  (``continues``), in the same trace;
* **barge-in** — otherwise: the agent turn is cancelled with reason ``barge-in``.

Inner pauses are learned per user (``vad.adaptive``, ``workers.vad.pauses``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator

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
from workers.backends.audio import MODEL_WINDOW as WINDOW
from workers.backends.audio import (
    ArrivalClock,
    Reblocker,
    StreamResampler,
    float_to_pcm16,
    pcm16_to_float,
)
from workers.backends.vad import VadModels, load_vad_models
from workers.config import Config
from workers.observability import semconv, telemetry
from workers.observability.logs import log_context
from workers.runtime import Context, Emit
from workers.runtime.bus import as_str
from workers.runtime.sessions import SessionStage
from workers.runtime.shared_result import is_pending
from workers.vad import actions as act
from workers.vad.pauses import PauseProfile
from workers.vad.takeover import open_turn
from workers.vad.turn_detection import RATE, TurnDetector, seconds

log = logging.getLogger(__name__)

ACTIVE_TURN_TTL_S = 120  # an agent turn nobody finished is forgotten after this


def _ms(samples: int) -> int:
    return samples * 1000 // RATE


class HybridVad:
    """One session's VAD state."""

    def __init__(self, started: SessionStarted, models: VadModels, config: Config) -> None:
        self.session_id = started.session_id
        self.user_id = started.user_id  # from the device's token; carried to the LLM's memory
        self.models = models
        self.config = config
        self.rate = started.sample_rate
        self.resample = StreamResampler(self.rate)
        self.reblock = Reblocker(WINDOW)
        self.detector = TurnDetector(config.vad, models.speech.stream())
        self.turn_id: str | None = None
        self.traceparent = ""  # the turn's W3C trace context: one trace per turn
        self.continues = ""  # the turn the current one continues
        self.ended: tuple[str, str] | None = None  # (turn id, traceparent) of the last turn
        # The speculative TurnEnd whose transcript the detector waits for: its turn id,
        # the guess, and until when (monotonic) to look.
        self.guess: tuple[str, act.TurnEnd, float] | None = None
        self.tentative: TurnEnded | None = None  # the tentative end awaiting its commit
        self.pauses: PauseProfile | None = None
        # (audio ms at a frame's end, its created_ns): places audio time on the wall
        # clock for the turn-detection span, as the gateway does for its latency.
        self.frame_clock = ArrivalClock()  # when each frame was received (its created_ns)
        self.input_samples = 0
        # Where this handler's audio starts on the session's clock (16 kHz samples): not 0
        # when it took the session over mid-way, replaying from its first unacked frame.
        self.origin = 0
        self.last_turn_looked_up = False
        self.last_seq = -1
        self.barge_in = config.vad.barge_in

    async def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]:
        if isinstance(event, AudioFrame):
            if event.seq <= self.last_seq:
                return  # the gateway sent it twice (a retry through a Redis outage)
            if self.last_seq < 0 and event.offset_ms:  # a takeover: keep the session's clock
                self.origin = event.offset_ms * RATE // 1000
                self.input_samples = event.offset_ms * event.sample_rate // 1000
            self.last_seq = event.seq
            if event.sample_rate != self.rate:  # the device changed its rate mid-session
                log.info("input rate changed %d -> %d Hz", self.rate, event.sample_rate)
                self.rate = event.sample_rate
                self.resample = StreamResampler(self.rate)
            self.input_samples += len(event.pcm) // 2
            self.frame_clock.mark(self.input_samples * 1000 // self.rate, event.created_ns)
            if self.guess is not None:
                for action in await self._texted(ctx):
                    async for out in self._act(action, ctx, event):
                        yield out
            audio = self.resample(pcm16_to_float(event.pcm))
            for window in self.reblock(audio):
                for action in self.detector.push(window):
                    async for out in self._act(action, ctx, event):
                        yield out
        elif isinstance(event, SessionEnded):
            for action in self.detector.flush():
                async for out in self._act(action, ctx, event):
                    yield out

    async def _act(self, action: act.Action, ctx: Context, cause: Event) -> AsyncIterator[Emit]:
        sid, out = self.session_id, ctx.keys.out(self.session_id)
        if isinstance(action, act.SpeechStart):
            async for emitted in self._speech_started(action, ctx, cause):
                yield emitted
        elif isinstance(action, act.SpeechStop) and self.turn_id:
            yield Emit(out, SpeechStopped(session_id=sid, turn_id=self.turn_id,
                                          audio_ms=self._at(action.at),
                                          traceparent=self.traceparent))
        elif isinstance(action, act.NeedsTurnCheck) and self.models.turn_end is not None:
            # ~50 ms of CPU: off the event loop, so leases and other sessions go on.
            probability = await asyncio.to_thread(self.models.turn_end.probability,
                                                  action.audio)
            follow_ups = self.detector.judged(probability)
            if self.guess is not None:  # the transcript may be there already
                follow_ups.extend(await self._texted(ctx))
            for follow_up in follow_ups:
                async for emitted in self._act(follow_up, ctx, cause):
                    yield emitted
        elif isinstance(action, act.TurnEnd) and self.turn_id:
            async for emitted in self._turn_ended(action, ctx, cause):
                yield emitted
        elif isinstance(action, act.Commit) and self.tentative is not None:
            async for emitted in self._committed(action, ctx):
                yield emitted
        elif isinstance(action, act.Resumed):
            await self._learn_pause(action, ctx)
        elif isinstance(action, act.Blip):
            log.debug("ignored a %d ms blip at %d ms", _ms(action.speech), self._at(action.start))

    async def _speech_started(self, start: act.SpeechStart, ctx: Context,
                              cause: Event) -> AsyncIterator[Emit]:
        if self.pauses is None and self.config.vad.adaptive.enabled:
            self.pauses = PauseProfile(
                ctx.bus.redis, ctx.keys.user_pauses(self.user_id or f"session:{self.session_id}"),
                self.config.vad.adaptive, self.config.vad.fallback.silence_timeout)
            self.detector.pause_allowance = seconds(await self.pauses.load())
        if self.origin and self.ended is None and not self.last_turn_looked_up:
            self.last_turn_looked_up = True  # a takeover: the dead owner's turn goes on?
            if (started := await open_turn(ctx.bus.redis, ctx.keys.out(self.session_id))):
                self.turn_id, self.traceparent = started.turn_id, started.traceparent
                self.continues = ""  # the fragment it continued stays its own message
                log.info("turn %s goes on: its owner died mid-utterance", self.turn_id)
                return
        self.turn_id = uuid.uuid4().hex[:16]
        self.traceparent = new_traceparent()
        self.continues = ""
        previous = await self._agent_turn(ctx, start)
        if previous == "continued":
            assert self.ended is not None
            self.continues, self.traceparent = self.ended  # one trace for the utterance
            for action in self.detector.continue_turn():
                async for emitted in self._act(action, ctx, cause):
                    yield emitted
        yield Emit(ctx.keys.out(self.session_id), SpeechStarted(
            session_id=self.session_id, turn_id=self.turn_id, audio_ms=self._at(start.at),
            continues=self.continues, traceparent=self.traceparent))

    async def _agent_turn(self, ctx: Context, start: act.SpeechStart) -> str:
        """What the new speech does to a pending or playing agent turn: "continued" (none
        of its reply was heard: it is dropped and the user's turn goes on), "barge-in"
        (it is cut off), or "" (there is none)."""
        if not self.barge_in:
            return ""
        redis, keys = ctx.bus.redis, ctx.keys
        active_key = keys.active_turn(self.session_id)
        active = await redis.get(active_key)
        if active is None:
            return ""
        agent_turn = as_str(active)
        cfg = self.config.vad.continuation
        if (cfg.enabled and self.detector.continuable and self.ended is not None
                and self.ended[0] == agent_turn
                and not await self._heard(ctx, agent_turn, start)):
            outcome, reason = "continued", "continued"
        else:
            outcome, reason = "barge-in", "barge-in"
        if not await redis.delete(active_key):  # the gateway finished it meanwhile
            return ""
        await ctx.cancel.cancel(self.session_id, agent_turn, reason)
        with log_context(session_id=self.session_id, turn_id=agent_turn):
            if outcome == "continued":
                log.info("continuation: the user went on before hearing the reply; turn %s "
                         "dropped, turn %s covers the whole utterance", agent_turn, self.turn_id)
            else:
                log.info("barge-in: cancelled agent turn %s", agent_turn)
        return outcome

    async def _heard(self, ctx: Context, agent_turn: str, start: act.SpeechStart) -> bool:
        """Had the user heard any of ``agent_turn``'s reply when this speech began?"""
        raw = await ctx.bus.redis.get(ctx.keys.audible(self.session_id))
        if raw is None:
            return False
        turn, _, sent_ns = as_str(raw).partition(" ")
        if turn != agent_turn or not sent_ns.isdigit():
            return False
        began_ns = self._wall_ns(self._at(start.at))
        if began_ns is None:
            return True
        grace_ns = int(self.config.vad.continuation.heard_after * 1e9)
        return began_ns >= int(sent_ns) + grace_ns

    def _wall_ns(self, audio_ms: int) -> int | None:
        """When the frame holding audio time ``audio_ms`` was received (its created_ns)."""
        return self.frame_clock.wall_ns(audio_ms)

    async def _texted(self, ctx: Context) -> list[act.Action]:
        """One look for the transcript the detector waits for (once per frame)."""
        assert self.guess is not None
        turn_id, guess, deadline = self.guess
        key = ctx.keys.asr_result(self.session_id, turn_id, self._at(guess.speech_end))
        value = await ctx.bus.redis.get(key)
        text: str | None = None
        if value is not None and not is_pending(value):
            try:
                text = str(json.loads(value)["text"])
            except (ValueError, KeyError, TypeError):
                text = None
        elif time.monotonic() < deadline:
            return []  # not yet: look again with the next frame
        else:
            log.info("no speculative transcript within %.2f s; deciding without it",
                     self.config.vad.endpointing.text_wait)
        self.guess = None
        return self.detector.texted(guess.speech_end, text)

    async def _learn_pause(self, resumed: act.Resumed, ctx: Context) -> None:
        if self.pauses is None:
            return
        before = self.detector.pause_allowance
        self.detector.pause_allowance = seconds(await self.pauses.learn(resumed.pause / RATE))
        if abs(self.detector.pause_allowance - before) >= seconds(0.05):
            log.info("user pauses %.2f s on average: waits cover %.2f s",
                     self.pauses.average_s or 0, self.detector.pause_allowance / RATE)

    async def _turn_ended(self, end: act.TurnEnd, ctx: Context,
                          cause: Event) -> AsyncIterator[Emit]:
        assert self.turn_id is not None
        turn = TurnEnded(
            session_id=self.session_id, turn_id=self.turn_id, sample_rate=RATE,
            audio=float_to_pcm16(end.audio), speech_start_ms=self._at(end.start),
            speech_end_ms=self._at(end.speech_end), decided_ms=self._at(end.decided), rule=end.rule,
            probability=end.probability, speculative=end.speculative,
            user_id=self.user_id, continues=self.continues, tentative=end.tentative,
            text_verdict=end.text_verdict[:256], traceparent=self.traceparent)
        if end.speculative:
            if self.detector.use_text:
                self.guess = (self.turn_id, end,
                              time.monotonic() + self.config.vad.endpointing.text_wait)
            yield Emit(ctx.keys.job_queue("asr", self.session_id), turn)
            return
        # The out stream first: the gateway learns the turn is tentative before any
        # of its reply can reach it.
        yield Emit(ctx.keys.out(self.session_id), _without_audio(turn))
        yield Emit(ctx.keys.job_queue("asr", self.session_id), turn)
        self._record_span(end)
        await ctx.bus.redis.set(ctx.keys.active_turn(self.session_id), self.turn_id,
                                ex=ACTIVE_TURN_TTL_S)
        with log_context(session_id=self.session_id, turn_id=self.turn_id):
            log.info("turn %s ended by %s%s (p=%s%s) %d ms after the last speech; %.2f s of "
                     "speech%s", self.turn_id, end.rule, " (tentative)" if end.tentative else "",
                     "-" if end.probability is None else f"{end.probability:.2f}",
                     f", text {end.text_verdict}" if end.text_verdict else "",
                     end.delay_ms, (end.speech_end - end.start) / RATE,
                     f", continues {self.continues}" if self.continues else "")
        self.ended = (self.turn_id, self.traceparent)
        self.tentative = _without_audio(turn) if end.tentative else None
        self.turn_id = None

    async def _committed(self, commit: act.Commit, ctx: Context) -> AsyncIterator[Emit]:
        """The tentative turn is over for good: the same TurnEnded, not tentative, on the
        out stream (the gateway may now play its reply)."""
        assert self.tentative is not None
        turn, self.tentative = self.tentative, None
        committed = msgspec.structs.replace(
            turn, tentative=False, decided_ms=self._at(commit.decided),
            text_verdict=commit.text_verdict[:256], created_ns=time.time_ns())
        yield Emit(ctx.keys.out(self.session_id), committed)
        now = time.time_ns()
        telemetry.tracer().start_span(
            semconv.TURN_COMMIT, context=telemetry.parent_of(turn.traceparent),
            start_time=turn.created_ns, attributes={
                semconv.STAGE: "vad", semconv.TURN_ID: turn.turn_id,
                semconv.TURN_RULE: commit.rule,
                semconv.TURN_TEXT_VERDICT: commit.text_verdict.split(":")[0]},
        ).end(end_time=max(now, turn.created_ns))
        with log_context(session_id=self.session_id, turn_id=turn.turn_id):
            log.info("turn %s committed by %s (text %s), %d ms after the last speech",
                     turn.turn_id, commit.rule, commit.text_verdict or "-",
                     self._at(commit.decided) - turn.speech_end_ms)

    def _record_span(self, end: act.TurnEnd) -> None:
        """The turn-detection span: from when the audio of the speech end was captured
        (its frame's ``created_ns``) to the decision (now)."""
        now = time.time_ns()
        arrived = self._wall_ns(self._at(end.speech_end))
        span = telemetry.tracer().start_span(
            semconv.TURN_DETECTION, context=telemetry.parent_of(self.traceparent),
            start_time=min(arrived or now - end.delay_ms * 1_000_000, now), attributes={
                semconv.STAGE: "vad", semconv.SESSION_ID: self.session_id,
                semconv.TURN_ID: self.turn_id or "", semconv.TURN_RULE: end.rule,
                semconv.SPEECH_MS: _ms(end.speech_end - end.start)})
        if end.probability is not None:
            span.set_attribute(semconv.TURN_PROBABILITY, round(end.probability, 4))
        if end.text_verdict:
            span.set_attribute(semconv.TURN_TEXT_VERDICT, end.text_verdict.split(":")[0])
        if self.continues:
            span.set_attribute(semconv.TURN_CONTINUES, self.continues)
        span.set_attribute(semconv.TURN_TENTATIVE, end.tentative)
        span.end(end_time=now)

    @property
    def keeps_pending(self) -> bool:
        """A turn (or a blip) is under way: the runtime leaves its frames unacked until
        it ends, so a peer that takes the session over (this process died) replays them
        and ends the turn itself instead of losing it."""
        return self.detector.turn_start is not None

    def _at(self, samples: int) -> int:
        """A position of this handler's audio (16 kHz samples) as ms of the session's."""
        return _ms(self.origin + samples)

    async def close(self) -> None:
        self.reblock = Reblocker(WINDOW)


def new_traceparent() -> str:
    """A W3C traceparent starting a new trace (the turn's): every stage copies it onto
    the events it makes, so one turn is one trace id across processes."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _without_audio(turn: TurnEnded) -> TurnEnded:
    return msgspec.structs.replace(turn, audio=b"")


def build(config: Config) -> SessionStage:
    models = load_vad_models(config.vad)
    log.info("VAD models loaded: %s%s", models.speech.path.name,
             f", {models.turn_end.path.name}" if models.turn_end else "")
    return SessionStage("vad", lambda started: HybridVad(started, models, config))


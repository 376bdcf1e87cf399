"""One connected device: its inbound frames, its turns, its outbound audio.

Events of the session's out stream and the cancel lane arrive in one inbox, in order.
Reply audio goes to the device in ``(seq, part)`` order, each part once (duplicates
dropped, early parts held until the gap fills); a tentatively ended turn's audio is
held until its commit (or ``HOLD_LIMIT_S``). A cancelled turn stops at once: the
device is told to flush, and only what it played is stored as heard (a continued turn
stores nothing). The first audio byte sent marks the turn ``audible`` for the VAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from edge import protocol
from edge.frame_rate import BACKLOG_AFTER_S, FrameRate
from edge.turn_report import record_latency, record_spans, turn_done_message
from edge.turn_state import TurnState
from schemas import (
    AudioChunk,
    AudioFrame,
    Event,
    Heard,
    SessionEnded,
    SpeechStarted,
    TextChunk,
    Transcript,
    TurnEnded,
)
from workers.backends.audio import ArrivalClock
from workers.observability.logs import log_context
from workers.runtime.keys import Keys
from workers.runtime.retry import Backoff

if TYPE_CHECKING:
    from edge.gateway import Gateway

log = logging.getLogger("voicebus.gateway")

PLAYED_WAIT_S = 0.3  # after a flush, how long to wait for the device's played report
# A tentative turn's audio is released after this long even without its commit (the VAD
# that ended it died before committing: its peer does not know the turn).
HOLD_LIMIT_S = 6.0
KEEP_TURNS = 32  # turn states kept per session


class DeviceSession:
    """One connected device: its inbound frames, its turns, its outbound audio."""

    def __init__(self, gateway: Gateway, ws: ServerConnection, user_id: str,
                 sample_rate: int) -> None:
        self.gateway = gateway
        self.ws = ws
        self.user_id = user_id
        self.rate = sample_rate
        self.session_id = f"gw{uuid.uuid4().hex[:16]}"
        self.inbox: asyncio.Queue[Event | TurnCancelledNotice | ReleaseNotice] = asyncio.Queue()
        self.turns: dict[str, TurnState] = {}
        self.forgotten: deque[str] = deque(maxlen=4096)  # ids of finished, dropped turns
        self.current: TurnState | None = None  # the turn whose audio the device gets now
        self.samples_in = 0
        self.frame_times = ArrivalClock()  # to place speech ends (audio time) in time
        self.seq = 0
        self.started = time.monotonic()
        self.last_frame = time.monotonic()
        self.frame_rate = FrameRate(gateway.config.gateway.max_frames_per_s, time.monotonic())
        # Publishes waiting on Redis (down, or stalled without an error): the device is
        # held back by us, not idle.
        self.publishes_waiting = 0

    @property
    def keys(self) -> Keys:
        return self.gateway.keys

    # -- inbound ------------------------------------------------------------
    async def on_frame(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_frame = now
        if not self.frame_rate.allows(now):
            raise Closing(protocol.Close.RATE, "too many frames per second")
        if len(data) % 2:
            raise Closing(protocol.Close.POLICY, "audio must be PCM16: odd number of bytes")
        if not data:
            return
        offset_ms = self.samples_in * 1000 // self.rate
        self.samples_in += len(data) // 2
        self.frame_times.mark(self.samples_in * 1000 // self.rate, time.time_ns())
        stream = self.keys.audio(self.session_id)
        await self.publish_through_outage(stream, AudioFrame(
            session_id=self.session_id, seq=self.seq, sample_rate=self.rate, pcm=data,
            offset_ms=offset_ms))
        if self.seq == 0:  # it was just created: bounded even if no teardown ever runs
            with contextlib.suppress(RedisError, OSError):  # its teardown sets one too
                await self.gateway.redis.expire(stream,
                                                self.gateway.config.session_streams_ttl_s())
        self.seq += 1

    async def publish_through_outage(self, stream: str, event: Event) -> None:
        """Publish, riding out a Redis outage of up to ``gateway.bus_outage_s``: the
        device stays connected, its frames wait in order in the socket's buffers, and
        flow on when Redis answers (a frame sent twice by a retry is dropped by the VAD,
        by its seq). A longer outage raises, and the device is closed with 1011. The
        session's start and what the user heard of a reply ride out an outage the same
        way (a pooled connection that broke while Redis was away costs one retry)."""
        backoff, since, began = Backoff(first=0.05, cap=0.5), None, time.monotonic()
        self.publishes_waiting += 1
        try:
            while True:
                try:
                    await self.gateway.bus.publish(stream, event)
                    break
                except (RedisError, OSError) as exc:
                    now = time.monotonic()
                    if since is None:
                        since = now
                        log.warning("Redis unavailable (%s); holding the device's audio", exc)
                    if now - since > self.gateway.config.gateway.bus_outage_s:
                        raise
                    await asyncio.sleep(backoff.next())
        finally:
            self.publishes_waiting -= 1
        now = time.monotonic()
        if since is not None:
            log.info("Redis back after %.1f s; the device's audio flows again", now - since)
        if now - began > BACKLOG_AFTER_S:  # an outage, or a Redis that stalled (no error)
            self.last_frame = now  # the device's idle time counts from here
        self.frame_rate.held_back(now - began, now)

    def on_played(self, turn_id: str, samples: int) -> None:
        turn = self.turns.get(turn_id)
        if turn is None or samples < 0:
            return
        turn.played = max(turn.played, min(samples, turn.sent_samples))
        turn.played_event.set()
        if turn.done and not turn.cancelled and turn.played >= turn.sent_samples:
            self.gateway.spawn(self.finish_playback(turn))

    def wall_ns(self, audio_ms: int) -> int | None:
        """When the frame holding audio time ``audio_ms`` reached the gateway."""
        return self.frame_times.wall_ns(audio_ms)

    # -- outbound -----------------------------------------------------------
    async def pump(self) -> None:
        """Events from the session's out stream and the cancel lane, in order."""
        with log_context(session_id=self.session_id):
            while True:
                event = await self.inbox.get()
                await self.on_event(event)

    async def on_event(self, event: Event | TurnCancelledNotice | ReleaseNotice) -> None:
        if isinstance(event, TurnCancelledNotice):
            await self.on_cancelled(event.turn_id, event.reason)
            return
        if isinstance(event, ReleaseNotice):  # through the inbox: in order with the audio
            if (released := self.turns.get(event.turn_id)) is not None:
                await self.release(released)
            return
        turn_id = getattr(event, "turn_id", "")
        if not turn_id:
            return
        turn = self.turns.get(turn_id)
        if turn is None:
            if turn_id in self.forgotten:
                return  # a very late event of a turn finished long ago: nothing to send
            turn = self.turns[turn_id] = TurnState(turn_id)
            self.forget_old_turns()
        if turn.trace_id == "" and event.traceparent:
            turn.trace_id = event.traceparent.split("-")[1]
            turn.traceparent = event.traceparent
        if isinstance(event, SpeechStarted):
            turn.speech_start_ns = self.wall_ns(event.audio_ms)
            continued = self.turns.get(event.continues) if event.continues else None
            if event.continues:
                turn.continues = event.continues
            if continued is not None and continued.speech_start_ns is not None:
                turn.speech_start_ns = continued.speech_start_ns  # the whole utterance
            await self.send(protocol.SpeechStartedMessage(turn_id, event.continues))
            return
        if isinstance(event, TurnEnded):
            if not event.tentative and turn.held:  # the commit: its reply may play now
                turn.held, turn.committed_ns = False, event.created_ns
                await self.release(turn)
                return
            turn.speech_end_ms, turn.decided_ns, turn.rule = (event.speech_end_ms,
                                                               event.created_ns, event.rule)
            turn.held = event.tentative and not turn.cancelled
            if turn.held:
                self.gateway.spawn(self.hold_limit(turn))
            turn.speech_end_ns = self.wall_ns(event.speech_end_ms)
        elif isinstance(event, Transcript) and event.final:
            turn.transcript_ns = event.created_ns
            await self.send(protocol.TranscriptMessage(turn_id, event.text, final=True,
                                                       failed=event.failed))
        elif isinstance(event, TextChunk):
            if turn.done or turn.cancelled or event.seq in turn.texts:
                return  # a duplicate (an LLM job run twice) or too late: each seq once
            turn.first_text_ns = turn.first_text_ns or event.created_ns
            if event.ttft_ms is not None:
                turn.llm_ttft_ms = event.ttft_ms
            turn.texts[event.seq] = event.text
            await self.send(protocol.Reply(turn_id, event.seq, event.text, event.last))
        elif isinstance(event, AudioChunk):
            await self.on_audio(turn, event)

    def forget_old_turns(self) -> None:
        """A long session keeps only its recent turns' state; older finished turns are
        remembered by id only, so their late events are still ignored."""
        done = [t for t, state in self.turns.items() if state.done]
        for turn_id in done[:max(0, len(self.turns) - KEEP_TURNS)]:
            del self.turns[turn_id]
            self.forgotten.append(turn_id)

    async def on_audio(self, turn: TurnState, chunk: AudioChunk) -> None:
        if turn.cancelled or turn.done:
            return  # audio of a turn that was cut off (or a late duplicate): never sent
        if chunk.pcm and turn.first_tts_ns is None:
            turn.first_tts_ns = chunk.created_ns
        key = (chunk.seq, chunk.part)
        if key < turn.next_part or key in turn.pending:
            return  # a duplicate (a redelivered TTS job): each part goes out once
        turn.pending[key] = chunk
        await self.release(turn)

    async def hold_limit(self, turn: TurnState) -> None:
        await asyncio.sleep(HOLD_LIMIT_S)
        if turn.held and not turn.cancelled:
            log.warning("turn %s: no commit %.0f s after its tentative end; playing it",
                        turn.turn_id, HOLD_LIMIT_S)
            turn.held = False
            self.inbox.put_nowait(ReleaseNotice(turn.turn_id))

    async def release(self, turn: TurnState) -> None:
        """Send the turn's audio parts that are next in order (none while it is held)."""
        while not turn.held and turn.next_part in turn.pending:
            part = turn.pending.pop(turn.next_part)
            await self.send_audio(turn, part)
            if turn.cancelled:
                return
            if part.last:
                await self.end_turn(turn, interrupted=False)
                return
            seq, index = turn.next_part
            turn.next_part = (seq + 1, 0) if part.final_part else (seq, index + 1)
            if part.final_part:
                turn.complete.add(seq)

    async def send_audio(self, turn: TurnState, part: AudioChunk) -> None:
        if not part.pcm:
            return
        if self.current is not turn or not turn.announced:
            self.current = turn
            turn.announced, turn.sample_rate = True, part.sample_rate
            await self.send(protocol.Audio(turn.turn_id, part.sample_rate))
        if turn.first_sent_ns is None:
            turn.first_sent_ns = time.time_ns()
            self.gateway.spawn(self.mark_audible(turn))
        await self.ws.send(part.pcm)
        n = len(part.pcm) // 2
        turn.sent_samples += n
        turn.samples[part.seq] = turn.samples.get(part.seq, 0) + n

    async def mark_audible(self, turn: TurnState) -> None:
        """The device is about to hear this turn: speech from now on (past the VAD's
        grace time) is a barge-in, not a continuation of the user's turn."""
        with contextlib.suppress(RedisError, OSError):
            await self.gateway.redis.set(self.keys.audible(self.session_id),
                                         f"{turn.turn_id} {turn.first_sent_ns}",
                                         ex=self.gateway.config.redis.session_ttl_s)

    async def end_turn(self, turn: TurnState, *, interrupted: bool) -> None:
        if turn.done:
            return
        turn.done = True
        await self.send(turn_done_message(turn, interrupted))
        outcome = ("continued" if turn.continued else "cut off" if interrupted else "sent")
        with log_context(session_id=self.session_id, turn_id=turn.turn_id):
            log.info("turn %s %s: %s", turn.turn_id, outcome, turn.latency_ms())
        record_spans(turn, self.session_id, self.user_id, interrupted)
        await record_latency(self.gateway.redis, self.keys, turn, interrupted)
        if turn.continued:
            return
        if not interrupted:  # the device may already have played it all
            self.on_played(turn.turn_id, turn.played)

    async def on_cancelled(self, turn_id: str, reason: str = "") -> None:
        continued = reason == "continued"
        turn = self.turns.get(turn_id)
        if turn is None:  # nothing of it reached us yet: make sure nothing will be sent
            self.turns[turn_id] = TurnState(turn_id, cancelled=True, done=True,
                                            continued=continued)
            return
        if turn.cancelled:
            return
        fully_played = turn.done and turn.played >= turn.sent_samples
        turn.cancelled = True
        turn.continued = continued and not fully_played
        turn.pending.clear()
        cancelled_at = time.monotonic()
        if fully_played:
            return
        if not turn.sent_samples:  # cut off before any of it was played: the user heard nothing
            await self.end_turn(turn, interrupted=not continued)
            if turn.texts and not continued:
                self.gateway.spawn(self.store_heard(turn))
            return
        # Audio went out: stop (nothing more is sent from here on), flush the device,
        # then store what was heard (in the background: the next turn goes on). A
        # continued turn stores nothing: the LLM stage drops its reply from memory.
        turn.played_event.clear()
        await self.send(protocol.Flush(turn_id, "continued" if continued else "barge-in"))
        log.info("%s on turn %s: audio stopped %.1f ms after the cancel arrived "
                 "(%d samples had been sent)", "continuation" if continued else "barge-in",
                 turn_id, (time.monotonic() - cancelled_at) * 1000, turn.sent_samples)
        await self.end_turn(turn, interrupted=not continued)
        if not continued:
            self.gateway.spawn(self.store_heard(turn))

    async def store_heard(self, turn: TurnState) -> None:
        """Wait briefly for the device's played report, then report what was heard."""
        turn_id = turn.turn_id
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PLAYED_WAIT_S):
                await turn.played_event.wait()
        heard = turn.heard_text(turn.played)
        try:  # the LLM stage's memory keeps only this of the reply
            await self.publish_through_outage(self.keys.job_queue("llm", self.session_id), Heard(
                session_id=self.session_id, turn_id=turn_id, user_id=self.user_id,
                text=heard, played_samples=turn.played, sent_samples=turn.sent_samples,
                traceparent=turn.traceparent))
        except (RedisError, OSError) as exc:
            log.warning("could not report what was heard of turn %s: %s", turn_id, exc)
        else:
            log.info("turn %s: the user heard %d of %d samples: %r", turn_id, turn.played,
                     turn.sent_samples, heard)

    async def finish_playback(self, turn: TurnState) -> None:
        """The device played the whole turn: the agent has stopped talking."""
        key = self.keys.active_turn(self.session_id)
        with contextlib.suppress(RedisError, OSError):
            await self.gateway.unset_if(key, turn.turn_id)

    async def send(self, message: protocol.GatewayMessage) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(protocol.dump(message))

    # -- teardown -----------------------------------------------------------
    async def teardown(self, reason: str) -> None:
        bus, keys, sid = self.gateway.bus, self.keys, self.session_id
        live = [t for t in self.turns.values() if not t.done and not t.cancelled]
        with contextlib.suppress(RedisError, OSError):
            for turn in live:
                await self.gateway.cancel.cancel(sid, turn.turn_id, "device disconnected")
            await bus.publish(keys.audio(sid), SessionEnded(session_id=sid, reason=reason))
            ttl = self.gateway.config.redis.session_ttl_s
            # The VAD tears the session down too; the shortest TTL wins, in any order.
            await bus.shorten_ttls({
                keys.audio(sid): ttl,  # the VAD shortens it once it has read it
                keys.out(sid): min(ttl, 60),  # nobody reads it any more
                keys.cancelled(sid): ttl})
            await bus.redis.delete(keys.active_turn(sid), keys.audible(sid))


class Closing(Exception):
    """Close the connection with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class TurnCancelledNotice:
    """Internal: the cancel lane said a turn of this session was cancelled."""

    turn_id: str
    reason: str = ""


@dataclass(frozen=True)
class ReleaseNotice:
    """Internal: a held turn's audio may go out (its hold limit passed)."""

    turn_id: str

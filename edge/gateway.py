"""The gateway: edge devices speak WebSocket (``edge.protocol``); the bus speaks Redis.

One connection is one session. The handshake is refused (HTTP 401) unless the
device shows a valid token (``edge.auth``); the token's user becomes the
session's ``user_id`` (memory is keyed by it), whatever the device says later.

* **In**: ``start`` declares the device's sample rate -> ``SessionStarted`` on the
  sessions stream; every binary frame -> an ``AudioFrame`` (``seq`` in arrival
  order) on the session's audio stream; the end of the connection ->
  ``SessionEnded``.
* **Out**: one task tails the out streams of every session of this process in a
  single ``XREAD`` and hands each event to its session. Reply audio is released
  to the device in ``(seq, part)`` order, each part once (duplicates dropped,
  early parts held until the gap fills), preceded by an ``audio`` message naming
  the turn; transcripts and reply text go out as JSON for the device to show; at
  the end of a turn, ``turn_done`` carries the latency breakdown.
* **Barge-in**: another task tails the cancel lane. When a turn of a session is
  cancelled (the VAD cancels the live turn when the user starts speaking), the
  gateway stops sending its audio at once, tells the device to ``flush``, waits
  briefly for the device's ``played`` report, and stores in memory only the text
  the user heard (``ConversationMemory.record_heard``). The time from the cancel
  to the last audio byte sent is logged.
* **Continuation**: the first audio byte of a turn sent to the device is marked in
  ``keys.audible`` (turn and time), so the VAD can tell speech that came before the
  user heard anything (the turn goes on: the agent turn is cancelled with reason
  ``continued``) from a barge-in. A continued turn is flushed like a barge-in but
  stores nothing, reports ``turn_done`` with ``continued: true``, and its trace root
  is recorded by the turn that continues it (same trace, whole utterance).
* **Tentative turns**: a ``TurnEnded(tentative=True)`` (the VAD ended the turn
  before the transcript's verdict) holds the turn's audio until the turn's second,
  committing ``TurnEnded``; a continued turn never plays.
* When a turn has been played out completely, its ``active_turn`` marker is
  removed, so the user's next words are a new turn, not a barge-in.
* **Limits** (``gateway.*``): frame size (1009), frames per second (4008),
  session length (4002), idle time (4003); a bad message closes with 1008. Each
  close names the reason. A misbehaving device never affects other sessions.
* **Teardown**: on disconnect the session's live turn is cancelled, its audio
  stream gets ``SessionEnded`` (the VAD releases the session and lets its keys
  expire), its out stream and cancel hash expire, its ``active_turn`` is deleted,
  and its tasks end. Nothing of it stays in this process.

The gateway never exposes Redis: devices see only the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edge import protocol
from edge.auth import TokenError, load_secret, verify
from schemas import (
    AudioChunk,
    AudioFrame,
    Event,
    SchemaError,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    TextChunk,
    Transcript,
    TurnEnded,
    decode,
)
from workers.config import Config
from workers.llm.memory import ConversationMemory
from workers.observability import metrics, semconv, telemetry
from workers.observability.logs import log_context
from workers.runtime.bus import FIELD, Bus, connect, read
from workers.runtime.cancel import CancelLane
from workers.runtime.keys import Keys

log = logging.getLogger("voicebus.gateway")

START_TIMEOUT_S = 10.0  # a device must say ``start`` this soon after connecting
PLAYED_WAIT_S = 0.3  # after a flush, how long to wait for the device's played report
# A tentative turn's audio is released after this long even without its commit (the VAD
# that ended it died before committing: its peer does not know the turn).
HOLD_LIMIT_S = 6.0
OUT_BLOCK_MS = 50  # the out-stream reader's XREAD block: also how soon new sessions join
FRAME_TIMES = 4096  # (audio ms, arrival) pairs kept per session to place speech ends in time
KEEP_TURNS = 32  # turn states kept per session


@dataclass
class TurnState:
    """What the gateway knows about one agent turn of a session."""

    turn_id: str
    speech_end_ms: int | None = None
    speech_end_ns: int | None = None  # wall clock when that audio reached the gateway
    decided_ns: int | None = None  # TurnEnded.created_ns
    committed_ns: int | None = None  # the commit of a tentative end (its second TurnEnded)
    held: bool = False  # tentatively ended: its audio waits for the commit
    transcript_ns: int | None = None
    first_text_ns: int | None = None
    llm_ttft_ms: float | None = None
    first_tts_ns: int | None = None
    first_sent_ns: int | None = None  # first audio byte sent to the device
    rule: str = ""
    continues: str = ""  # the dropped turn this one continues (same trace)
    continued: bool = False  # dropped: the user went on before hearing any of it
    trace_id: str = ""
    traceparent: str = ""  # the turn's trace context; its span id is the root span's
    speech_start_ns: int | None = None  # wall clock when the turn's speech reached us
    texts: dict[int, str] = field(default_factory=dict)  # reply text per seq
    pending: dict[tuple[int, int], AudioChunk] = field(default_factory=dict)
    next_part: tuple[int, int] = (0, 0)  # the (seq, part) to send next
    samples: dict[int, int] = field(default_factory=dict)  # samples sent per seq
    complete: set[int] = field(default_factory=set)  # seqs whose final part was sent
    sent_samples: int = 0
    sample_rate: int = 0
    announced: bool = False  # the "audio" message went out
    done: bool = False  # turn_done sent (all audio sent, or cut off)
    cancelled: bool = False
    played: int = 0  # samples the device reports having played
    played_event: asyncio.Event = field(default_factory=asyncio.Event)

    def latency_ms(self) -> dict[str, float]:
        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round((end - start) / 1e6, 1)

        marks = {
            "turn_detect": ms(self.speech_end_ns, self.decided_ns),
            "turn_commit": ms(self.speech_end_ns, self.committed_ns),
            "asr": ms(self.decided_ns, self.transcript_ns),
            "llm_ttft": self.llm_ttft_ms,
            "llm_first_text": ms(self.transcript_ns, self.first_text_ns),
            "tts_first_chunk": ms(self.first_text_ns, self.first_tts_ns),
            "end_of_speech_to_first_audio": ms(self.speech_end_ns, self.first_sent_ns),
        }
        return {k: v for k, v in marks.items() if v is not None}

    def heard_text(self, played: int) -> str:
        """The reply text the user heard, given ``played`` samples of its audio."""
        words: list[str] = []
        left = played
        for seq in sorted(self.texts):
            text = self.texts[seq]
            total = self.samples.get(seq, 0)
            if seq in self.complete and left >= total:
                words.extend(text.split())
                left -= total
                continue
            if total and left > 0:  # part of this chunk was heard: its share of the words
                share = text.split()
                words.extend(share[: int(len(share) * min(1.0, left / total))])
            break
        return " ".join(words)


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
        self.frame_times: deque[tuple[int, int]] = deque(maxlen=FRAME_TIMES)
        self.seq = 0
        self.started = time.monotonic()
        self.last_frame = time.monotonic()
        self.window_start = time.monotonic()
        self.window_frames = 0

    @property
    def keys(self) -> Keys:
        return self.gateway.keys

    # -- inbound ------------------------------------------------------------
    async def on_frame(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_frame = now
        if now - self.window_start >= 1.0:
            self.window_start, self.window_frames = now, 0
        self.window_frames += 1
        if self.window_frames > self.gateway.config.gateway.max_frames_per_s:
            raise Closing(protocol.CLOSE_RATE, "too many frames per second")
        if len(data) % 2:
            raise Closing(protocol.CLOSE_POLICY, "audio must be PCM16: odd number of bytes")
        if not data:
            return
        self.samples_in += len(data) // 2
        self.frame_times.append((self.samples_in * 1000 // self.rate, time.time_ns()))
        await self.gateway.bus.publish(self.keys.audio(self.session_id), AudioFrame(
            session_id=self.session_id, seq=self.seq, sample_rate=self.rate, pcm=data))
        self.seq += 1

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
        for end_ms, arrived in self.frame_times:
            if end_ms >= audio_ms:
                return arrived
        return None

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
            await self.send_json({"type": "speech_started", "turn_id": turn_id,
                                  "continues": event.continues})
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
            await self.send_json({"type": "transcript", "turn_id": turn_id, "text": event.text,
                                  "final": True, "failed": event.failed})
        elif isinstance(event, TextChunk):
            turn.first_text_ns = turn.first_text_ns or event.created_ns
            if event.ttft_ms is not None:
                turn.llm_ttft_ms = event.ttft_ms
            turn.texts[event.seq] = event.text
            await self.send_json({"type": "reply", "turn_id": turn_id, "seq": event.seq,
                                  "text": event.text, "last": event.last})
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
            await self.send_json({"type": "audio", "turn_id": turn.turn_id,
                                  "sample_rate": part.sample_rate})
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
        await self.send_json({"type": "turn_done", "turn_id": turn.turn_id,
                              "interrupted": interrupted, "continued": turn.continued,
                              "continues": turn.continues, "trace_id": turn.trace_id,
                              "rule": turn.rule, "latency_ms": turn.latency_ms()})
        outcome = ("continued" if turn.continued else "cut off" if interrupted else "sent")
        with log_context(session_id=self.session_id, turn_id=turn.turn_id):
            log.info("turn %s %s: %s", turn.turn_id, outcome, turn.latency_ms())
        self.record_spans(turn, interrupted)
        latency = turn.latency_ms()
        metrics.record_turn(latency, interrupted, turn.continued)
        if turn.continued:
            return  # not a turn the user waited for: no latency entry
        with contextlib.suppress(RedisError, OSError):
            await self.gateway.redis.xadd(
                self.keys.turn_latency(), metrics.turn_entry(latency, interrupted, turn.rule),
                maxlen=metrics.TURN_LATENCY_MAXLEN, approximate=True)
        if not interrupted:  # the device may already have played it all
            self.on_played(turn.turn_id, turn.played)

    def record_spans(self, turn: TurnState, interrupted: bool) -> None:
        """The turn's root span (speech start -> now: the last byte sent, or the cut) and
        the playback span, with the ids the turn's events already name as parent."""
        now = time.time_ns()
        start = turn.speech_start_ns or turn.speech_end_ns or turn.decided_ns or now
        outcome = "continued" if turn.continued else "interrupted" if interrupted else "answered"
        attributes: dict[str, Any] = {
            semconv.SESSION_ID: self.session_id, semconv.TURN_ID: turn.turn_id,
            semconv.USER_ID: self.user_id, semconv.INTERRUPTED: interrupted,
            semconv.TURN_RULE: turn.rule, semconv.TURN_OUTCOME: outcome,
            **({semconv.TURN_CONTINUES: turn.continues} if turn.continues else {}),
            **{semconv.LATENCY_PREFIX + k: v for k, v in turn.latency_ms().items()}}
        tracer = telemetry.tracer()
        if turn.continued:
            # The trace's root is recorded by the turn that continues this one (the same
            # trace covers the whole utterance); this one is a marked child of it.
            if turn.traceparent:
                tracer.start_span(semconv.TURN_CONTINUED, start_time=min(start, now),
                                  context=telemetry.parent_of(turn.traceparent),
                                  attributes=attributes).end(end_time=now)
            return
        with telemetry.root_span_ids(turn.traceparent) as preset:
            if not preset:
                return  # events without trace context (a producer that sets none)
            tracer.start_span(semconv.TURN, start_time=min(start, now), attributes=attributes,
                              kind=SpanKind.SERVER).end(end_time=now)
        if turn.first_sent_ns is not None:
            tracer.start_span(semconv.PLAYBACK, context=telemetry.parent_of(turn.traceparent),
                              start_time=turn.first_sent_ns, attributes={
                                  semconv.SENT_SAMPLES: turn.sent_samples,
                                  semconv.INTERRUPTED: interrupted}).end(end_time=now)

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
        await self.send_json({"type": "flush", "turn_id": turn_id,
                              "reason": "continued" if continued else "barge-in"})
        log.info("%s on turn %s: audio stopped %.1f ms after the cancel arrived "
                 "(%d samples had been sent)", "continuation" if continued else "barge-in",
                 turn_id, (time.monotonic() - cancelled_at) * 1000, turn.sent_samples)
        await self.end_turn(turn, interrupted=not continued)
        if not continued:
            self.gateway.spawn(self.store_heard(turn))

    async def store_heard(self, turn: TurnState) -> None:
        """Wait briefly for the device's played report, then keep only what was heard."""
        turn_id = turn.turn_id
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PLAYED_WAIT_S):
                await turn.played_event.wait()
        heard = turn.heard_text(turn.played)
        try:
            await self.gateway.memory.record_heard(self.user_id, turn_id, heard)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("could not store what was heard of turn %s: %s", turn_id, exc)
        else:
            log.info("turn %s: the user heard %d of %d samples: %r", turn_id, turn.played,
                     turn.sent_samples, heard)

    async def finish_playback(self, turn: TurnState) -> None:
        """The device played the whole turn: the agent has stopped talking."""
        key = self.keys.active_turn(self.session_id)
        with contextlib.suppress(RedisError, OSError):
            await self.gateway.unset_if(key, turn.turn_id)

    async def send_json(self, message: dict[str, Any]) -> None:
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
            async with bus.redis.pipeline(transaction=False) as pipe:
                pipe.expire(keys.audio(sid), ttl)  # the VAD shortens it once it has read it
                pipe.expire(keys.out(sid), min(ttl, 60))
                pipe.expire(keys.cancelled(sid), ttl)
                pipe.delete(keys.active_turn(sid), keys.audible(sid))
                await pipe.execute()


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


class Gateway:
    """The WebSocket server and the bus tasks shared by its sessions."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.keys = Keys(config.redis.key_prefix)
        self.redis = connect(redis_url)
        self.reader = connect(redis_url, blocking_ms=OUT_BLOCK_MS)
        self.control_reader = connect(redis_url, blocking_ms=1000)
        self.bus = Bus(self.redis, self.keys, maxlen=config.redis.maxlen.model_dump())
        self.cancel = CancelLane(self.bus, config.redis.session_ttl_s)
        self.cancel.listeners.append(self._on_cancel)
        self.memory = ConversationMemory(self.redis, config.redis.key_prefix, config.memory,
                                         config.context_window, config.prompt_budget())
        self.secret = load_secret(config.gateway.secret, config.gateway.secret_file)
        self.sessions: dict[str, DeviceSession] = {}
        self.positions: dict[str, str] = {}  # out stream -> last id read
        self.by_stream: dict[str, DeviceSession] = {}  # out stream -> its session
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop = asyncio.Event()
        self.server: Server | None = None
        self._unset = self.redis.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
            "end return 0")

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        cfg = self.config.gateway
        self.server = await serve(
            self.handle, cfg.host, cfg.port, process_request=self.authenticate,
            max_size=cfg.max_frame_bytes, ping_interval=20, ping_timeout=20, close_timeout=3)
        host, port = self.server.sockets[0].getsockname()[:2] if self.server.sockets else (
            cfg.host, cfg.port)
        self.spawn(self.read_out_streams())
        self.spawn(self.watch_cancels())
        return str(host), int(port)

    async def close(self) -> None:
        self.stop.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in (self.redis, self.reader, self.control_reader):
            await client.aclose()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def unset_if(self, key: str, value: str) -> None:
        await self._unset(keys=[key], args=[value])

    # -- handshake ----------------------------------------------------------
    def authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path)
        if path.path != protocol.PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, f"no such path; use "
                                      f"{protocol.PATH}\n")
        token = _bearer(request.headers) or next(iter(parse_qs(path.query).get("token", [])),
                                                 None)
        try:
            user = verify(self.secret, token)
        except TokenError as exc:
            log.info("refused a device from %s: %s", connection.remote_address, exc)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, f"token refused: {exc}\n")
        connection.user_id = user  # type: ignore[attr-defined]
        return None

    # -- one connection -----------------------------------------------------
    async def handle(self, ws: ServerConnection) -> None:
        user: str = getattr(ws, "user_id", "")
        cfg = self.config.gateway
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                first = await ws.recv()
            if isinstance(first, bytes):
                raise Closing(protocol.CLOSE_POLICY, "the first message must be start")
            start = protocol.parse_device_message(first)
            if start["type"] != "start" or not 8000 <= start["sample_rate"] <= 48000:
                raise Closing(protocol.CLOSE_POLICY,
                              "the first message must be start with 8000 <= sample_rate <= 48000")
        except TimeoutError:
            await ws.close(protocol.CLOSE_POLICY, "no start message")
            return
        except protocol.ProtocolError as exc:
            await ws.close(protocol.CLOSE_POLICY, str(exc)[:120])
            return
        except Closing as exc:
            await ws.close(exc.code, exc.reason)
            return
        except ConnectionClosed:
            return
        session = DeviceSession(self, ws, user, start["sample_rate"])
        sid = session.session_id
        self.sessions[sid] = session
        self.positions[self.keys.out(sid)] = "0-0"
        self.by_stream[self.keys.out(sid)] = session
        pump = self.spawn(session.pump())
        watchdog = self.spawn(self._watchdog(session))
        reason = "device disconnected"
        with log_context(session_id=sid):
            try:
                await self.bus.publish(self.keys.sessions(), SessionStarted(
                    session_id=sid, user_id=user, sample_rate=session.rate))
                log.info("device connected: user %s, %d Hz", user, session.rate)
                await session.send_json({
                    "type": "ready", "session_id": sid, "user_id": user,
                    "out_rate": self.config.tts.sample_rate, "version": protocol.VERSION,
                    "limits": {"max_frame_bytes": cfg.max_frame_bytes,
                               "max_frames_per_s": cfg.max_frames_per_s,
                               "max_session_s": cfg.max_session_s,
                               "idle_timeout_s": cfg.idle_timeout_s}})
                async for message in ws:
                    if isinstance(message, bytes):
                        await session.on_frame(message)
                        continue
                    parsed = protocol.parse_device_message(message)
                    if parsed["type"] == "played":
                        session.on_played(parsed["turn_id"], parsed["samples"])
                    elif parsed["type"] == "stop":
                        reason = "device said stop"
                        await ws.close(protocol.CLOSE_NORMAL, "bye")
                        break
                    else:
                        raise Closing(protocol.CLOSE_POLICY, "start was already sent")
            except Closing as exc:
                reason = exc.reason
                log.info("closing the connection: %s (%d)", exc.reason, exc.code)
                # Keep reading (and dropping) what the device still sends: a flooding
                # device is blocked on a full socket and would never see our close.
                drain = self.spawn(_drain(ws))
                await session.send_json({"type": "error", "reason": exc.reason})
                await ws.close(exc.code, exc.reason)
                drain.cancel()
            except protocol.ProtocolError as exc:
                reason = f"protocol error: {exc}"
                await session.send_json({"type": "error", "reason": reason})
                await ws.close(protocol.CLOSE_POLICY, reason[:120])
            except ConnectionClosed:
                pass
            except (RedisError, OSError) as exc:
                reason = f"bus unavailable: {exc}"
                log.warning("closing the connection: %s", reason)
                await ws.close(protocol.CLOSE_SERVER_ERROR, "bus unavailable")
            finally:
                watchdog.cancel()
                pump.cancel()
                self.sessions.pop(sid, None)
                self.positions.pop(self.keys.out(sid), None)
                self.by_stream.pop(self.keys.out(sid), None)
                await session.teardown(reason)
                log.info("session ended: %s", reason)

    async def _watchdog(self, session: DeviceSession) -> None:
        cfg = self.config.gateway
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now - session.started > cfg.max_session_s:
                code, reason = protocol.CLOSE_SESSION_TOO_LONG, "session too long"
            elif now - session.last_frame > cfg.idle_timeout_s:
                code, reason = protocol.CLOSE_IDLE, "idle too long"
            else:
                continue
            log.info("closing session %s: %s", session.session_id, reason)
            await session.send_json({"type": "error", "reason": reason})
            await session.ws.close(code, reason)
            return

    # -- the bus ------------------------------------------------------------
    async def read_out_streams(self) -> None:
        """One XREAD for the out streams of every session here; events to their session."""
        backoff = 0.1
        while not self.stop.is_set():
            if not self.positions:
                await asyncio.sleep(OUT_BLOCK_MS / 1000)
                continue
            try:
                replies = await read(self.reader, dict(self.positions), 256, OUT_BLOCK_MS)
                backoff = 0.1
            except (RedisError, OSError) as exc:
                log.warning("reading out streams failed (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            for stream, entries in replies:
                if stream not in self.positions:
                    continue  # the session ended meanwhile
                self.positions[stream] = entries[-1][0]
                session = self.by_stream.get(stream)
                for _entry_id, fields in entries:
                    try:
                        event = decode(fields.get(FIELD, b""))
                    except SchemaError as exc:
                        log.warning("undecodable entry on %s: %s", stream, exc)
                        continue
                    if session is not None:
                        session.inbox.put_nowait(event)

    def _on_cancel(self, session_id: str, turn_id: str, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.inbox.put_nowait(TurnCancelledNotice(turn_id, reason))

    async def watch_cancels(self) -> None:
        """Tail the cancel lane; a cancelled turn of a session here goes to that session."""
        backoff = 0.1
        while not self.stop.is_set():
            try:
                await self.cancel.watch(self.control_reader, 1000, self.stop)
            except (RedisError, OSError) as exc:
                log.warning("reading the cancel lane failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)


async def _drain(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


def _bearer(headers: Headers) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def run(config: Config, redis_url: str, ready: asyncio.Event | None = None,
              install_signals: bool = True) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); then close every connection
    (1001, going away: their sessions are torn down as on any disconnect)."""
    gateway = Gateway(config, redis_url)
    host, port = await gateway.start()
    log.info("gateway listening on ws://%s:%d%s (redis %s)", host, port, protocol.PATH,
             redis_url)
    stop = asyncio.Event()
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("stopping: closing %d device connection(s)", len(gateway.sessions))
    finally:
        await gateway.close()
        log.info("gateway stopped")

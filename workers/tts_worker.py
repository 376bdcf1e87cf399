"""TTS stage (job): a text chunk of the reply in, its audio out, streamed.

* ``TextChunk(seq, text, last)`` -> ``AudioChunk``s on the session's out stream, parts
  ``0..k`` of that ``seq``, with the turn's trace context. ``final_part`` marks part
  ``k``, ``last`` is set on it when the text chunk was the reply's last, and part 0
  carries the chunk's text (captions, memory). The gateway plays ``(seq, part)`` in
  order, so text chunks of one turn may be synthesized by different workers at once.
* **Streaming**: the text is split into sentences (``workers.text.chunking``) and each
  audio piece goes out the moment the backend has it (Piper: sentence by sentence),
  resampled to ``tts.sample_rate`` and sliced to at most ``tts.chunk_size`` x 40 ms.
  Synthesis runs in a thread, the next piece started while the last one is written.
  Only the very end is held back, and only briefly (``HOLD_S``): a part is sent as
  ``final_part`` when the backend says there is nothing more in time, else it goes
  as is and an empty part ends the chunk later. An empty text (the reply ended on the
  previous chunk) becomes one empty final part. Where a chunk ends mid-sentence (word
  mode's first words) it keeps only ``JOIN_TAIL_S`` of silence, and so does the start
  of the chunk that goes on: the sentence runs on without the break the voice puts
  around every utterance it speaks.
* **Failures** never leave the gateway waiting: the backend's fallback (espeak-ng,
  see ``workers.backends.tts``) speaks what the primary cannot; if synthesis still
  fails, the audio so far ends with an (empty) final part and an error is logged.
* **Cancellation**: every wait for the backend is raced against the turn's cancel
  event; once cancelled nothing more is emitted and the synthesis is abandoned at
  its next piece.
* **Metrics**: one log line per text chunk (time to first audio, audio and synthesis
  seconds, real-time factor, backend), also kept as ``ChunkMetrics`` in
  ``TtsStage.recent`` for benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from schemas import AudioChunk, Event, TextChunk
from workers.backends.audio import float_to_pcm16, resample, voiced_end
from workers.backends.tts import Piece, TtsBackend, load_backend
from workers.config import Config
from workers.observability import semconv
from workers.observability.metrics import fallbacks
from workers.runtime import Context, Emit, JobStage
from workers.text.chunking import chunks, ends_sentence

log = logging.getLogger(__name__)

TOKEN_S = 0.04  # one ``tts.chunk_size`` unit: a chatterbox speech token (25 Hz)
HOLD_S = 0.05  # the last audio of a chunk waits this long to learn it is the last
# Silence kept on each side of a mid-sentence join (word mode's first words): the voice
# puts 0.15-0.25 s after every utterance (and up to 0.4 s before some), as long as its
# pause between sentences, and a listener hears that as a break in the sentence.
JOIN_TAIL_S = 0.05
RECENT = 256  # ChunkMetrics kept for benchmarks

# The backend's pieces of one text chunk, each with "more sentences follow".
Steps = Generator[tuple[Piece, bool], None, None]


@dataclass
class ChunkMetrics:
    """What synthesizing one text chunk took."""

    seq: int
    started: float = field(default_factory=time.perf_counter)
    first_audio: float | None = None  # when the first non-empty part was handed out
    audio_s: float = 0.0  # seconds of audio produced
    synth_s: float = 0.0  # seconds the backend computed (waits for a busy model excluded)
    parts: int = 0  # AudioChunks emitted (counted by the handler, not by speak)
    backends: list[str] = field(default_factory=list)  # in the order they spoke
    outcome: str = "ok"  # ok, cancelled or failed
    error: str = ""

    @property
    def ttfa_ms(self) -> float | None:
        return None if self.first_audio is None else (self.first_audio - self.started) * 1000

    @property
    def rtf(self) -> float | None:
        return self.synth_s / self.audio_s if self.audio_s else None

    @property
    def backend(self) -> str:
        return "+".join(self.backends) or "-"

    def line(self) -> str:
        ttfa = "-" if self.ttfa_ms is None else f"{self.ttfa_ms:.0f} ms"
        rtf = "-" if self.rtf is None else f"{self.rtf:.3f}"
        return (f"seq {self.seq}: first audio {ttfa}, {self.audio_s:.2f} s audio in "
                f"{self.synth_s:.2f} s (RTF {rtf}), {self.parts} parts, {self.backend}: "
                f"{self.outcome}")


class _Cancelled(Exception):
    """The turn was cancelled while waiting for the backend."""


class TtsStage:
    """The handler, holding the loaded backend."""

    def __init__(self, backend: TtsBackend, sample_rate: int = 24_000,
                 chunk_size: int = 25) -> None:
        self.backend = backend
        self.sample_rate = sample_rate
        self.max_samples = max(1, round(chunk_size * TOKEN_S * sample_rate))
        self.recent: deque[ChunkMetrics] = deque(maxlen=RECENT)

    async def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]:
        if not isinstance(event, TextChunk):
            return
        metrics = ChunkMetrics(event.seq)
        out = ctx.keys.out(event.session_id)
        try:
            async with contextlib.aclosing(
                    self.speak(event.text, ctx.cancel_event(), metrics)) as parts:
                async for pcm, final in parts:
                    if ctx.cancelled():
                        raise _Cancelled
                    yield Emit(out, AudioChunk(
                        session_id=event.session_id, turn_id=event.turn_id, seq=event.seq,
                        sample_rate=self.sample_rate, pcm=pcm, part=metrics.parts,
                        final_part=final, last=event.last and final,
                        text=event.text if metrics.parts == 0 else "",
                        traceparent=event.traceparent, tracestate=event.tracestate))
                    metrics.parts += 1
        except _Cancelled:
            metrics.outcome = "cancelled"
        self.recent.append(metrics)
        span = trace.get_current_span()  # the runtime's span for this chunk
        if "espeak" in metrics.backends and self.backend.name != "espeak":
            fallbacks.add(1, {"kind": "tts_espeak"})
        span.set_attributes({semconv.TTS_SEQ: event.seq, semconv.TTS_BACKEND: metrics.backend,
                             semconv.OUTCOME: metrics.outcome})
        if metrics.ttfa_ms is not None:
            span.set_attribute(semconv.TTS_FIRST_AUDIO_MS, round(metrics.ttfa_ms, 1))
        if metrics.rtf is not None:
            span.set_attribute(semconv.TTS_RTF, round(metrics.rtf, 4))
        if metrics.outcome == "failed":
            log.error("tts failed (%s); the chunk's audio ends here. %s", metrics.error,
                      metrics.line())
        else:
            log.info("tts %s", metrics.line())

    async def speak(self, text: str, cancel: asyncio.Event,
                    metrics: ChunkMetrics) -> AsyncGenerator[tuple[bytes, bool], None]:
        """``text`` as PCM16 parts at ``sample_rate``, each with "is it the final part".

        Raises ``_Cancelled`` when ``cancel`` is set; a synthesis error ends the audio
        with a final part (what was held back, or empty) and is noted in ``metrics``.
        """
        steps = self._pieces(text)
        step = _advance(steps)
        cancelled = asyncio.ensure_future(cancel.wait())
        held: bytes | None = None  # the newest part, until we know whether it is final
        try:
            while True:
                hold = HOLD_S if held is not None else None
                waiting: set[asyncio.Future[Any]] = {step, cancelled}
                await asyncio.wait(waiting, timeout=hold, return_when=asyncio.FIRST_COMPLETED)
                if cancel.is_set():
                    raise _Cancelled
                if not step.done():  # held long enough: send it; it may not be final
                    assert held is not None
                    yield self._hand_out(held, False, metrics)
                    held = None
                    continue
                try:
                    item = step.result()
                    if item is None:
                        break
                    piece, more_text = item
                    step = _advance(steps)  # synthesize on while we send this
                    parts = self._slices(piece)
                except Exception as exc:  # what the backend (and its fallback) raised
                    metrics.outcome, metrics.error = "failed", f"{type(exc).__name__}: {exc}"
                    break
                metrics.synth_s += piece.synth_s
                if piece.backend not in metrics.backends:
                    metrics.backends.append(piece.backend)
                if held is not None:
                    parts.insert(0, held)
                held = None if more_text or not parts else parts.pop()
                for part in parts:
                    yield self._hand_out(part, False, metrics)
            yield self._hand_out(held or b"", True, metrics)
        finally:
            cancelled.cancel()
            _close_after(step, steps)

    def _pieces(self, text: str) -> Steps:
        """The backend's pieces, sentence by sentence, each with "more text follows"."""
        sentences = chunks([text])
        open_start = text.lstrip()[:1].islower()  # sentences start with a capital
        open_end = not ends_sentence(text)
        for i, sentence in enumerate(sentences):
            last = i == len(sentences) - 1
            for piece in self.backend.synthesize(sentence):
                # Every backend here speaks a sentence as one piece: it is the whole
                # sentence, so its head and tail are the join's.
                yield _join(piece, head=open_start and i == 0, tail=open_end and last), not last

    def _slices(self, piece: Piece) -> list[bytes]:
        audio = resample(piece.audio, piece.sample_rate, self.sample_rate)
        pcm = float_to_pcm16(audio)
        size = 2 * self.max_samples
        return [pcm[i:i + size] for i in range(0, len(pcm), size)]

    def _hand_out(self, pcm: bytes, final: bool, metrics: ChunkMetrics) -> tuple[bytes, bool]:
        if pcm and metrics.first_audio is None:
            metrics.first_audio = time.perf_counter()
        metrics.audio_s += len(pcm) / 2 / self.sample_rate
        return pcm, final


def _join(piece: Piece, *, head: bool, tail: bool) -> Piece:
    """``piece`` with at most ``JOIN_TAIL_S`` of silence at a mid-sentence join: after
    its voice (``tail``), before it (``head``). Never cuts into the voice."""
    audio, margin = piece.audio, round(JOIN_TAIL_S * piece.sample_rate)
    if tail:
        audio = audio[:voiced_end(audio, piece.sample_rate) + margin]
    if head:
        start = audio.size - voiced_end(audio[::-1], piece.sample_rate)
        audio = audio[max(0, start - margin):]
    return piece if audio is piece.audio else dataclasses.replace(piece, audio=audio)


def _advance(steps: Steps) -> asyncio.Future[tuple[Piece, bool] | None]:
    """Start computing the next piece in a thread (None at the end)."""
    return asyncio.ensure_future(asyncio.to_thread(next, steps, None))


def _close_after(step: asyncio.Future[tuple[Piece, bool] | None],
                 steps: Steps) -> None:
    """Close the synthesis generator once its running step (if any) is over: a cancelled
    turn abandons it at the next piece boundary. The step's result is dropped."""
    def close(_: object = None) -> None:
        if not step.cancelled():
            step.exception()  # retrieved, so asyncio does not log it as lost
        with contextlib.suppress(ValueError):  # still running after all: let GC close it
            steps.close()

    if step.done():
        close()
    else:
        step.add_done_callback(close)


def build(config: Config) -> JobStage:
    """Load the backend (once per process) and return the stage."""
    started = time.perf_counter()
    tts = config.tts
    backend = load_backend(tts)
    stage = TtsStage(backend, tts.sample_rate, tts.chunk_size)
    log.info("TTS ready in %.2f s: %s, %d Hz out, parts of at most %.0f ms",
             time.perf_counter() - started, backend.name, tts.sample_rate,
             stage.max_samples / tts.sample_rate * 1000)
    return JobStage("tts", stage.handle, accepts=(TextChunk,))

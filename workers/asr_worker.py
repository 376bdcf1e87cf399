"""ASR stage (job): a finished turn's audio in, its final transcript out.

* ``TurnEnded`` (final) -> ``Transcript(final=True)`` on the session's out stream and
  the LLM queue, with the turn's trace context.
* Anything that goes wrong (bad or missing audio, nothing recognised, a model error)
  -> ``Transcript(final=True, failed=True, error=...)`` on the same two streams, so
  the LLM stage asks the user to say it again. A turn is never dropped silently.
* ``TurnEnded(speculative=True)``, sent by the VAD at the first pause, is transcribed
  at once and the result parked in Redis for a short while; nothing goes downstream.
  When the final ``TurnEnded`` of that turn arrives with the same ``speech_end_ms``
  (the user did not go on), it takes the parked result, or waits for the one still
  being computed, instead of transcribing again: ASR leaves the critical path.

The model is loaded once per process, in ``build``. Transcription runs in a thread so
the event loop keeps renewing leases; it is raced against the turn's cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import trace

from schemas import Event, Transcript, TurnEnded
from workers.backends.asr import AsrInputError, AsrResult, Recognizer, load_recognizer
from workers.config import Config
from workers.observability import semconv
from workers.runtime import Context, Emit, JobStage
from workers.runtime.shared_result import SharedResult

log = logging.getLogger(__name__)

NOTHING_HEARD = "no speech recognised"


class AsrStage:
    """The handler, holding the loaded recognizer."""

    def __init__(self, recognizer: Recognizer, speculative_ttl_s: int = 30) -> None:
        self.recognizer = recognizer
        self.ttl_s = speculative_ttl_s

    async def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]:
        if not isinstance(event, TurnEnded):
            return
        trace.get_current_span().set_attribute(semconv.SPECULATIVE, event.speculative)
        if event.speculative:
            await self._speculate(event, ctx)
            return
        transcript = await self._final(event, ctx)
        if transcript is None or ctx.cancelled():
            log.info("turn cancelled during ASR; no transcript")
            return
        yield Emit(ctx.keys.out(event.session_id), transcript)
        yield Emit(ctx.keys.job_queue("llm", event.session_id), transcript)

    # -- final turns ---------------------------------------------------------
    async def _final(self, event: TurnEnded, ctx: Context) -> Transcript | None:
        shared = self._shared(event, ctx)
        claimed = False
        try:
            waiting_since = time.perf_counter()
            # Claiming first means a speculative guess that arrives after the final is
            # not computed; otherwise take the parked result, or wait for it.
            claimed, value = await shared.claim_or_wait(ctx.cancelled)
            result = _decode(value) if value is not None else None
            if ctx.cancelled():
                return None
            if result is not None:
                waited = time.perf_counter() - waiting_since
                log.info("final turn: used the speculative transcript (ASR took %.0f ms, "
                         "waited %.0f ms for it)", result.elapsed_s * 1000, waited * 1000)
            else:
                result = await self._transcribe(event, ctx, shared if claimed else None,
                                                "final")
                if result is None:
                    return None
                await shared.publish(_encode(result))  # a redelivery of this turn reuses it
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if claimed:
                await shared.release()
            reason = (f"bad audio: {exc}" if isinstance(exc, AsrInputError)
                      else f"ASR failed: {type(exc).__name__}: {exc}")
            log.warning("transcription failed: %s", reason)
            return self._transcript(event, failed=reason)
        if not result.text:
            return self._transcript(event, failed=NOTHING_HEARD, language=result.language)
        return self._transcript(event, text=result.text, language=result.language)

    def _shared(self, event: TurnEnded, ctx: Context) -> SharedResult:
        """The turn's transcript, computed once across workers (keyed by its audio end)."""
        key = ctx.keys.asr_result(event.session_id, event.turn_id, event.speech_end_ms)
        return SharedResult(ctx.bus.redis, key, self.ttl_s, owner=ctx.consumer,
                            alive_key=ctx.keys.alive)

    @staticmethod
    def _transcript(event: TurnEnded, *, text: str = "", language: str = "",
                    failed: str = "") -> Transcript:
        return Transcript(
            session_id=event.session_id, turn_id=event.turn_id, final=True,
            text=text[:16_384], language=language[:16], failed=bool(failed),
            error=failed[:1_024], user_id=event.user_id, continues=event.continues,
            traceparent=event.traceparent, tracestate=event.tracestate)

    # -- speculative turns ---------------------------------------------------
    async def _speculate(self, event: TurnEnded, ctx: Context) -> None:
        shared = self._shared(event, ctx)
        if not await shared.claim():
            return  # already done or under way (a duplicate, or the final got here first)
        try:
            result = await self._transcribe(event, ctx, shared, "speculative")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the final turn will try again and report the failure
            log.info("speculative transcription failed (%s: %s)", type(exc).__name__, exc)
            result = None
        if result is None:
            await shared.release()
        else:
            await shared.publish(_encode(result))

    # -- transcription -------------------------------------------------------
    async def _transcribe(self, event: TurnEnded, ctx: Context, lease: SharedResult | None,
                          kind: str) -> AsrResult | None:
        """Transcribe the turn's audio in a thread; None if the turn was cancelled first.

        While it runs, the claim on ``lease`` is kept alive, so a final turn waiting for
        it knows the work is still under way (and stops waiting if we die).
        """
        audio = event.audio
        if not audio and event.audio_ref:
            ref = await ctx.bus.redis.get(event.audio_ref)
            if not isinstance(ref, bytes):
                raise AsrInputError(f"audio_ref {event.audio_ref!r} does not exist (expired?)")
            audio = ref
        job = asyncio.ensure_future(
            asyncio.to_thread(self.recognizer.transcribe, audio, event.sample_rate))
        cancelled = asyncio.ensure_future(ctx.cancel_event().wait())
        try:
            async with lease.working() if lease else contextlib.nullcontext():
                await asyncio.wait({job, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not job.done():  # the turn was cancelled (or we were): the thread runs
                job.add_done_callback(_discard)  # to its end on its own; nobody waits
        if not job.done():
            return None
        result = job.result()
        log.info("transcribed %.1f s of audio in %.0f ms on %s (%s)", result.duration_s,
                 result.elapsed_s * 1000, result.device, kind)
        log.debug("transcript: %r", result.text)
        return result


def _discard(task: asyncio.Future[AsrResult]) -> None:
    with contextlib.suppress(BaseException):
        task.result()


def _encode(result: AsrResult) -> bytes:
    return json.dumps(dataclasses.asdict(result)).encode()


def _decode(value: bytes | str) -> AsrResult | None:
    try:
        return AsrResult(**json.loads(value))
    except (ValueError, TypeError):
        log.warning("ignoring an unreadable speculative transcript")
        return None


def build(config: Config) -> JobStage:
    """Load the model (once per process) and return the stage."""
    started = time.perf_counter()
    recognizer = load_recognizer(config.asr)
    # Warm up: the first call allocates buffers and is markedly slower.
    recognizer.transcribe(b"\0\0" * 8_000, 16_000)
    log.info("ASR ready in %.2f s (model %s, %s, beam %d)", time.perf_counter() - started,
             config.asr.model, config.asr.compute_type, config.asr.beam_size)
    return JobStage("asr", AsrStage(recognizer, config.asr.speculative_ttl_s).handle,
                    accepts=(TurnEnded,),
                    concurrency=config.asr.concurrency)

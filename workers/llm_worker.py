"""LLM stage (job): a final transcript in, the spoken reply out as streamed text chunks.

* ``Transcript(final=True)`` -> the reply, asked of a streaming chat backend
  (``workers.backends.llm``: an OpenAI-compatible endpoint at ``llm.base_url``; when
  that is unset, ``EchoLlm`` repeats the user, with a warning at start). Non-final
  transcripts are ignored. A failed or empty transcript -> ``SAY_AGAIN``.
* **Memory** (``workers.llm.memory``, per user: the transcript's ``user_id``, which the
  gateway took from the device's token; a session without one is its own user):
  the prompt is the system prompt, the summary of older turns and a window of the
  recent messages within ``Config.prompt_budget`` (one that keeps the server's prefix
  cache: ``workers.llm.prompt_window``), then the user's words. The user's
  words are stored before the model is asked; the reply is stored when it ends, as
  what was *spoken*: a cancelled turn stores only the chunks already sent, marked
  interrupted (the gateway narrows that to what was played, via
  ``ConversationMemory.record_heard``). A transcript that *continues* a turn (the
  user went on before hearing its reply) replaces that turn's messages with the
  whole utterance, and a reply cancelled as ``continued`` is not stored at all.
  Both are stored once per turn, so a
  redelivered turn is not remembered twice. After storing, a background task
  summarizes when the history is long (``workers.llm.summarizer``). Memory is best
  effort: if Redis cannot serve it the turn is answered without history.
* Tokens go through ``workers.text.chunking.Chunker`` (``llm.chunking``: sentences, or a
  first chunk of ``word_chunk_min``..``word_chunk_max`` words); every chunk is emitted
  the moment it exists as ``TextChunk(seq=n, last=False)`` to the TTS queue and the
  session's out stream, with the turn's trace context.
* **End of reply**: the chunks left at the end of the stream go out with the final
  one marked ``last=True``. If nothing is left (the reply ended exactly on an emitted
  chunk, or a stream broke off with nothing buffered) an *empty-text* chunk with
  ``last=True`` ends the reply: chunks are never held back to learn which is last,
  as that would delay every sentence by the next one. TTS and the gateway treat an
  empty last chunk as "the reply ended".
* **Failures** (never silence): no first token within ``llm.timeout`` -> the apology
  (``llm.apology``) is the reply (seq 0, last). An HTTP error, an empty reply, or a
  stream that broke off *before anything was emitted* -> the request is retried once (with a fresh
  ``llm.timeout`` for its first token), then the apology. A stream that breaks off or
  stalls for ``llm.timeout`` *after* chunks were emitted -> what was spoken stays,
  nothing is repeated or apologised mid-sentence: the text still buffered (a partial
  sentence the model did produce) goes out as the last chunk, and a warning is
  logged. A first-token timeout is not retried: the user has waited long enough.
* **Cancellation**: every wait for a token is raced against the turn's cancel event;
  on cancel the stream is closed at once (the server stops generating) and nothing
  more is emitted.
* **Metrics**: one log line per turn with time-to-first-token, tokens (deltas) and
  tokens/s, chunks and how it ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from opentelemetry import trace
from redis.exceptions import RedisError

from schemas import Event, Heard, TextChunk, Transcript
from workers.backends.llm import ChatBackend, ChatMessage, LlmError, LlmTimeout, load_backend
from workers.config import Config
from workers.llm.memory import ConversationMemory, prompt_tokens
from workers.llm.summarizer import Summarizer
from workers.observability import metrics, semconv
from workers.runtime import Context, Emit, JobStage
from workers.text.chunking import Chunker

log = logging.getLogger(__name__)

SAY_AGAIN = "Sorry, could you say that again?"
# A prompt this full (of its token budget) is summarized after the reply, whatever the
# message count, before the window would have to drop history nobody summarized.
FULL_PROMPT_SHARE = 0.8
RETRY_PAUSE_S = 0.05  # before the one retry of a request that failed before any token


def build_messages(system_prompt: str, text: str,
                   history: Sequence[ChatMessage] = ()) -> list[ChatMessage]:
    """The prompt without memory: system prompt, ``history``, the user's words.

    Used when memory is unavailable; ``ConversationMemory.prompt`` builds the real one.
    """
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.extend(history)
    messages.append({"role": "user", "content": text})
    return messages


class _Cancelled(Exception):
    """The turn was cancelled while waiting for a token."""


class _Stalled(Exception):
    """No token within the allowed time."""


_END = object()


@dataclass
class _Turn:
    """What happened in one turn: for the metrics line and the decisions."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    chunks: int = 0  # TextChunks emitted (the seq of the next one)
    attempts: int = 0
    got_token: bool = False  # this attempt has had a token
    spoken: list[str] = field(default_factory=list)  # texts of the chunks emitted
    outcome: str = ""  # "ok", "broken", "apology", "cancelled"

    def ttft_ms(self) -> float | None:
        if self.first_token is None:
            return None
        return round((self.first_token - self.started) * 1000, 1)

    def tokens_per_s(self) -> float | None:
        """Decoding speed after the first token."""
        if self.first_token is None:
            return None
        span = (self.last_token or self.first_token) - self.first_token
        return round((self.tokens - 1) / span, 1) if span > 0 and self.tokens > 1 else None

    def metrics(self, outcome: str) -> str:
        if self.first_token is None:
            return (f"ttft - ms, 0 tokens, {self.chunks} chunks, {self.attempts} attempt(s): "
                    f"{outcome}")
        ttft = (self.first_token - self.started) * 1000
        span = (self.last_token or self.first_token) - self.first_token
        rate = self.tokens_per_s()
        return (f"ttft {ttft:.0f} ms, {self.tokens} tokens in {span:.2f} s "
                f"({rate if rate is not None else '-'} tokens/s), "
                f"{self.chunks} chunks, {self.attempts} attempt(s): {outcome}")


class _TokenWaiter:
    """Reads one backend stream, each wait raced against a deadline and the cancel event."""

    def __init__(self, stream: AsyncIterator[str], cancelled: asyncio.Future[Any]) -> None:
        self.stream = stream
        self.cancelled = cancelled
        self._pending: asyncio.Future[str] | None = None
        self._closed = False

    async def next(self, seconds: float) -> object:
        """The next delta, or ``_END``; raises _Cancelled, _Stalled or the backend's error."""
        if self.cancelled.done():
            raise _Cancelled
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self.stream))
        pending = self._pending
        both: set[asyncio.Future[Any]] = {pending, self.cancelled}
        await asyncio.wait(both, timeout=max(seconds, 0.0),
                           return_when=asyncio.FIRST_COMPLETED)
        if not pending.done():
            if self.cancelled.done():
                raise _Cancelled
            raise _Stalled
        self._pending = None
        try:
            return pending.result()
        except StopAsyncIteration:
            return _END

    async def close(self) -> None:
        """Close the stream (and its HTTP response) now, whatever state it is in."""
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()  # the generator's finally closes the response
            await asyncio.wait({pending})
        if pending is not None and pending.done() and not pending.cancelled():
            pending.exception()  # retrieved: no "exception never retrieved" warning
        aclose = getattr(self.stream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except (RuntimeError, LlmError):  # closing a generator that already failed
                pass


def memory_user(event: Transcript | Heard) -> str:
    """Whose memory a turn uses: the token's user, else the session alone."""
    return event.user_id or f"session:{event.session_id}"


class LlmStage:
    def __init__(self, backend: ChatBackend, config: Config) -> None:
        self.backend = backend
        self.full_config = config
        self.config = config.llm
        self._memory: ConversationMemory | None = None
        self._summarizer: Summarizer | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def memory(self, ctx: Context) -> ConversationMemory:
        if self._memory is None:  # the runtime's client exists only once it runs
            cfg = self.full_config
            self._memory = ConversationMemory(ctx.bus.redis, ctx.keys.prefix, cfg.memory,
                                              cfg.context_window, cfg.prompt_budget())
            self._summarizer = Summarizer(
                self._memory, self.backend, self.config.timeout,
                system_prompt=self.config.system_prompt,
                idle_s=cfg.memory.summarization.idle_s, next_prompt=self._next_prompt)
        return self._memory

    def chunker(self) -> Chunker:
        return Chunker(self.config.chunking, first_words_min=self.config.word_chunk_min,
                       first_words_max=self.config.word_chunk_max)

    async def handle(self, event: Event, ctx: Context) -> AsyncIterator[Emit]:
        if isinstance(event, Heard):
            await self._heard(ctx, event)
            return
        if not isinstance(event, Transcript) or not event.final:
            return
        if event.failed or not event.text.strip():
            log.info("transcript %s: asking the user to say it again",
                     "failed" if event.failed else "empty")
            for emit in _chunk(ctx, event, 0, SAY_AGAIN, last=True):
                yield emit
            return
        user = memory_user(event)
        self.memory(ctx)
        assert self._summarizer is not None
        await self._summarizer.turn_started()  # a background summary gives way
        span = trace.get_current_span()  # the runtime's span for this stage
        span.update_name(f"{semconv.LLM} {self.config.model}")
        span.set_attributes({semconv.GEN_AI_OPERATION: "chat",
                             semconv.GEN_AI_PROVIDER: self.backend.name.split()[0],
                             semconv.GEN_AI_REQUEST_MODEL: self.config.model,
                             semconv.GEN_AI_MAX_TOKENS: self.config.max_tokens,
                             semconv.GEN_AI_TEMPERATURE: self.config.temperature,
                             semconv.USER_ID: user})
        if event.continues:  # the whole utterance replaces the fragment (and its reply)
            await self._continue(ctx, user, event)
            messages = await self._prompt(ctx, user, event)
        else:
            messages = await self._prompt(ctx, user, event)
            await self._remember(ctx, user, event, "user", event.text)
        turn = _Turn()
        async for emit in self._reply(event, ctx, messages, turn):
            yield emit
        ttft, rate = turn.ttft_ms(), turn.tokens_per_s()
        span.set_attributes({semconv.GEN_AI_OUTPUT_TOKENS: turn.tokens,
                             **({semconv.LLM_TOKENS_PER_S: rate} if rate is not None else {}),
                             semconv.LLM_CHUNKS: turn.chunks,
                             semconv.OUTCOME: turn.outcome or "ended",
                             **({semconv.LLM_TTFT_MS: ttft} if ttft is not None else {})})
        if self.full_config.tracing.capture_content:
            span.set_attributes({semconv.CONTENT_TRANSCRIPT: event.text,
                                 semconv.CONTENT_REPLY: " ".join(t for t in turn.spoken if t)})
        if turn.outcome == "cancelled" and ctx.cancel_reason() == "continued":
            log.info("reply dropped: the user went on before hearing it")
            return
        if turn.spoken and any(turn.spoken):
            await self._remember(ctx, user, event, "assistant", " ".join(
                t for t in turn.spoken if t), interrupted=turn.outcome == "cancelled")
            # A prompt near its budget would soon drop history unsummarized: fold it now.
            used = prompt_tokens(cast(list[dict[str, str]], messages))
            self._summarize_later(
                user, full=used >= FULL_PROMPT_SHARE * self.full_config.prompt_budget())

    async def _heard(self, ctx: Context, event: Heard) -> None:
        """The reply was cut off: memory keeps only what the device played (the gateway's
        report; before or after the reply itself is stored, ``record_heard`` handles
        both). Redis errors propagate: the runtime retries the entry."""
        user = memory_user(event)
        changed = await self.memory(ctx).record_heard(user, event.turn_id, event.text)
        log.info("turn %s: the user heard %d of %d samples (%s): %r", event.turn_id,
                 event.played_samples, event.sent_samples,
                 "stored" if changed else "kept for the reply", event.text)

    async def _prompt(self, ctx: Context, user: str, event: Transcript) -> list[ChatMessage]:
        try:
            prompt = await self.memory(ctx).build_prompt(
                user, self.config.system_prompt, event.text, turn_id=event.turn_id)
        except (RedisError, OSError) as exc:
            log.warning("memory unavailable (%s: %s); answering without history",
                        type(exc).__name__, exc)
            return build_messages(self.config.system_prompt, event.text)
        trace.get_current_span().set_attributes({
            semconv.LLM_PROMPT_TOKENS: prompt.tokens,
            semconv.LLM_PROMPT_REUSED_TOKENS: prompt.reused_tokens})
        return cast(list[ChatMessage], prompt.messages)

    async def _next_prompt(self, user: str) -> list[ChatMessage]:
        """What the user's next turn will start with (the summarizer warms it)."""
        assert self._memory is not None
        prompt = await self._memory.build_prompt(user, self.config.system_prompt, "")
        return cast(list[ChatMessage], prompt.messages[:-1])

    async def _remember(self, ctx: Context, user: str, event: Transcript, role: str, text: str,
                        *, interrupted: bool = False) -> None:
        try:
            await self.memory(ctx).append(user, role, text[:4000], interrupted=interrupted,
                                          turn_id=event.turn_id)
        except (RedisError, OSError) as exc:
            log.warning("could not store the %s message (%s: %s)", role,
                        type(exc).__name__, exc)

    async def _continue(self, ctx: Context, user: str, event: Transcript) -> None:
        try:
            await self.memory(ctx).continue_turn(user, event.continues, event.turn_id,
                                                 event.text[:4000])
        except (RedisError, OSError) as exc:
            log.warning("could not replace the continued turn's message (%s: %s)",
                        type(exc).__name__, exc)

    def _summarize_later(self, user: str, *, full: bool) -> None:
        """Summarize in the background: the turn does not wait for it."""
        if self._summarizer is None or not self.full_config.memory.summarization.enabled:
            return
        task = asyncio.create_task(self._summarizer.maybe_summarize(user, full=full))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reply(self, event: Transcript, ctx: Context, messages: list[ChatMessage],
                     turn: _Turn) -> AsyncIterator[Emit]:
        cancel_event = ctx.cancel_event()
        cancelled = asyncio.ensure_future(cancel_event.wait())
        cfg = self.config
        waiter: _TokenWaiter | None = None
        try:
            while True:
                turn.attempts += 1
                chunker = self.chunker()
                waiter = _TokenWaiter(self.backend.stream(
                    messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature), cancelled)
                deadline = time.perf_counter() + cfg.timeout  # for this attempt's first token
                failure: str | None = None
                try:
                    while True:
                        wait = (cfg.timeout if turn.got_token
                                else deadline - time.perf_counter())
                        token = await waiter.next(wait)
                        if token is _END:
                            break
                        assert isinstance(token, str)
                        now = time.perf_counter()
                        if turn.first_token is None:
                            turn.first_token = now
                        turn.got_token = True
                        turn.last_token = now
                        turn.tokens += 1
                        for text in chunker.push(token):
                            if ctx.cancelled():
                                raise _Cancelled
                            for emit in _chunk(ctx, event, turn.chunks, text, last=False,
                                               ttft_ms=turn.ttft_ms()):
                                yield emit
                            turn.chunks += 1
                            turn.spoken.append(text)
                        if ctx.cancelled():
                            raise _Cancelled
                except _Cancelled:
                    await waiter.close()
                    turn.outcome = "cancelled"
                    log.info("llm turn cancelled; stream closed. %s", turn.metrics("cancelled"))
                    return
                except _Stalled:
                    failure = (f"no token for {cfg.timeout:.1f} s" if turn.got_token
                               else f"no first token within {cfg.timeout:.1f} s")
                    timed_out = not turn.got_token
                except LlmTimeout as exc:  # the client's own timeout said the same
                    failure, timed_out = str(exc), not turn.got_token
                except Exception as exc:  # LlmError, or anything a backend let through
                    if not isinstance(exc, LlmError):
                        log.warning("llm backend raised %r", exc, exc_info=True)
                    failure, timed_out = f"{type(exc).__name__}: {exc}", False
                await waiter.close()
                rest = chunker.flush() if failure is None else []
                if failure is None and not rest and not turn.chunks:
                    # Nothing to say is a failure, not a reply: the user would hear silence.
                    failure, timed_out = "the model's reply was empty", False
                if failure is None:  # the stream ended normally
                    turn.outcome = "ok"
                    for emit in self._finish(ctx, event, turn, rest):
                        yield emit
                    log.info("llm turn done: %s", turn.metrics("ok"))
                    return
                if turn.chunks:  # something was spoken: keep it, repeat nothing
                    spoken = turn.chunks
                    turn.outcome = "broken"
                    for emit in self._finish(ctx, event, turn, chunker.flush()):
                        yield emit
                    log.warning("llm stream broke off after %d chunks (%s); ending the reply "
                                "with what was received. %s", spoken, failure,
                                turn.metrics("broken"))
                    return
                if ctx.cancelled():
                    turn.outcome = "cancelled"
                    log.info("llm turn cancelled; stream closed. %s", turn.metrics("cancelled"))
                    return
                if timed_out or turn.attempts >= 2:
                    log.warning("llm failed (%s); speaking the apology. %s", failure,
                                turn.metrics("apology"))
                    for emit in _chunk(ctx, event, 0, cfg.apology, last=True):
                        yield emit
                    turn.chunks += 1
                    turn.spoken.append(cfg.apology)
                    turn.outcome = "apology"
                    metrics.fallbacks.add(1, {"kind": "llm_apology"})
                    return
                log.warning("llm failed before anything was spoken (%s); retrying once", failure)
                turn.got_token = False
                await asyncio.sleep(RETRY_PAUSE_S)
                if ctx.cancelled():
                    turn.outcome = "cancelled"
                    return
        finally:  # also when the runtime abandons the entry (lease lost, shutdown)
            cancelled.cancel()
            if waiter is not None:
                await waiter.close()

    @staticmethod
    def _finish(ctx: Context, event: Transcript, turn: _Turn, rest: list[str]) -> Iterator[Emit]:
        """The chunks left at the end, the final one ``last``; an empty last chunk if none."""
        if ctx.cancelled():
            return
        for i, text in enumerate(rest or [""]):
            yield from _chunk(ctx, event, turn.chunks, text, last=i == max(len(rest), 1) - 1,
                              ttft_ms=turn.ttft_ms())
            turn.chunks += 1
            turn.spoken.append(text)


def _chunk(ctx: Context, event: Transcript, seq: int, text: str, *, last: bool,
           ttft_ms: float | None = None) -> Iterator[Emit]:
    chunk = TextChunk(session_id=event.session_id, turn_id=event.turn_id, seq=seq, text=text,
                      last=last, ttft_ms=ttft_ms if seq == 0 else None,
                      traceparent=event.traceparent, tracestate=event.tracestate)
    yield Emit(ctx.keys.queue("tts"), chunk)
    yield Emit(ctx.keys.out(event.session_id), chunk)


def build(config: Config) -> JobStage:
    backend = load_backend(config.llm)
    log.info("LLM stage ready: %s, %s chunking, timeout %.1f s", backend.name,
             config.llm.chunking, config.llm.timeout)
    return JobStage("llm", LlmStage(backend, config).handle)

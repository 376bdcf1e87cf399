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
  interrupted (the gateway's ``Heard`` report narrows it to what was played, via
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
* **Failures** (never silence) and **cancellation**: ``workers.llm.reply`` streams the
  reply as chunks to speak around the backend: a first-token timeout -> the apology; an
  error, an empty reply or a break before anything was spoken -> one retry, then the
  apology; a break after chunks were spoken keeps them and ends the reply; a cancel
  closes the stream at once.
* **Metrics**: one log line per turn with time-to-first-token, tokens (deltas) and
  tokens/s, chunks and how it ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, cast

from opentelemetry import trace
from redis.exceptions import RedisError

from schemas import Event, Heard, TextChunk, Transcript
from workers.backends.llm import ChatBackend, ChatMessage, load_backend
from workers.config import Config
from workers.llm.memory import ConversationMemory, prompt_tokens
from workers.llm.reply import ReplyStats, speak
from workers.llm.resume import Said, said_before
from workers.llm.summarizer import Summarizer
from workers.observability import semconv
from workers.runtime import Context, Emit, JobStage
from workers.text.chunking import Chunker

log = logging.getLogger(__name__)

SAY_AGAIN = "Sorry, could you say that again?"
# A prompt this full (of its token budget) is summarized after the reply, whatever the
# message count, before the window would have to drop history nobody summarized.
FULL_PROMPT_SHARE = 0.8


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
        turn = ReplyStats()
        said = Said()
        if ctx.handled_before:  # a reply begun before: go on with it, or end it there
            said = await said_before(ctx.bus.redis, ctx.keys.out(event.session_id),
                                     event.turn_id)
        if said.ended:
            log.info("turn %s: its reply was all written before; not asked again",
                     event.turn_id)
            turn.spoken, turn.chunks, turn.outcome = list(said.texts), len(said.texts), "ok"
        else:
            async for emit in self._reply(event, ctx, messages, turn, said):
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
                     turn: ReplyStats, said: Said) -> AsyncIterator[Emit]:
        chunks = speak(self.backend, self.config, messages, self.chunker,
                       ctx.cancel_event(), ctx.cancelled, turn)
        differs: int | None = None
        try:
            async for spoken in chunks:
                if not said.matches(spoken.seq, spoken.text, spoken.last):
                    differs = spoken.seq
                    break
                for emit in _chunk(ctx, event, spoken.seq, spoken.text, last=spoken.last,
                                   ttft_ms=spoken.ttft_ms):
                    yield emit
        finally:
            await chunks.aclose()  # closes the model's stream too
        if differs is None:
            return
        # The model said something else this time: the reply ends where the user's is.
        log.warning("turn %s: the reply asked again differs from the %d chunks already "
                    "said (at chunk %d); ending it there", event.turn_id, len(said.texts),
                    differs)
        turn.spoken, turn.outcome = [*said.texts, ""], "cut short"
        turn.chunks = len(turn.spoken)
        # The same outputs in the same order as before (the runtime skips those written
        # then), so the empty last chunk is the first new one.
        for seq in range(differs, len(turn.spoken)):
            for emit in _chunk(ctx, event, seq, turn.spoken[seq],
                               last=seq == len(said.texts)):
                yield emit


def _chunk(ctx: Context, event: Transcript, seq: int, text: str, *, last: bool,
           ttft_ms: float | None = None) -> Iterator[Emit]:
    chunk = TextChunk(session_id=event.session_id, turn_id=event.turn_id, seq=seq, text=text,
                      last=last, ttft_ms=ttft_ms if seq == 0 else None,
                      traceparent=event.traceparent, tracestate=event.tracestate)
    # The out stream first: it is the record of what was said that a worker taking the
    # turn over goes by (``workers.llm.resume``), so the TTS never gets a chunk it lacks.
    yield Emit(ctx.keys.out(event.session_id), chunk)
    yield Emit(ctx.keys.job_queue("tts", event.session_id), chunk)


def build(config: Config) -> JobStage:
    backend = load_backend(config.llm)
    log.info("LLM stage ready: %s, %s chunking, timeout %.1f s", backend.name,
             config.llm.chunking, config.llm.timeout)
    return JobStage("llm", LlmStage(backend, config).handle, accepts=(Transcript, Heard))

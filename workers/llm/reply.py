"""The LLM's reply as chunks to speak, never silence: the retry, stall and apology
policy around a streaming chat backend (the ASR and TTS fallbacks wrap their backends
the same way). ``workers.llm_worker`` turns each chunk into a ``TextChunk``.

* No first token within ``llm.timeout`` -> the apology (``llm.apology``) is the reply.
* An error, an empty reply, or a stream that broke off before anything was spoken ->
  one retry (a fresh ``llm.timeout`` for its first token), then the apology. A
  first-token timeout is not retried: the user has waited long enough.
* A stream that breaks off or stalls for ``llm.timeout`` after chunks were spoken ->
  what was spoken stays; the text still buffered goes out as the last chunk.
* Every wait for a token is raced against the turn's cancel event; on cancel the
  stream is closed at once (the server stops generating) and nothing more is said.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from workers.backends.llm import ChatBackend, ChatMessage, LlmError, LlmTimeout
from workers.config import LlmConfig
from workers.observability import metrics
from workers.text.chunking import Chunker

log = logging.getLogger("workers.llm_worker")  # the stage's log, as before the move

RETRY_PAUSE_S = 0.05  # before the one retry of a request that failed before any token


@dataclass(frozen=True)
class Spoken:
    """One chunk of the reply to say: ``seq`` in order, ``last`` ends the reply."""

    seq: int
    text: str
    last: bool
    ttft_ms: float | None  # the model's time to first token (the first chunk's)


class _Cancelled(Exception):
    """The turn was cancelled while waiting for a token."""


class _Stalled(Exception):
    """No token within the allowed time."""


_END = object()


@dataclass
class ReplyStats:
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

    def spoke(self, text: str, *, last: bool, ttft: bool = True) -> Spoken:
        """Chunk ``text`` is said next (seq = the chunks so far)."""
        spoken = Spoken(self.chunks, text, last, self.ttft_ms() if ttft else None)
        self.chunks += 1
        self.spoken.append(text)
        return spoken

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


async def speak(backend: ChatBackend, cfg: LlmConfig, messages: list[ChatMessage],
                chunker_factory: Callable[[], Chunker], cancel_event: asyncio.Event,
                is_cancelled: Callable[[], bool], turn: ReplyStats) -> AsyncGenerator[Spoken]:
    """The reply to ``messages`` as chunks to speak, by the policy above; ``turn`` keeps
    what happened (chunks, tokens, outcome)."""
    cancelled = asyncio.ensure_future(cancel_event.wait())
    waiter: _TokenWaiter | None = None
    try:
        while True:
            turn.attempts += 1
            chunker = chunker_factory()
            waiter = _TokenWaiter(backend.stream(
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
                        if is_cancelled():
                            raise _Cancelled
                        yield turn.spoke(text, last=False)
                    if is_cancelled():
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
                for spoken in _finish(is_cancelled, turn, rest):
                    yield spoken
                log.info("llm turn done: %s", turn.metrics("ok"))
                return
            if turn.chunks:  # something was spoken: keep it, repeat nothing
                said = turn.chunks
                turn.outcome = "broken"
                for spoken in _finish(is_cancelled, turn, chunker.flush()):
                    yield spoken
                log.warning("llm stream broke off after %d chunks (%s); ending the reply "
                            "with what was received. %s", said, failure,
                            turn.metrics("broken"))
                return
            if is_cancelled():
                turn.outcome = "cancelled"
                log.info("llm turn cancelled; stream closed. %s", turn.metrics("cancelled"))
                return
            if timed_out or turn.attempts >= 2:
                log.warning("llm failed (%s); speaking the apology. %s", failure,
                            turn.metrics("apology"))
                yield turn.spoke(cfg.apology, last=True, ttft=False)
                turn.outcome = "apology"
                metrics.fallbacks.add(1, {"kind": "llm_apology"})
                return
            log.warning("llm failed before anything was spoken (%s); retrying once", failure)
            turn.got_token = False
            await asyncio.sleep(RETRY_PAUSE_S)
            if is_cancelled():
                turn.outcome = "cancelled"
                return
    finally:  # also when the runtime abandons the entry (lease lost, shutdown)
        cancelled.cancel()
        if waiter is not None:
            await waiter.close()


def _finish(is_cancelled: Callable[[], bool], turn: ReplyStats,
            rest: list[str]) -> Iterator[Spoken]:
    """The chunks left at the end, the final one ``last``; an empty last chunk if none."""
    if is_cancelled():
        return
    for i, text in enumerate(rest or [""]):
        yield turn.spoke(text, last=i == max(len(rest), 1) - 1)

"""Folds a user's older conversation into a summary, off the critical path.

The LLM stage calls `Summarizer.maybe_summarize` in a background task after a
reply is stored. When the user's history has reached
``memory.summarization.trigger_at`` messages (or the prompt nears its token budget),
the model is asked, at the end of the conversation as the prompts show it, for a
summary of everything so far, and `ConversationMemory.replace_with_summary` swaps it
for all but the last ``keep_recent`` messages atomically (messages stored meanwhile
are kept).

One worker at a time summarizes a given user (a lock key with a TTL, so a worker
that dies mid-way does not block the next attempt for long). A failed or empty
summary changes nothing: the history stays, capped at
``memory.max_messages_per_user``, and the next reply tries again.

A summary never holds up a live turn (``summarization.idle_s``): it waits until no
turn has started for that long, gives way (its request is closed, which stops the
server between tokens) as soon as one starts, and tries again after a later reply.
Once stored, it warms the server's prefix cache with the next turn's prompt, whose
start it changed, so the next turn does not pay for the whole history again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast

from redis.exceptions import RedisError

from workers.backends.llm import ChatBackend, ChatMessage, LlmError
from workers.llm.memory import MAX_SUMMARY_BYTES, ConversationMemory
from workers.runtime.bus import DELETE_IF_EQUAL

log = logging.getLogger(__name__)

LOCK_TTL_S = 300  # longer than any summary takes; expires if the holder dies
MAX_IDLE_WAIT_S = 600.0  # no quiet moment in this long: give up until a later reply
YIELD_POLL_S = 0.2  # how often a running summary checks for a live turn
URGENT_SLACK = 4  # messages short of memory.max_messages_per_user: no more giving way
T = TypeVar("T")
SUMMARY_MAX_TOKENS = 160  # ~80 words; each token is ~50 ms of a 2-core CPU
# Asked at the end of the conversation itself (`ConversationMemory.summary_prompt`), not
# in a request of its own: a prefix-caching server then evaluates only these words.
INSTRUCTIONS = (
    "(Not for the user: you keep the memory of this voice assistant.) Write the summary "
    "of the whole conversation so far, the earlier summary included: one short paragraph "
    "of at most 80 words. Keep every fact about the user (name, preferences, plans, what "
    "they asked for) and anything still unresolved. Write plain sentences. Reply with the "
    "summary only."
)



class Summarizer:
    def __init__(self, memory: ConversationMemory, backend: ChatBackend, timeout: float, *,
                 system_prompt: str, idle_s: float = 0.0,
                 next_prompt: Callable[[str], Awaitable[Sequence[ChatMessage]]] | None = None,
                 ) -> None:
        self.memory = memory
        self.backend = backend
        self.timeout = timeout
        self.system_prompt = system_prompt  # the live turns' (the request starts like them)
        self.idle_s = idle_s
        self.next_prompt = next_prompt  # the prompt to warm the server with afterwards
        self._unlock = memory.redis.register_script(DELETE_IF_EQUAL)
        self._turns = memory.keys.llm_turn_started()

    async def turn_started(self) -> None:
        """A live turn starts (on this worker): summaries anywhere give way to it."""
        if not self.idle_s:
            return
        try:
            await self.memory.redis.set(self._turns, repr(time.time()), ex=LOCK_TTL_S)
        except (RedisError, OSError) as exc:
            log.warning("could not announce the live turn (%s: %s)", type(exc).__name__, exc)

    async def maybe_summarize(self, user_id: str, *, full: bool = False) -> bool:
        """Summarize if the history is long enough (or ``full``: the prompt is near its
        budget) and nobody else is; True if done."""
        try:
            if not (full or await self.memory.needs_summary(user_id)):
                return False
            # So close to the cap that the oldest messages would go unsummarized: now,
            # even if a live turn has to wait (a summary that kept giving way).
            urgent = (await self.memory.length(user_id)
                      >= self.memory.cfg.max_messages_per_user - URGENT_SLACK)
            if not urgent and not await self._quiet():
                return False
            lock = self.memory.keys.user_summarizing(user_id)
            token = secrets.token_hex(8)
            if not await self.memory.redis.set(lock, token, nx=True, ex=LOCK_TTL_S):
                return False  # another worker is on it
            try:
                if urgent:
                    log.info("the history is near its cap: summarizing without giving way")
                    done = await self._summarize(user_id)
                else:
                    done = await self._giving_way(self._summarize(user_id), False)
            finally:
                await self._unlock(keys=[lock], args=[token])
            if done and self.next_prompt is not None:
                await self._giving_way(self._warm(user_id), None)
            return done
        except (RedisError, OSError) as exc:
            log.warning("summarization skipped: Redis unavailable (%s: %s)",
                        type(exc).__name__, exc)
            return False

    async def _last_turn(self) -> str:
        raw: Any = await self.memory.redis.get(self._turns)
        return raw.decode() if isinstance(raw, bytes) else str(raw or "0")

    async def _quiet(self) -> bool:
        """Until no turn has started for ``idle_s``; False if that never happened."""
        deadline = time.monotonic() + MAX_IDLE_WAIT_S
        while self.idle_s:
            quiet = time.time() - float(await self._last_turn())
            if quiet >= self.idle_s:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(self.idle_s - quiet)
        return True

    async def _giving_way(self, work: Coroutine[Any, Any, T], instead: T) -> T:
        """Run ``work``, cancelled (result ``instead``) as soon as a live turn starts."""
        task = asyncio.ensure_future(work)
        if not self.idle_s:
            return await task
        started = await self._last_turn()
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=YIELD_POLL_S)
                if not task.done() and await self._last_turn() != started:
                    log.info("background LLM work gave way to a live turn; it is tried "
                             "again after a later reply")
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return instead
        finally:
            if not task.done():  # we were cancelled ourselves
                task.cancel()
        return task.result()

    async def _warm(self, user_id: str) -> None:
        """Evaluate the next turn's prompt (its start changed) while nobody waits."""
        assert self.next_prompt is not None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout * 3):
                async for _ in self.backend.stream(await self.next_prompt(user_id),
                                                   max_tokens=1, temperature=0.0):
                    pass
        except (LlmError, TimeoutError) as exc:
            log.warning("could not warm the prompt cache (%s: %s)", type(exc).__name__, exc)
            return
        log.info("warmed the prompt cache for the next turn in %.1f s",
                 time.perf_counter() - started)

    async def _summarize(self, user_id: str) -> bool:
        started = time.perf_counter()
        covered = await self.memory.to_summarize(user_id)
        if not covered:
            return False
        request = await self.memory.summary_prompt(user_id, self.system_prompt, INSTRUCTIONS)
        try:
            async with asyncio.timeout(self.timeout * 3):  # generous: nobody is waiting
                text = await self._ask(cast(list[ChatMessage], request))
        except (LlmError, TimeoutError) as exc:
            log.warning("summarization failed (%s: %s); the history is kept as it is",
                        type(exc).__name__, exc)
            return False
        text = text.strip()
        if not text:
            log.warning("the model returned an empty summary; the history is kept as it is")
            return False
        text = text.encode("utf-8")[:MAX_SUMMARY_BYTES].decode("utf-8", "ignore")
        removed = await self.memory.replace_with_summary(user_id, text, covered)
        if removed < 0:
            log.info("history changed during summarization; trying again on a later turn")
            return False
        log.info("summarized %d messages into %d characters in %.1f s", len(covered),
                 len(text), time.perf_counter() - started)
        return True

    async def _ask(self, request: list[ChatMessage]) -> str:
        pieces: list[str] = []
        async for delta in self.backend.stream(request, max_tokens=SUMMARY_MAX_TOKENS,
                                               temperature=0.2):
            pieces.append(delta)
        return "".join(pieces)

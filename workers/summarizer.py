"""Folds a user's older conversation into a summary, off the critical path.

The LLM stage calls `Summarizer.maybe_summarize` in a background task after a
reply is stored. When the user's history has reached
``memory.summarization.trigger_at`` messages, the model is asked to merge the
previous summary with everything but the last ``keep_recent`` messages, and
`ConversationMemory.replace_with_summary` swaps them atomically (messages stored
meanwhile are kept).

One worker at a time summarizes a given user (a lock key with a TTL, so a worker
that dies mid-way does not block the next attempt for long). A failed or empty
summary changes nothing: the history stays, capped at
``memory.max_messages_per_user``, and the next reply tries again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from redis.exceptions import RedisError

from workers.backends.llm import ChatBackend, ChatMessage, LlmError
from workers.memory import MAX_SUMMARY_BYTES, ConversationMemory, Message

log = logging.getLogger(__name__)

LOCK_TTL_S = 300  # longer than any summary takes; expires if the holder dies
SUMMARY_MAX_TOKENS = 200
INSTRUCTIONS = (
    "You keep the memory of a voice assistant. Merge the previous summary and the new "
    "messages into one short paragraph of at most 120 words. Keep every fact about the "
    "user (name, preferences, plans, what they asked for) and anything still unresolved. "
    "Write plain sentences. Reply with the summary only."
)

# Deletes the lock only if it is still ours (it may have expired and been retaken).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def summary_request(previous: str | None, messages: list[Message]) -> list[ChatMessage]:
    """The chat request that asks for the merged summary."""
    lines = [f"{m.role}: {m.content}{' (interrupted)' if m.interrupted else ''}"
             for m in messages]
    body = (f"Previous summary: {previous or '(none)'}\n\nNew messages:\n" + "\n".join(lines))
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": body}]


class Summarizer:
    def __init__(self, memory: ConversationMemory, backend: ChatBackend, timeout: float) -> None:
        self.memory = memory
        self.backend = backend
        self.timeout = timeout
        self._unlock = memory.redis.register_script(_UNLOCK)

    async def maybe_summarize(self, user_id: str) -> bool:
        """Summarize if the history is long enough and nobody else is; True if done."""
        try:
            if not await self.memory.needs_summary(user_id):
                return False
            lock = self.memory.keys.user_summarizing(user_id)
            token = secrets.token_hex(8)
            if not await self.memory.redis.set(lock, token, nx=True, ex=LOCK_TTL_S):
                return False  # another worker is on it
            try:
                return await self._summarize(user_id)
            finally:
                await self._unlock(keys=[lock], args=[token])
        except (RedisError, OSError) as exc:
            log.warning("summarization skipped: Redis unavailable (%s: %s)",
                        type(exc).__name__, exc)
            return False

    async def _summarize(self, user_id: str) -> bool:
        started = time.perf_counter()
        covered = await self.memory.to_summarize(user_id)
        if not covered:
            return False
        previous = await self.memory.summary(user_id)
        try:
            async with asyncio.timeout(self.timeout * 3):  # generous: nobody is waiting
                text = await self._ask(summary_request(previous, covered))
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

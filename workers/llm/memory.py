"""Per-user conversation memory in Redis: recent messages, a rolling summary, prompts.

Keys per user, all carrying the ``{user_id}`` hash tag so they live in one Redis
Cluster slot (the scripts, ``workers.llm.memory_scripts``, touch several at once):

* ``{prefix}:user:{user_id}:messages`` - a list of JSON records, oldest first,
  capped at ``memory.max_messages_per_user``;
* ``{prefix}:user:{user_id}:summary`` - the summary of everything already
  folded out of the list (a plain string);
* ``{prefix}:user:{user_id}:window`` - where the last prompt's window of the list
  began and what that prompt held (``workers.llm.prompt_window``), so the next prompt
  extends it.

They expire ``memory.message_ttl`` s after the user's last message (the window when
it was last written). Summarization is off the critical path: the LLM stage checks
`needs_summary`, asks the LLM to summarise `to_summarize`, then calls
`replace_with_summary` with the messages it summarised, which removes exactly those,
only if still at the head of the list: messages appended meanwhile are never lost.

Messages of a turn carry its ``turn_id``: storing is idempotent per turn and role
(a redelivered turn is not stored twice), and `record_heard` can replace a reply
with the part the user actually heard, whether it arrives before or after the
reply itself is stored.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import msgspec
import redis.asyncio as aioredis

from workers.config import DEFAULT_PROMPT_TOKENS, ContextWindowConfig, MemoryConfig
from workers.llm import memory_scripts as scripts
from workers.llm.prompt_window import (
    Candidate,
    choose_start,
    digests,
    longest_suffix,
    shared_prefix,
)
from workers.runtime.keys import Keys

Role = Literal["user", "assistant"]
ROLES: Final = frozenset({"user", "assistant"})
# Same rule as schemas.events.Id; fullmatch, so a trailing newline is rejected too.
USER_ID_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
MAX_CONTENT_BYTES: Final = 8 * 1024  # one spoken turn is far shorter than this
MAX_SUMMARY_BYTES: Final = 32 * 1024
# After an interrupted reply, the prompt says so in a system message of its own: a
# marker inside the assistant's text was copied into later replies by small models
# (seen: Qwen2.5 1.5B ended a reply with "[interrupted: the user did not hear ...]").
INTERRUPTED_NOTE: Final = "(The user interrupted the reply above; they heard only that much.)"
SUMMARY_PREFIX: Final = "Summary of the earlier conversation: "
# Token estimate, deliberately model-free and cheap: ~4 characters per token for
# English text, a token per digit and per non-ASCII character (measured with Qwen2.5's
# tokenizer: English prose 3.7-4.6 characters a token, "415-555-0123"-style numbers
# 1.6, German 2.5, Chinese 1.1), plus ~4 tokens of chat-format overhead (role,
# separators) per message. `Config.prompt_budget` leaves a margin on top.
CHARS_PER_TOKEN: Final = 4
TOKENS_PER_MESSAGE: Final = 4
_DIGITS: Final = "0123456789"


class Message(msgspec.Struct, frozen=True):
    """One stored message. ``id`` is random; it makes every record unique so that
    `replace_with_summary` can tell "the messages I summarised" from look-alikes."""

    role: Role
    content: str
    ts: float  # unix seconds when it was stored
    interrupted: bool = False  # an assistant reply the user cut off (barge-in)
    id: str = ""
    turn_id: str = ""


@dataclass(frozen=True)
class Prompt:
    """A turn's chat messages and what they cost, estimated (`estimate_tokens`)."""
    messages: list[dict[str, str]]
    tokens: int
    # Of them, how many the server can take from its prefix cache: the leading messages
    # this prompt shares with the user's previous one (and the reply generated after
    # it), if the server still holds that request.
    reused_tokens: int


def estimate_tokens(text: str) -> int:
    """Tokens one chat message with this content costs, roughly (see above)."""
    digits = sum(map(text.count, _DIGITS))
    wide = len(text) - len(text.encode("ascii", "ignore"))
    plain = len(text) - digits - wide
    return -(-plain // CHARS_PER_TOKEN) + digits + wide + TOKENS_PER_MESSAGE


def prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """The estimate for a whole prompt as `ConversationMemory.prompt` builds it."""
    return sum(estimate_tokens(m["content"]) for m in messages)


def render(message: Message) -> list[dict[str, str]]:
    """A stored message as OpenAI chat messages (an interrupted reply gets a note)."""
    rendered = [{"role": message.role, "content": message.content}]
    if message.interrupted:
        rendered.append({"role": "system", "content": INTERRUPTED_NOTE})
    return rendered


def validate_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or USER_ID_RE.fullmatch(user_id) is None:
        raise ValueError(
            f"invalid user id {user_id!r}: need 1-128 characters from A-Z a-z 0-9 . _ : @ -"
        )
    return user_id


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


class ConversationMemory:
    """History, summary and prompt assembly for each user; users never share keys."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        memory: MemoryConfig | None = None,
        context_window: ContextWindowConfig | None = None,
        budget: int | None = None,
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.cfg = memory or MemoryConfig()
        self.window = context_window or ContextWindowConfig()
        self.budget = budget or self.window.max_tokens or DEFAULT_PROMPT_TOKENS
        self._replace = client.register_script(scripts.REPLACE)
        self._append = client.register_script(scripts.APPEND)
        self._heard = client.register_script(scripts.HEARD)
        self._continue = client.register_script(scripts.CONTINUE)
        self.keys = Keys(prefix)

    # Key names live here rather than in workers/runtime/keys.py on purpose: memory is per
    # user, not per session. The {user_id} hash tag keeps both keys in one slot.
    def messages_key(self, user_id: str) -> str:
        return Keys(self.prefix).user_messages(validate_user_id(user_id))

    def summary_key(self, user_id: str) -> str:
        return Keys(self.prefix).user_summary(validate_user_id(user_id))

    # -- writing ----------------------------------------------------------
    async def append(
        self, user_id: str, role: str, content: str, *, interrupted: bool = False,
        turn_id: str = "",
    ) -> Message | None:
        """Store one message; trim to the cap and refresh both TTLs, atomically.

        With a ``turn_id``, a second call for the same turn and role stores nothing and
        returns None, and an assistant reply whose heard part `record_heard` already
        knows is stored as that part, marked interrupted.
        """
        msg = self._message(role, content, interrupted=interrupted, turn_id=turn_id)
        mkey = self.messages_key(user_id)
        tag = turn_id or "-"
        stored = await self._append(
            keys=[mkey, self.summary_key(user_id),
                  self.keys.user_turn_stored(user_id, tag, role),
                  self.keys.user_turn_heard(user_id, tag)],
            args=[_encoder.encode(msg), self.cfg.max_messages_per_user, self.cfg.message_ttl,
                  "1" if turn_id else "0"],
        )
        if not stored:
            return None
        return _decoder.decode(stored)

    @staticmethod
    def _message(role: str, content: str, *, interrupted: bool = False,
                 turn_id: str = "") -> Message:
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}: must be 'user' or 'assistant'")
        if not isinstance(content, str):
            raise ValueError(f"content must be str, got {type(content).__name__}")
        size = len(content.encode("utf-8"))
        if size > MAX_CONTENT_BYTES:
            raise ValueError(
                f"message content is {size} bytes; at most {MAX_CONTENT_BYTES} are stored"
            )
        return Message(role=cast(Role, role), content=content, ts=time.time(),
                       interrupted=interrupted, id=secrets.token_hex(8), turn_id=turn_id)

    async def continue_turn(self, user_id: str, continued_turn: str, turn_id: str,
                            content: str) -> Message | None:
        """The user's words of ``turn_id`` replace everything stored for
        ``continued_turn`` (the fragment the user went on from, and any reply to it,
        which they never heard), atomically. A later append for ``continued_turn``
        stores nothing; a second call for ``turn_id`` stores nothing and returns None."""
        if not continued_turn or not turn_id:
            raise ValueError("continue_turn needs the continued and the new turn id")
        msg = self._message("user", content, turn_id=turn_id)
        stored = await self._continue(
            keys=[self.messages_key(user_id), self.summary_key(user_id),
                  self.keys.user_turn_stored(user_id, continued_turn, "user"),
                  self.keys.user_turn_stored(user_id, continued_turn, "assistant"),
                  self.keys.user_turn_stored(user_id, turn_id, "user")],
            args=[_encoder.encode(msg), self.cfg.max_messages_per_user, self.cfg.message_ttl,
                  continued_turn],
        )
        return _decoder.decode(stored) if stored else None

    async def record_heard(self, user_id: str, turn_id: str, heard: str) -> bool:
        """The user heard only ``heard`` of the turn's reply (barge-in): store that.

        Replaces the stored reply (marked interrupted) and returns True; if the reply is
        not stored yet, keeps ``heard`` so that `append` stores it instead, and returns
        False. Either order ends with the same history.
        """
        if not turn_id:
            raise ValueError("record_heard needs the turn id of the interrupted reply")
        size = len(heard.encode("utf-8"))
        if size > MAX_CONTENT_BYTES:
            raise ValueError(f"heard text is {size} bytes; at most {MAX_CONTENT_BYTES}")
        changed = await self._heard(
            keys=[self.messages_key(user_id), self.keys.user_turn_heard(user_id, turn_id)],
            args=[turn_id, heard, self.cfg.message_ttl],
        )
        return bool(changed)

    async def replace_with_summary(
        self, user_id: str, summary: str, covered: Sequence[Message]
    ) -> int:
        """Set the summary and drop the summarised messages, atomically.

        `summary` is the new full summary (merging with the previous one is the
        caller's job); `covered` is what `to_summarize` returned and was summarised.
        Exactly those messages are removed from the head of the list; anything
        appended meanwhile stays. Returns how many were removed, or -1 when the
        list no longer starts with them (nothing changed; summarise again later).
        With ``summarization.keep_summary`` false the summary is not stored and
        the covered messages are only dropped.
        """
        if not isinstance(summary, str):
            raise ValueError(f"summary must be str, got {type(summary).__name__}")
        size = len(summary.encode("utf-8"))
        if size > MAX_SUMMARY_BYTES:
            raise ValueError(f"summary is {size} bytes; at most {MAX_SUMMARY_BYTES} are stored")
        mkey, skey = self.messages_key(user_id), self.summary_key(user_id)
        if not covered:
            return 0
        stored = summary if self.cfg.summarization.keep_summary else ""
        result = await self._replace(
            keys=[mkey, skey],
            args=[stored, covered[-1].id, len(covered), self.cfg.message_ttl],
        )
        return int(result)

    async def clear(self, user_id: str) -> None:
        await self.redis.delete(self.messages_key(user_id), self.summary_key(user_id))

    # -- reading ----------------------------------------------------------
    async def history(self, user_id: str) -> list[Message]:
        """Every stored message of the user, oldest first."""
        raw = await self.redis.lrange(self.messages_key(user_id), 0, -1)
        return _decode_all(raw)

    async def summary(self, user_id: str) -> str | None:
        raw: Any = await self.redis.get(self.summary_key(user_id))
        if raw is None:
            return None
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)

    async def length(self, user_id: str) -> int:
        n: Any = await self.redis.llen(self.messages_key(user_id))
        return int(n)

    async def needs_summary(self, user_id: str) -> bool:
        s = self.cfg.summarization
        return s.enabled and await self.length(user_id) >= s.trigger_at

    async def to_summarize(self, user_id: str) -> list[Message]:
        """All messages but the last ``summarization.keep_recent``, oldest first."""
        end = -(self.cfg.summarization.keep_recent + 1)
        raw = await self.redis.lrange(self.messages_key(user_id), 0, end)
        return _decode_all(raw)

    async def prompt(
        self, user_id: str, system_prompt: str, user_text: str, *, turn_id: str = ""
    ) -> list[dict[str, str]]:
        """OpenAI chat messages for the next turn (`build_prompt`)."""
        return (await self.build_prompt(user_id, system_prompt, user_text,
                                        turn_id=turn_id)).messages

    async def build_prompt(
        self, user_id: str, system_prompt: str, user_text: str, *, turn_id: str = ""
    ) -> Prompt:
        """OpenAI chat messages for the next turn, within ``budget`` estimated tokens.

        Order: system prompt, summary (as a system message), a window of the history
        oldest first (at most ``keep_recent_messages``, `workers.llm.prompt_window`: it
        starts where the last prompt's did while that fits, so the prompt's prefix
        holds), the new user text. The system prompt and the user text are always
        included; what does not fit goes first from the oldest history, then from the
        summary (cut from its start, keeping the most recent part). Budget uses
        `estimate_tokens`. Messages of ``turn_id`` itself are left out (a redelivered
        turn finds its own user message already stored).
        """
        validate_user_id(user_id)
        window_key = self.keys.user_window(user_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.summary_key(user_id))
            pipe.lrange(self.messages_key(user_id), 0, -1)
            pipe.get(window_key)
            raw_summary, raw_history, raw_window = await pipe.execute()
        head = {"role": "system", "content": system_prompt}
        tail = {"role": "user", "content": user_text}
        budget = self.budget - prompt_tokens([head, tail])

        summary_msgs = _summary_message(raw_summary, budget)
        budget -= prompt_tokens(summary_msgs)
        stored = [m for m in _decode_all(raw_history) if not (turn_id and m.turn_id == turn_id)]
        rendered = [render(m) for m in stored]
        previous = _window_state(raw_window)
        candidates = [Candidate(m.id, prompt_tokens(r))
                      for m, r in zip(stored, rendered, strict=True)]
        start = choose_start(candidates, previous.get("anchor"), budget,
                             self.window.keep_recent_messages, self.window.trim_block)
        recent = [part for r in rendered[start:] for part in r]
        messages = [head, *summary_msgs, *recent, tail]
        now = digests(messages)
        before = previous.get("digests") or []
        shared = shared_prefix(before, now)
        reused = prompt_tokens(messages[:shared])
        if (before and shared == len(before) < len(messages)
                and messages[shared]["role"] == "assistant"):
            reused += prompt_tokens(messages[shared:shared + 1])  # the reply it generated
        await self.redis.set(window_key, _encoder.encode(
            {"anchor": stored[start].id if start < len(stored) else None, "digests": now}),
            ex=self.cfg.message_ttl)
        return Prompt(messages, prompt_tokens(messages), reused)

    async def summary_prompt(self, user_id: str, system_prompt: str,
                             instructions: str) -> list[dict[str, str]]:
        """The conversation as the user's prompts show it — system prompt, summary, the
        stored history (all of it, as far as the budget goes) — and then
        ``instructions``: asked so, a summary costs a prefix-caching server only the
        instructions, since its last prompt began the same way."""
        validate_user_id(user_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.summary_key(user_id))
            pipe.lrange(self.messages_key(user_id), 0, -1)
            raw_summary, raw_history = await pipe.execute()
        head = {"role": "system", "content": system_prompt}
        tail = {"role": "user", "content": instructions}
        budget = self.budget - prompt_tokens([head, tail])
        summary_msgs = _summary_message(raw_summary, budget)
        budget -= prompt_tokens(summary_msgs)
        rendered = [render(m) for m in _decode_all(raw_history)]
        start = longest_suffix([Candidate(str(i), prompt_tokens(r))
                                for i, r in enumerate(rendered)], budget, len(rendered))
        return [head, *summary_msgs, *[p for r in rendered[start:] for p in r], tail]


def _summary_message(raw: bytes | str | None, budget: int) -> list[dict[str, str]]:
    """The summary as a system message within ``budget`` (cut from its start, keeping
    the most recent part), or none."""
    if raw is None or budget <= TOKENS_PER_MESSAGE:
        return []
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    content = SUMMARY_PREFIX + text
    keep = (budget - TOKENS_PER_MESSAGE) * CHARS_PER_TOKEN - len(SUMMARY_PREFIX) - 1
    while keep > 0 and estimate_tokens(content) > budget:
        content = SUMMARY_PREFIX + "…" + text[len(text) - keep :]
        keep -= max(1, (estimate_tokens(content) - budget) * CHARS_PER_TOKEN)
    if estimate_tokens(content) > budget:
        return []
    return [{"role": "system", "content": content}]


def _window_state(raw: bytes | str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        state = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return {}  # unreadable: start a new window
    return state if isinstance(state, dict) else {}


def _decode_all(raw: Sequence[bytes | str]) -> list[Message]:
    out: list[Message] = []
    for item in raw:
        try:
            out.append(_decoder.decode(item))
        except msgspec.DecodeError:
            continue  # a foreign or corrupt record: skipped rather than failing the turn
    return out

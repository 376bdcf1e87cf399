"""Which stored messages go into the next prompt, chosen so that the prompt's prefix holds.

An LLM server with a prefix cache (llama.cpp, vLLM) evaluates only what follows the
longest prefix its last request shares with this one. Dropping the oldest two messages
every turn changes the prompt right after the system prompt, so every turn would pay
for the whole history again (seen: ~9 s a turn on 2 cores once the window was full).

So the window starts at a remembered message (the *anchor*) and only grows, until it
holds more than ``keep`` messages or more than the token budget; then it is cut
``block`` messages (and in proportion tokens) shorter at once, and a new anchor is
remembered. Between cuts every prompt extends the previous one: system prompt,
summary, history, and the new user message at the end. The window is always a suffix
of the stored history: a message is never skipped while an older one is kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One stored message, as far as the window is concerned."""
    id: str
    tokens: int  # estimated, rendered (an interrupted reply's note included)


def choose_start(history: Sequence[Candidate], anchor: str | None, budget: int,
                 keep: int, block: int) -> int:
    """Index of the first message of the window (``len(history)``: none fits).

    The anchor's window is kept while it fits; otherwise the window is the longest
    suffix within ``keep - block`` messages and the same share of the budget, so the
    next ``block`` messages fit before the next cut (or, when not even the newest
    message fits that share, the longest suffix that fits at all).
    """
    n = len(history)
    if anchor is not None:
        for i, candidate in enumerate(history):
            if candidate.id == anchor:
                if n - i <= keep and sum(c.tokens for c in history[i:]) <= budget:
                    return i
                break
    count = max(1, keep - block)
    start = longest_suffix(history, budget * count // keep, count)
    # Messages so long that not even the newest fits the share: what fits at all.
    return start if start < n else longest_suffix(history, budget, keep)


def longest_suffix(history: Sequence[Candidate], budget: int, most: int) -> int:
    """Start of the longest run of newest messages, at most ``most``, within ``budget``
    (``len(history)``: not even the newest fits)."""
    start, total = len(history), 0
    while start > 0 and len(history) - start < most:
        total += history[start - 1].tokens
        if total > budget:
            break
        start -= 1
    return start


def digests(messages: Sequence[dict[str, str]]) -> list[str]:
    """A short fingerprint per chat message, to compare prompts without storing them."""
    return [hashlib.blake2b(json.dumps([m["role"], m["content"]]).encode(),
                            digest_size=6).hexdigest() for m in messages]


def shared_prefix(previous: Sequence[str], current: Sequence[str]) -> int:
    """How many leading messages ``current`` shares with ``previous``."""
    n = 0
    for a, b in zip(previous, current, strict=False):
        if a != b:
            break
        n += 1
    return n

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
    suffix = [0] * (n + 1)  # suffix[i]: tokens of history[i:]
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + history[i].tokens
    if anchor is not None:
        for i, candidate in enumerate(history):
            if candidate.id == anchor:
                if n - i <= keep and suffix[i] <= budget:
                    return i
                break
    count = max(1, keep - block)
    for most, tokens in ((count, budget * count // keep), (keep, budget)):
        # The second try: messages so long that not even the newest fits the share.
        for i in range(max(0, n - most), n):
            if suffix[i] <= tokens:
                return i
    return n


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

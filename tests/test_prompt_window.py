"""The prompt window (workers.llm.prompt_window): pure, no Redis."""

from __future__ import annotations

import itertools

from workers.llm.prompt_window import Candidate, choose_start, digests, shared_prefix


def history(n: int, tokens: int = 10) -> list[Candidate]:
    return [Candidate(f"m{i}", tokens) for i in range(n)]


def test_a_new_window_leaves_room_for_a_block() -> None:
    assert choose_start(history(30), None, 10_000, keep=20, block=10) == 20
    assert choose_start(history(4), None, 10_000, keep=20, block=10) == 0


def test_the_anchor_holds_until_the_window_outgrows_it() -> None:
    h = history(30)
    assert choose_start(h, "m10", 10_000, keep=20, block=10) == 10  # 20 messages: fits
    assert choose_start(h, "m9", 10_000, keep=20, block=10) == 20  # 21: cut a block at once
    assert choose_start(h, "gone", 10_000, keep=20, block=10) == 20  # summarized away


def test_tokens_cut_the_window_too_and_in_proportion() -> None:
    h = history(12, tokens=100)
    assert choose_start(h, "m0", 1200, keep=20, block=10) == 0  # all 12 fit
    assert choose_start(h, "m0", 1199, keep=20, block=10) == 7  # cut to half the budget
    assert choose_start(history(3, tokens=5000), None, 1000, keep=20, block=10) == 3  # none fits
    assert choose_start(h, None, -5, keep=20, block=10) == 12
    assert choose_start(history(3, tokens=700), None, 1000, keep=20, block=10) == 2  # newest


def test_a_growing_history_changes_the_prompts_prefix_once_per_block() -> None:
    anchor, starts = None, []
    for n in range(2, 62, 2):  # a user and an assistant message per turn
        h = history(n)
        start = choose_start(h, anchor, 10_000, keep=20, block=10)
        anchor = h[start].id
        starts.append(start)
        assert n - start <= 20
    moves = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    # 30 turns: the window grew from 10 to 20 messages and moved on every 6th turn
    # (at 22, 34, 46 and 58 messages), not on every turn.
    assert moves == 4 and starts[-1] == 48


def test_shared_prefix_counts_leading_messages() -> None:
    a = digests([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    b = digests([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "hello"}])
    c = digests([{"role": "system", "content": "s"}, {"role": "user", "content": "ho"}])
    assert shared_prefix(a, b) == 2 and shared_prefix(a, c) == 1 and shared_prefix([], b) == 0
    assert digests([{"role": "user", "content": "x"}]) != digests([{"role": "system",
                                                                    "content": "x"}])

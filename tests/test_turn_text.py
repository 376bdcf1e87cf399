"""The transcript's verdict at a pause: does the turn so far read as finished?"""

from __future__ import annotations

import pytest

from workers.vad.turn_text import judge_text


@pytest.mark.parametrize("text, verdict", [
    # Goes on: a trailing comma, a function word, an unfinished list.
    ("And so my fellow Americans,", "incomplete"),
    ("I would like to book a table for", "incomplete"),
    ("Can you tell me the", "incomplete"),
    ("I went there because", "incomplete"),
    ("Press one to list users, two to kick all users.", "incomplete"),
    ("One, two, three.", "incomplete"),
    ("My number is five five five -", "incomplete"),
    ("Well, um", "incomplete"),
    # Nothing says it goes on.
    ("Go forward ten meters.", "complete"),
    ("Press one to list users, two to kick all users, or three to quit.", "complete"),
    ("One, two and three.", "complete"),
    ("Yes, please.", "complete"),
    ("No.", "complete"),
    ("So.", "complete"),  # a lone word answers on its own
    ("Gregson", "complete"),
    # A question is over.
    ("Which city do I live in?", "question"),
    # Nothing to judge.
    ("", "unknown"),
    ("   ", "unknown"),
    (None, "unknown"),
    ("...", "incomplete"),
])
def test_verdicts(text: str | None, verdict: str) -> None:
    assert judge_text(text).verdict == verdict


def test_the_verdict_says_what_it_rests_on() -> None:
    assert judge_text("a table for").reason == "ends on 'for'"
    assert judge_text("and so,").reason == "ends on ','"
    assert "list" in judge_text("press one for sales, two for support").reason

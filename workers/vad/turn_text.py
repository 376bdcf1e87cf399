"""Does the transcript of a turn so far read as finished? One signal of turn ending.

At a pause the VAD has a speculative transcript of the turn up to that pause. Its
last words say a lot that the acoustic model (Smart Turn) cannot hear: a sentence
that stops on "and", "to", "the" or a comma is not over, however final the
intonation sounded; a list read out item by item ("press one to list users, two to
kick all users") is not over until its last item comes with "and"/"or"; a question
is over. The verdict is deliberately simple and explainable — word lists, not a
model — and it only ever *lengthens* the wait at a pause, except for a question,
which may shorten it (see ``turn_detection``).

Whisper punctuates: a trailing comma is a strong "go on"; a full stop is weak
evidence (Whisper closes almost every fragment with one), so "complete" here means
only "nothing says it goes on".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["complete", "incomplete", "question", "unknown"]

# Words a finished English sentence practically never ends on: conjunctions,
# prepositions, articles, determiners, auxiliaries and the like.
CONTINUING_WORDS = frozenset("""
a an the this that these those my your his her its our their some any each every no
and or but nor so yet because since although though unless while whereas if than as
then also plus
to of in on at by for from with without into onto about over under after before
between through during against among toward towards upon via per like
is are was were be been being am do does did have has had will would shall should
can could may might must
i you he she we they it's i'm you're we're they're there's
which who whom whose where when whether what
very really quite just not
um uh er erm hmm
""".split())
# Items of a spoken list: a list whose last item has no "and"/"or" before it goes on.
LIST_ITEM = re.compile(
    r"^(?:(?:press|dial|say|enter|option|choose|select|for|then|and|or)\s+)?"
    r"(?:\d+|zero|one|two|three|four|five|six|seven|eight|nine|ten|first|second|third|"
    r"fourth|fifth|next|last|finally)\b", re.IGNORECASE)
CLOSING = re.compile(r"^(?:and|or|nor|and then|or else|finally|lastly)\b", re.IGNORECASE)
WORD = re.compile(r"[A-Za-z']+|\d+")


@dataclass(frozen=True)
class TextVerdict:
    verdict: Verdict
    reason: str  # what the verdict rests on, for decision records and logs


def judge_text(text: str | None) -> TextVerdict:
    """The verdict on a (speculative) transcript of the turn so far."""
    if text is None:
        return TextVerdict("unknown", "no transcript")
    stripped = text.strip().strip('"').strip()
    if not stripped:
        return TextVerdict("unknown", "empty transcript")
    if stripped.endswith((",", ";", ":", "-", "—", "…", "...")):
        return TextVerdict("incomplete", f"ends on {stripped[-1]!r}")
    words = WORD.findall(stripped)
    if not words:
        return TextVerdict("unknown", "no words")
    if stripped.endswith("?"):  # "Which city do I live in?": Whisper heard a question
        return TextVerdict("question", "a question")
    last = words[-1].lower()
    if last in CONTINUING_WORDS and not _one_word_answer(words):
        return TextVerdict("incomplete", f"ends on {last!r}")
    if _open_list(stripped):
        return TextVerdict("incomplete", "a list without its last item")
    return TextVerdict("complete", "nothing says it goes on")


def _one_word_answer(words: list[str]) -> bool:
    # "No." / "So." / "Yes, I do." answer on their own: a lone word is not cut off.
    return len(words) == 1


def _open_list(text: str) -> bool:
    """Comma-separated items, two or more of them list items, the last without and/or."""
    body = text.rstrip(".!?").strip()
    clauses = [c.strip() for c in re.split(r"[,;]", body) if c.strip()]
    if len(clauses) < 2:
        return False
    items = sum(1 for c in clauses if LIST_ITEM.match(c))
    last = clauses[-1]
    closed = CLOSING.match(last) is not None or re.search(r"\b(?:and|or)\b", last) is not None
    return items >= 2 and not closed

"""Scoring transcripts against what was said (used by tests and bench/asr_latency.py)."""

from __future__ import annotations

import re

NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
           "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


def words(text: str) -> list[str]:
    """Lower case, hyphens as spaces, no punctuation, digits spelled out."""
    text = re.sub("[-\u2010\u2013\u2014]", " ", text.lower())
    tokens = re.sub(r"[^a-z0-9' ]", " ", text).split()
    return [NUMBERS.get(t, t) for t in tokens]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance / reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))

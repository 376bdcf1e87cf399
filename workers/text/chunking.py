"""Streaming text chunker for the LLM → TTS hand-off.

An LLM streams tokens in arbitrary pieces (part of a word, several words,
punctuation with spaces, a newline); TTS wants whole sentences, as early as
possible, without markdown. ``Chunker.push(token)`` returns the chunks that
became certain with that token; ``Chunker.flush()`` returns the rest at the end
of the stream.

**Boundary independence.** Every decision is made at one position of the text
and depends only on the text up to a small look-ahead; when the look-ahead has
not arrived yet the chunker waits (holds that text back) instead of guessing. So
the chunks are the same however the text was split into tokens: one token,
character by character, or anything between.

Sentence rules (mode ``"sentence"``, and ``"word"`` after its first chunk):

* A run of ``. ! ? …`` followed by optional closers (quotes, brackets, markdown
  markers: ``He said "Stop." Then`` keeps the quote in the first sentence) and
  then whitespace ends a sentence, unless the next word (after opening quotes or
  brackets) starts with a lowercase letter (``Wait... what?``, ``"why?" she
  asked``, ``etc. and more``, ``5 p.m. today`` stay one sentence). Deciding
  needs the next non-space character: that is the only text held back.
  End of stream and a newline in the whitespace decide at once.
* No whitespace after the terminal, no sentence end: decimals and versions
  (``3.5``, ``v2.0.1``), URLs and e-mails (``example.com/a?b``), ``e.g.``.
* A single period never ends a sentence after a title or a "never final"
  abbreviation (``Dr. Mr. Mrs. Ms. Prof. St. Jr. vs. e.g. i.e. cf. Gen.`` ...,
  see ``NEVER_FINAL``), an initial (``J. R. R. Tolkien``, ``I`` excepted),
  dotted capitals (``U.S.``, ``U.K.``), or a number opening a line (``1. First``,
  a numbered list). Abbreviations that often do end a sentence (``etc.``,
  ``a.m.``, ``Inc.``) follow the general rule: a capital after them splits.
* Every newline ends a chunk (a paragraph break, a list item, a heading: LLM
  output does not hard-wrap prose, so a newline is structure, and each list item
  is spoken on its own).
* A chunk longer than ``max_chars`` is cut at the last clause boundary before
  the cap (``,`` ``;`` ``:`` or a spaced dash ``" - "``/``" — "``), else at the
  last space, so TTS never waits on a run-on sentence. A single word longer than
  the cap (a URL) is never broken; it becomes a chunk of its own.

Word mode (``"word"``): the first chunk goes out after ``first_words_min`` words
when the last of them ends a clause (``,;:`` or is a dash), else after
``first_words_max`` words (a sentence end or newline before that wins), so audio
starts after a few words; after the first chunk it continues in sentence mode,
as pipecat and LiveKit do: a fast start, then whole sentences for good prosody.
A *word* is a whitespace-separated run holding a letter or digit.

Markdown markers are not spoken (``strip_markdown``): heading ``#``, bullet
``- * +`` and quote ``>`` prefixes at a line start, ``*``/``**`` emphasis (a
``*`` between spaces or between digits is kept: ``2 * 3``), ``_``/``__``
emphasis (an underscore inside a word is kept: ``snake_case``), backticks,
``~~`` and thematic-break lines (``---``). Nothing else is removed (link syntax
is read as is); numbered-list numbers are kept.

**Invariant** (tested): chunks are non-empty, cut only at whitespace of the
input, and have their whitespace normalised (trimmed, runs of whitespace
including newlines collapsed to one space), so
``" ".join(chunks) == " ".join(strip_markdown(text).split())``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

Mode = Literal["sentence", "word"]

TERMINALS = frozenset(".!?…")
# Quotes: " ' » \u201d \u2019 close, " ' « \u201c \u2018 open (escaped: ruff RUF001).
CLOSERS = frozenset("\"')]}»\u201d\u2019*_`")
OPENERS = frozenset("\"'([{«\u201c\u2018*_`¿¡")
CLAUSE_PUNCT = frozenset(",;:")
DASHES = frozenset("-\u2013\u2014")  # hyphen, en dash, em dash

# A period after these (lowercased, without the period) never ends a sentence.
NEVER_FINAL = frozenset(
    {
        # titles and name parts
        "mr", "mrs", "ms", "mx", "dr", "prof", "st", "jr", "sr", "rev", "hon", "fr",
        "gen", "col", "lt", "sgt", "capt", "cmdr", "adm", "gov", "sen", "rep", "pres",
        # Latin and references
        "vs", "e.g", "i.e", "cf", "viz", "approx", "ca", "al", "fig", "figs", "eq",
        "vol", "vols", "ch", "pp", "art", "dept", "est", "nr",
        # places and months
        "mt", "ft", "ave", "blvd", "jan", "feb", "apr", "aug", "sep", "sept", "oct",
        "nov", "dec",
    }
)  # fmt: skip

_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
_PREFIX = re.compile(r"^[ \t]*(?:(?:#{1,6}|[-*+>])(?:[ \t]+|$))+")
_THEMATIC = re.compile(r"[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*")
_INLINE = re.compile(r"\*+|_+|`+|~~+")


def _inline(match: re.Match[str]) -> str:
    text, start, end = match.string, match.start(), match.end()
    prev = text[start - 1] if start > 0 else " "
    nxt = text[end] if end < len(text) else " "
    marker = match.group()
    if marker[0] == "*" and (
        (prev.isspace() and nxt.isspace()) or (prev.isdigit() and nxt.isdigit())
    ):
        return marker  # "2 * 3", "2*3": arithmetic, not emphasis
    if marker[0] == "_" and prev.isalnum() and nxt.isalnum():
        return marker  # snake_case
    return ""


def strip_markdown(text: str, at_line_start: bool = True) -> str:
    """``text`` without the markdown markers TTS must not speak (see the module doc).

    ``at_line_start`` says whether ``text`` begins a line (prefix markers count).
    """
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if index > 0 or at_line_start:
            if _THEMATIC.fullmatch(line):
                lines[index] = ""
                continue
            line = _PREFIX.sub("", line, count=1)
        lines[index] = _INLINE.sub(_inline, line)
    return "\n".join(lines)


def normalize(text: str) -> str:
    """Trim and collapse every whitespace run to one space."""
    return " ".join(text.split())


def ends_sentence(text: str) -> bool:
    """Whether a chunk ends where a sentence does (a terminal, then only closers):
    ``False`` for word mode's first few words and for a long sentence cut at a clause."""
    end = text.rstrip().rstrip("".join(CLOSERS))
    return bool(end) and end[-1] in TERMINALS


def _has_alnum(word: str) -> bool:
    return any(ch.isalnum() for ch in word)


class Chunker:
    """Cuts a stream of LLM tokens into TTS chunks; one instance per turn.

    ``push`` returns the chunks completed by a token, ``flush`` the rest (and
    makes the instance ready for a new stream).
    """

    def __init__(
        self,
        mode: Mode = "sentence",
        *,
        max_chars: int = 200,
        first_words_min: int = 3,
        first_words_max: int = 5,
    ) -> None:
        if mode not in ("sentence", "word"):
            raise ValueError(f"mode must be 'sentence' or 'word', not {mode!r}")
        if max_chars < 10:
            raise ValueError(f"max_chars must be >= 10, not {max_chars}")
        if not 1 <= first_words_min <= first_words_max:
            raise ValueError("need 1 <= first_words_min <= first_words_max")
        self.mode: Mode = mode
        self.max_chars = max_chars
        self.first_words_min = first_words_min
        self.first_words_max = first_words_max
        self._reset()

    def _reset(self) -> None:
        self._buf = ""  # text not emitted yet; starts with whitespace or the stream
        self._scan = 0  # positions before this are decided: no cut there
        self._no_alnum_before = 0  # _buf has no letter or digit before this
        self._stream_start = True  # _buf begins at the start of the stream
        self._first_done = self.mode == "sentence"  # word mode: first chunk emitted

    def push(self, token: str) -> list[str]:
        """Add a token; return the chunks that are now complete."""
        if not token:
            return []
        self._buf += token
        return self._drain(eof=False)

    def flush(self) -> list[str]:
        """End of stream: return everything left, and reset."""
        out = self._drain(eof=True)
        out.extend(self._emit(len(self._buf)))
        self._reset()
        return out

    # -- internals -------------------------------------------------------------

    def _drain(self, eof: bool) -> list[str]:
        out: list[str] = []
        while (cut := self._next_cut(eof)) is not None:
            out.extend(self._emit(cut))
        return out

    def _emit(self, cut: int) -> list[str]:
        raw, self._buf = self._buf[:cut], self._buf[cut:]
        text = normalize(strip_markdown(raw, at_line_start=self._stream_start))
        self._scan = self._no_alnum_before = 0
        self._stream_start = False
        if not text:
            return []
        self._first_done = True
        return [text]

    def _next_cut(self, eof: bool) -> int | None:
        """Scan from ``_scan``: the next cut position, or None (wait / all scanned)."""
        buf = self._buf
        start = len(buf) - len(buf.lstrip())  # first non-space character
        for p in range(self._scan, len(buf)):
            ch = buf[p]
            if ch == "\n":
                if start < p:
                    return p
                continue
            if ch.isspace():
                if not self._first_done and p > 0 and not buf[p - 1].isspace():
                    if self._first_words_done(start, p):
                        return p
                continue
            over = p + 1 - start - self.max_chars
            if over > 0 and (over == 1 or buf[p - 1].isspace()):  # a new cut point
                cut = self._long_cut(start, p)
                if cut is not None:
                    return cut
            if ch in TERMINALS and (p == 0 or buf[p - 1] not in TERMINALS):
                verdict, end = self._sentence_end(p, eof)
                if verdict is None:
                    self._scan = p  # wait for the look-ahead
                    return None
                if verdict:
                    if end - start > self.max_chars:
                        return self._long_cut(start, end) or end
                    return end
        self._scan = len(buf)
        return None

    def _sentence_end(self, q: int, eof: bool) -> tuple[bool | None, int]:
        """Does the terminal run at ``q`` end a sentence? (None: need more text.)"""
        buf, n = self._buf, len(self._buf)
        i = q
        while i < n and buf[i] in TERMINALS:
            i += 1
        single_period = buf[q:i] == "."
        while i < n and buf[i] in CLOSERS:
            i += 1
        end = i
        if i == n:
            return (True if eof else None), end
        if not buf[i].isspace():
            return False, end  # 3.5, v2.0.1, example.com, e.g.
        if single_period and self._never_final(q):
            return False, end
        j = i
        while j < n and buf[j].isspace():
            if buf[j] == "\n":
                return True, end
            j += 1
        while j < n and buf[j] in OPENERS:
            j += 1
        if j == n:
            return (True if eof else None), end
        return not buf[j].islower(), end

    def _never_final(self, q: int) -> bool:
        """Is the period at ``q`` after an abbreviation, an initial or a list number?"""
        buf = self._buf
        k = q
        while k > 0 and not buf[k - 1].isspace():
            k -= 1
        word = buf[k:q]
        core = word.lstrip("".join(ch for ch in word if not ch.isalnum()))
        if not core:
            return False
        if core.lower() in NEVER_FINAL:
            return True
        if len(core) == 1 and core.isupper() and core != "I":
            return True  # an initial: J. R. R. Tolkien
        if _DOTTED.fullmatch(core) and any(ch.isupper() for ch in core):
            return True  # U.S., J.R.R.
        if core.isdigit():  # "1. First" opening a line is a list number
            while k > 0 and buf[k - 1] in " \t":
                k -= 1
            return (k == 0 and self._stream_start) or (k > 0 and buf[k - 1] == "\n")
        return False

    def _long_cut(self, start: int, limit: int) -> int | None:
        """Where to cut a chunk that would pass ``max_chars`` (it ends before ``limit``).

        The last clause boundary within the cap, else the last space within it,
        else (a first word longer than the cap) the first space after that word.
        The cut keeps a letter or digit before it, so a line's markdown prefix is
        never split from its text (``strip_markdown`` sees the same line starts).
        """
        buf = self._buf
        begin = max(start, self._no_alnum_before)  # cache: keeps this linear
        first = next((i for i in range(begin, limit) if buf[i].isalnum()), None)
        if first is None:
            self._no_alnum_before = limit
            return None
        last = min(start + self.max_chars, limit, len(buf) - 1)
        spaces = [c for c in range(last, first, -1) if buf[c].isspace()]
        for c in spaces:
            before = buf[c - 1]
            if before in CLAUSE_PUNCT or (before in DASHES and buf[c - 2].isspace()):
                return c
        if spaces:
            return spaces[0]
        return next((c for c in range(max(last, first) + 1, limit) if buf[c].isspace()), None)

    def _first_words_done(self, start: int, p: int) -> bool:
        """Word mode, at the space ``p`` after a word: is the first chunk complete?"""
        tokens = self._buf[start:p].split()
        words = sum(1 for tok in tokens if _has_alnum(tok))
        if words >= self.first_words_max:
            return True
        if words < self.first_words_min:
            return False
        last = tokens[-1]
        if set(last) <= DASHES:
            return True  # a spaced dash: "Well — "
        last = last.rstrip("".join(CLOSERS))
        return bool(last) and last[-1] in CLAUSE_PUNCT


def chunks(
    tokens: Iterable[str],
    mode: Mode = "sentence",
    *,
    max_chars: int = 200,
    first_words_min: int = 3,
    first_words_max: int = 5,
) -> list[str]:
    """Every chunk of a whole token stream (push each token, then flush)."""
    chunker = Chunker(
        mode,
        max_chars=max_chars,
        first_words_min=first_words_min,
        first_words_max=first_words_max,
    )
    out: list[str] = []
    for token in tokens:
        out.extend(chunker.push(token))
    out.extend(chunker.flush())
    return out

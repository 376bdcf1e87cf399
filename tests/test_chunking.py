"""The LLM → TTS chunker: sentence rules, markdown, caps, word mode, streaming.

Every expected result is checked three ways (one token, character by character,
random token boundaries); the properties check that the token boundaries never
change the chunks and that no text is lost or duplicated.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.text.chunking import Chunker, chunks, ends_sentence, normalize, strip_markdown

MARKERS_AND_SPACE = re.compile(r"[\s*_`~#>+\-]")


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def assert_stream(text: str, expected: list[str], **kwargs: Any) -> None:
    """``text`` gives ``expected`` whole, char by char and in random pieces."""
    assert chunks([text], **kwargs) == expected
    assert chunks(list(text), **kwargs) == expected
    rng = random.Random(text)
    for _ in range(20):
        assert chunks(random_split(text, rng), **kwargs) == expected


# -- sentence rules ------------------------------------------------------------

TRICKY = [
    ("Hello there. How are you?", ["Hello there.", "How are you?"]),
    ("No end in sight", ["No end in sight"]),
    (
        "Dr. Smith went to Washington. He arrived at 3 p.m. and left.",
        ["Dr. Smith went to Washington.", "He arrived at 3 p.m. and left."],
    ),
    (
        "Mr. and Mrs. Jones met Prof. Xu at St. Mary's. Ms. Lee came too.",
        ["Mr. and Mrs. Jones met Prof. Xu at St. Mary's.", "Ms. Lee came too."],
    ),
    (
        "Martin Luther King Jr. was born in 1929. Yes.",
        ["Martin Luther King Jr. was born in 1929.", "Yes."],
    ),
    ("It was Lakers vs. Celtics. Fun.", ["It was Lakers vs. Celtics.", "Fun."]),
    ("J. R. R. Tolkien wrote it. Then he slept.", ["J. R. R. Tolkien wrote it.", "Then he slept."]),
    ("So did I. Then we left.", ["So did I.", "Then we left."]),
    ("J.R.R. Tolkien wrote it. Then he slept.", ["J.R.R. Tolkien wrote it.", "Then he slept."]),
    (
        "Sales hit 3.5 million. Version v2.0.1 shipped! Pi is 3.14159.",
        ["Sales hit 3.5 million.", "Version v2.0.1 shipped!", "Pi is 3.14159."],
    ),
    (
        "Bring fruit, e.g. Apples. That is, i.e. Pears. Done.",
        ["Bring fruit, e.g. Apples.", "That is, i.e. Pears.", "Done."],
    ),
    ("The U.S. Army is here. The U.K. too.", ["The U.S. Army is here.", "The U.K. too."]),
    # trade-off: dotted capitals never end a sentence (a late split costs less than a wrong one)
    ("I live in the U.S. It is big.", ["I live in the U.S. It is big."]),
    ("Apples, pears, etc. and more. Then lunch.", ["Apples, pears, etc. and more.", "Then lunch."]),
    ("Apples, pears, etc. Then lunch.", ["Apples, pears, etc.", "Then lunch."]),
    ("Meet at 5 p.m. Then dinner.", ["Meet at 5 p.m.", "Then dinner."]),
    # ellipsis: a lowercase word after it continues the sentence
    ("Wait... what? Really... Yes.", ["Wait... what?", "Really...", "Yes."]),
    ("Hmm\u2026 okay. Fine\u2026 Go.", ["Hmm\u2026 okay.", "Fine\u2026", "Go."]),
    # closing quotes and brackets stay with their sentence
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("She said \u201cno.\u201d Then left.", ["She said \u201cno.\u201d", "Then left."]),
    ("(It works!) Great.", ["(It works!)", "Great."]),
    ('He asked "why?" and left. OK.', ['He asked "why?" and left.', "OK."]),
    ('Stop. "Go," he said.', ["Stop.", '"Go," he said.']),
    ("Really?! Yes!!! 5 more.", ["Really?!", "Yes!!!", "5 more."]),
    # URLs and e-mail addresses
    (
        "Visit https://example.com/a.b?x=1. Or mail me@ex.co.uk. Thanks.",
        ["Visit https://example.com/a.b?x=1.", "Or mail me@ex.co.uk.", "Thanks."],
    ),
    ("See example.com for more. Bye.", ["See example.com for more.", "Bye."]),
    # numbered lists and bullets: each item on its own
    (
        "Steps:\n1. First thing.\n2. Second thing.\n10. Tenth.",
        ["Steps:", "1. First thing.", "2. Second thing.", "10. Tenth."],
    ),
    ("1. First\n2. Second", ["1. First", "2. Second"]),
    ("I counted to 10. Then I stopped.", ["I counted to 10.", "Then I stopped."]),
    ("- item one\n- item two\n* item three", ["item one", "item two", "item three"]),
    ("First para\n\nSecond para", ["First para", "Second para"]),
    ("Line one\nline two", ["Line one", "line two"]),
    ("Hi.\n\n\n  Bye.  \n", ["Hi.", "Bye."]),
]


@pytest.mark.parametrize(("text", "expected"), TRICKY)
def test_tricky_sentences(text: str, expected: list[str]) -> None:
    assert_stream(text, expected)


@pytest.mark.parametrize(("text", "expected"), TRICKY)
def test_tricky_sentences_in_word_mode_keep_later_sentences(text: str, expected: list[str]) -> None:
    # word mode only changes the first chunk: the joined text is the same
    out = chunks([text], "word")
    assert " ".join(out) == " ".join(expected)
    assert chunks(list(text), "word") == out


# -- markdown ------------------------------------------------------------------


def test_markdown_markers_are_not_spoken() -> None:
    text = (
        "# Title\n\n**Bold** and `code` and _em_ and snake_case and 2 * 3.\n\n"
        "---\n\n> Quoted *text* here.\n## Next **step.** Then ~~old~~ new."
    )
    assert_stream(
        text,
        [
            "Title",
            "Bold and code and em and snake_case and 2 * 3.",
            "Quoted text here.",
            "Next step.",
            "Then old new.",
        ],
    )


def test_strip_markdown() -> None:
    assert strip_markdown("**a** __b__ `c` *d*") == "a b c d"
    assert strip_markdown("- x\n  * y\n+ z\n# h\n> q") == "x\ny\nz\nh\nq"
    assert strip_markdown("a - b, -5, #tag, 2*3, __init__") == "a - b, -5, #tag, 2*3, init"
    assert strip_markdown("***\n_ _ _\nok") == "\n\nok"
    assert strip_markdown("- x", at_line_start=False) == "- x"


# -- long sentences ------------------------------------------------------------


def test_long_sentence_is_cut_at_last_clause_boundary() -> None:
    clause = "the quick brown fox jumps over the lazy dog"
    text = ", ".join([clause] * 12) + "."
    out = chunks([text], max_chars=100)
    assert all(len(c) <= 100 for c in out)
    assert all(c.endswith(",") for c in out[:-1])
    assert out[0] == f"{clause}, {clause},"
    assert " ".join(out) == text
    assert_stream(text, out, max_chars=100)


@pytest.mark.parametrize("sep", [";", ":", " \u2014", " -"])
def test_long_sentence_other_clause_boundaries(sep: str) -> None:
    text = f"{sep} ".join(["one two three four five six seven eight"] * 6) + "."
    out = chunks([text], max_chars=60)
    assert all(len(c) <= 60 for c in out)
    assert all(c.endswith(sep.strip()) for c in out[:-1])
    assert " ".join(out) == text


def test_long_sentence_without_clauses_is_cut_at_last_space() -> None:
    text = " ".join(f"word{i}" for i in range(100)) + "."
    out = chunks([text])
    assert len(out) > 2
    assert all(len(c) <= 200 for c in out)
    assert all(len(c) > 190 for c in out[:-1])  # filled up to the last space
    assert " ".join(out) == text
    assert_stream(text, out)


def test_a_word_longer_than_the_cap_is_not_broken() -> None:
    url = "https://example.com/" + "x" * 80
    out = chunks([f"Go to {url} now. Bye."], max_chars=40)
    assert out == ["Go to", url, "now.", "Bye."]


def test_default_cap_is_200_chars() -> None:
    text = ("a" * 9 + " ") * 60
    assert [len(c) for c in chunks([text])] == [199, 199, 199]


# -- latency -------------------------------------------------------------------


def test_sentence_is_emitted_when_the_next_word_arrives() -> None:
    chunker = Chunker()
    tokens = ["Hello", " there", ".", " How", " are", " you", "?"]
    emitted = [chunker.push(t) for t in tokens]
    assert emitted == [[], [], [], ["Hello there."], [], [], []]
    assert chunker.flush() == ["How are you?"]


def test_only_the_look_ahead_is_held_back() -> None:
    chunker = Chunker()
    assert chunker.push("Hello there. ") == []  # a lowercase word would continue it
    assert chunker.push("H") == ["Hello there."]
    assert chunker.push("i!\n") == ["Hi!"]  # a newline decides at once
    assert chunker.push("- one\n") == ["one"]
    assert chunker.flush() == []


def test_flush_resets_the_chunker() -> None:
    chunker = Chunker("word")
    assert chunker.push("Dr. Who") == []
    assert chunker.flush() == ["Dr. Who"]
    assert chunker.push("one two three four five six") == ["one two three four five"]
    assert chunker.flush() == ["six"]


# -- word mode -----------------------------------------------------------------


def test_word_mode_first_chunk_after_max_words() -> None:
    chunker = Chunker("word")
    words = "I think that we should probably go home now. Yes, we should.".split(" ")
    tokens = [words[0]] + [" " + w for w in words[1:]]
    emitted = [chunker.push(t) for t in tokens]
    assert emitted[5] == ["I think that we should"]  # when " probably" arrives
    assert all(e == [] for e in emitted[:5])
    assert emitted[9] == ["probably go home now."]  # then sentences
    assert chunker.flush() == ["Yes, we should."]


def test_word_mode_first_chunk_at_min_words_on_a_clause() -> None:
    assert_stream(
        "Well, okay then, let us go now. Fine.",
        ["Well, okay then,", "let us go now.", "Fine."],
        mode="word",
    )
    assert_stream("So yes then \u2014 we go.", ["So yes then \u2014", "we go."], mode="word")


def test_word_mode_sentence_before_min_words_wins() -> None:
    assert_stream("Hi. How are you doing today?", ["Hi.", "How are you doing today?"], mode="word")


@pytest.mark.parametrize(("low", "high"), [(3, 3), (3, 5), (4, 4), (2, 6)])
def test_word_mode_limits_are_configurable(low: int, high: int) -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    out = chunks(list(text), "word", first_words_min=low, first_words_max=high)
    assert len(out[0].split()) == high
    assert " ".join(out) == text
    text = "alpha beta gamma; delta epsilon zeta eta theta"
    out = chunks([text], "word", first_words_min=low, first_words_max=high)
    assert len(out[0].split()) == (3 if low <= 3 <= high else high)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Chunker("words")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Chunker(max_chars=5)
    with pytest.raises(ValueError):
        Chunker(first_words_min=5, first_words_max=3)


# -- properties ----------------------------------------------------------------

FRAGMENTS = [
    "hello", "world", "The", "Apple", "it", "I", "Dr.", "Mr.", "Mrs.", "St.", "e.g.", "i.e.",
    "etc.", "a.m.", "U.S.", "J.", "R.", "vs.", "3.5", "v2.0.1", "1.", "42", "2020.", "$5",
    ".", "!", "?", "...", "\u2026", ",", ";", ":", "\u2014", "-", '"', "'", "(", ")",
    "\u201c", "\u201d", "**", "*", "_", "`", "~~", "# ", "- ", "> ", "---", "snake_case",
    "https://example.com/a.b?x=1", "me@ex.com", "Hello.", "World!", "why?", '"Stop."',
]  # fmt: skip
SEPARATORS = [" ", " ", " ", " ", "", "\n", "\n\n", "  ", "\n- ", "\n1. "]

texts = st.lists(
    st.tuples(st.sampled_from(FRAGMENTS), st.sampled_from(SEPARATORS)), max_size=80
).map(lambda parts: "".join(f + s for f, s in parts))
any_texts = st.text(alphabet=st.sampled_from(list("aZ9 .!?\n\t*_`#-\"')(,;:\u2026")), max_size=300)
settings_kw: dict[str, Any] = {
    "mode": st.sampled_from(["sentence", "word"]),
    "max_chars": st.sampled_from([10, 20, 40, 200]),
}


def split_points(data: st.DataObject, text: str) -> list[str]:
    if len(text) < 2:
        return [text]
    cuts = data.draw(st.sets(st.integers(1, len(text) - 1), max_size=30))
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def check_chunks(text: str, out: list[str], max_chars: int) -> None:
    # no loss, no duplication: joined chunks are the stripped text, whitespace normalised
    assert " ".join(out) == normalize(strip_markdown(text))
    # and only markdown markers are ever removed, nothing else
    assert MARKERS_AND_SPACE.sub("", "".join(out)) == MARKERS_AND_SPACE.sub("", text)
    for chunk in out:
        assert chunk and chunk == normalize(chunk)
        # over the cap only when no cut point exists: a first word longer than the cap
        first_alnum = next((i for i, ch in enumerate(chunk) if ch.isalnum()), len(chunk))
        assert len(chunk) <= max_chars or " " not in chunk[first_alnum:]


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(texts, any_texts), data=st.data(), **settings_kw)
def test_token_boundaries_never_change_the_chunks(
    text: str, data: st.DataObject, mode: Any, max_chars: int
) -> None:
    whole = chunks([text], mode, max_chars=max_chars)
    assert chunks(split_points(data, text), mode, max_chars=max_chars) == whole
    assert chunks(list(text), mode, max_chars=max_chars) == whole
    check_chunks(text, whole, max_chars)


@settings(max_examples=300, deadline=None)
@given(text=texts, **settings_kw)
def test_no_text_lost_or_duplicated(text: str, mode: Any, max_chars: int) -> None:
    check_chunks(text, chunks(list(text), mode, max_chars=max_chars), max_chars)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_word_mode_first_chunk_has_at_most_max_words(text: str) -> None:
    out = chunks([text], "word")
    if out:
        assert sum(1 for w in out[0].split() if any(c.isalnum() for c in w)) <= 5


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1, max_size=40))
def test_plain_text_is_only_whitespace_normalised(words: list[str]) -> None:
    text = " ".join(words)
    out = chunks(list(text), "word")
    assert " ".join(out) == text
    assert len(out[0].split()) == min(5, len(words))


def test_ends_sentence_tells_a_mid_sentence_chunk() -> None:
    # What the TTS stage tightens joins by: word mode's first words do not end one.
    first, rest = chunks(["Sure, I can help you with that. Anything else?"], "word")[:2]
    assert (first, ends_sentence(first)) == ("Sure, I can help you", False)
    assert ends_sentence(rest)
    assert ends_sentence('He said "Stop."') and ends_sentence("Really?! ")
    assert not ends_sentence("Here are three ideas:") and not ends_sentence("")

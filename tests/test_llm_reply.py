"""Fast tier: the reply policy (``workers.llm.reply.speak``) around a scripted backend
that streams, fails, hangs or breaks off, in memory. The same faults through a real
HTTP endpoint and a worker process are ``test_llm_worker.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from workers.backends.llm import ChatMessage, LlmError
from workers.config import LlmConfig
from workers.llm.reply import ReplyStats, Spoken, speak
from workers.llm.resume import Said
from workers.text.chunking import Chunker

CFG = LlmConfig(timeout=0.3, chunking="sentence", apology="Sorry, say again?")


class Scripted:
    """Each request plays the next script: a list of deltas, with ``LlmError`` raised
    where an exception stands and a hang where ``...`` stands."""

    name = "scripted"

    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = list(scripts)
        self.requests = 0

    async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                     temperature: float) -> AsyncIterator[str]:
        script = self.scripts[self.requests]
        self.requests += 1
        for step in script:
            if step is ...:
                await asyncio.sleep(30)
            elif isinstance(step, Exception):
                raise step
            else:
                yield step


async def said(backend: Scripted, cancel: asyncio.Event | None = None) -> tuple[
        list[Spoken], ReplyStats]:
    turn = ReplyStats()
    event = cancel or asyncio.Event()
    out = [s async for s in speak(backend, CFG, [{"role": "user", "content": "hi"}],
                                  lambda: Chunker("sentence"), event, event.is_set, turn)]
    return out, turn


async def test_a_reply_is_spoken_sentence_by_sentence_and_the_last_ends_it() -> None:
    spoken, turn = await said(Scripted(["Hello ", "there. ", "How are", " you?"]))
    assert [(s.seq, s.text, s.last) for s in spoken] == [
        (0, "Hello there.", False), (1, "How are you?", True)]
    assert spoken[0].ttft_ms is not None and turn.outcome == "ok" and turn.attempts == 1


async def test_an_error_before_anything_was_said_is_retried_once() -> None:
    backend = Scripted([LlmError("503")], ["Fine."])
    spoken, turn = await said(backend)
    assert [s.text for s in spoken] == ["Fine."] and backend.requests == 2
    again = Scripted([LlmError("503")], [LlmError("503")])
    spoken, turn = await said(again)
    assert [(s.text, s.last) for s in spoken] == [("Sorry, say again?", True)]
    assert turn.outcome == "apology" and again.requests == 2


async def test_no_first_token_in_time_is_the_apology_without_a_retry() -> None:
    backend = Scripted([...])
    spoken, turn = await said(backend)
    assert [s.text for s in spoken] == ["Sorry, say again?"] and backend.requests == 1
    assert turn.outcome == "apology"


async def test_a_break_after_a_sentence_keeps_it_and_ends_the_reply() -> None:
    backend = Scripted(["It is noon. ", "And the", LlmError("connection reset")])
    spoken, turn = await said(backend)
    assert [(s.text, s.last) for s in spoken] == [("It is noon.", False), ("And the", True)]
    assert turn.outcome == "broken" and backend.requests == 1
    # (A sentence is spoken once the next words show it ended.) A stall after it: the
    # same, with what was buffered as the last chunk.
    stalled = Scripted(["It is noon. ", "Then ", ...])
    spoken, turn = await said(stalled)
    assert [(s.text, s.last) for s in spoken] == [("It is noon.", False), ("Then", True)]
    assert turn.outcome == "broken"


async def test_an_empty_reply_is_a_failure_not_silence() -> None:
    spoken, _ = await said(Scripted([], []))
    assert [s.text for s in spoken] == ["Sorry, say again?"]


async def test_a_cancel_closes_the_stream_and_says_nothing_more() -> None:
    cancel = asyncio.Event()
    backend = Scripted(["One. ", "Two ", ...])

    async def barge_in() -> None:
        await asyncio.sleep(0.1)
        cancel.set()

    task = asyncio.create_task(barge_in())
    spoken, turn = await said(backend, cancel)
    await task
    assert [s.text for s in spoken] == ["One."] and turn.outcome == "cancelled"


def test_a_reply_asked_again_is_checked_chunk_by_chunk_against_what_was_said() -> None:
    said = Said(("It is noon.", "And sunny."))
    assert said.matches(0, "It is  noon.", last=False)  # spacing aside, the same
    assert not said.matches(1, "And cloudy.", last=False)
    assert not said.matches(1, "And sunny.", last=True)  # ends sooner than the one said
    assert said.matches(2, "Anything new.", last=True)  # past what was said: goes on
    ended = Said(("It is noon.",), ended=True)
    assert ended.matches(0, "It is noon.", last=True)
    assert Said().matches(0, "Fresh.", last=True)

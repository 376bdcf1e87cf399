"""Fast tier: the TTS stage's handler on a list of text chunks, in memory (no Redis, no
processes), with the real Piper voice. The same behaviour through a real redis-server
and a worker process is ``test_tts_worker.py``."""

from __future__ import annotations

import pytest

from schemas import AudioChunk, Event, TextChunk
from tests.support.handlers import MemoryCancels, run_handler
from tests.test_tts_worker import RATE, TRACEPARENT, check_complete
from workers.backends.audio import level_db, pcm16_to_float
from workers.config import Config
from workers.runtime import Emit, JobStage
from workers.runtime.keys import Keys
from workers.tts_worker import build


@pytest.fixture(scope="module")
def stage() -> JobStage:
    return build(Config())


def chunks(texts: list[str], session: str = "s1", turn: str = "t1") -> list[Event]:
    return [TextChunk(session_id=session, turn_id=turn, seq=seq, text=text,
                      last=seq == len(texts) - 1, traceparent=TRACEPARENT)
            for seq, text in enumerate(texts)]


async def test_a_reply_becomes_ordered_parts_on_the_sessions_out_stream(stage: JobStage) -> None:
    texts = ["Hello there, how are you today?", "The weather in Paris is sunny.", ""]
    emits = await run_handler(stage.handle, chunks(texts))
    assert {e.stream for e in emits} == {Keys().out("s1")}
    parts = [e.event for e in emits]
    assert all(isinstance(p, AudioChunk) for p in parts)
    audio = [p for p in parts if isinstance(p, AudioChunk)]
    check_complete(audio, texts)  # yielded in play order already
    assert audio[-1].pcm == b"" and audio[-1].seq == 2
    assert level_db(pcm16_to_float(b"".join(a.pcm for a in audio))) > -35
    assert len(b"".join(a.pcm for a in audio)) / 2 / RATE > 2.0  # two sentences of speech


async def test_a_cancel_mid_chunk_stops_its_audio(stage: JobStage) -> None:
    sentence = "This sentence is one of many in a reply that goes on for quite a while."
    async def barge_in(out: list[Emit], cancels: MemoryCancels) -> None:
        if len(out) == 1:
            await cancels.cancel("s1", "t1", "barge-in")

    emits = await run_handler(stage.handle, chunks([" ".join([sentence] * 6)]),
                              on_emit=barge_in)
    parts = [e.event for e in emits if isinstance(e.event, AudioChunk)]
    assert len(parts) == 1  # nothing after the cancel
    assert not parts[0].final_part and not parts[0].last


async def test_events_that_are_not_text_are_ignored(stage: JobStage) -> None:
    from schemas import SessionEnded

    assert await run_handler(stage.handle, [SessionEnded(session_id="s1")]) == []

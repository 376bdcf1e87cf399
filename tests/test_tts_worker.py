"""The TTS stage as an operator runs it: ``python -m voicebus worker tts`` (the real Piper
voice, the real espeak-ng) against a real redis-server, fed text chunks as the LLM stage
writes them; what it says is checked by the real tiny.en ASR.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from schemas import AudioChunk, TextChunk
from tests.busutil import cancel_turn, pending, publish, read_all
from tests.conftest import WorkerProcs, wait_for
from tests.test_tts import corrupt_voice
from tests.transcripts import wer
from workers.backends.asr import FasterWhisperRecognizer
from workers.backends.audio import level_db, pcm16_to_float
from workers.backends.model_files import resolve_model
from workers.runtime.keys import Keys

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
RATE = 24_000


@pytest.fixture(scope="module")
def tiny() -> Iterator[FasterWhisperRecognizer]:
    model = resolve_model("tiny.en")
    yield FasterWhisperRecognizer(model.path, device="cpu", compute_type="int8", cpu_threads=2)


def say(r: redis.Redis, keys: Keys, session: str, texts: list[str], turn: str = "t1") -> None:
    """Publish a reply's text chunks to the TTS queue; the last one ends the reply."""
    for seq, text in enumerate(texts):
        publish(r, keys.queue("tts"), TextChunk(
            session_id=session, turn_id=turn, seq=seq, text=text, last=seq == len(texts) - 1,
            traceparent=TRACEPARENT))


def audio(r: redis.Redis, keys: Keys, session: str) -> list[AudioChunk]:
    return [e for e in read_all(r, keys.out(session)) if isinstance(e, AudioChunk)]


def whole_reply(r: redis.Redis, keys: Keys, session: str, chunks: int,
                timeout: float = 20) -> list[AudioChunk]:
    """The session's audio once every text chunk has its final part, in play order."""
    def done() -> list[AudioChunk] | None:
        got = audio(r, keys, session)
        return got if sum(a.final_part for a in got) >= chunks else None

    found: list[AudioChunk] = wait_for(done, timeout=timeout, what="every final part")
    return sorted(found, key=lambda a: (a.seq, a.part))


def check_complete(parts: list[AudioChunk], texts: list[str]) -> None:
    """Every text chunk's parts are 0..k, final on k only; one ``last``, at the end."""
    for seq, text in enumerate(texts):
        mine = [a for a in parts if a.seq == seq]
        assert [a.part for a in mine] == list(range(len(mine))), seq
        assert [a.final_part for a in mine] == [False] * (len(mine) - 1) + [True], seq
        assert [a.text for a in mine] == [text] + [""] * (len(mine) - 1), seq
    assert [a.last for a in parts] == [False] * (len(parts) - 1) + [True]
    assert all(a.sample_rate == RATE and a.traceparent == TRACEPARENT for a in parts)
    assert all(len(a.pcm) <= 2 * RATE for a in parts)  # tts.chunk_size 25: 1 s at most


def test_a_reply_becomes_ordered_speech(workers: WorkerProcs, sync_redis: redis.Redis,
                                        tiny: FasterWhisperRecognizer) -> None:
    workers.start_cli("tts")
    keys, session = Keys(workers.prefix), f"s{uuid.uuid4().hex[:8]}"
    texts = ["Hello there, how are you today?", "The weather in Paris is sunny today.", ""]
    say(sync_redis, keys, session, texts)
    parts = whole_reply(sync_redis, keys, session, len(texts))
    check_complete(parts, texts)
    assert parts[-1].pcm == b"" and parts[-1].seq == 2  # the empty end of the reply
    pcm = b"".join(a.pcm for a in parts)
    assert level_db(pcm16_to_float(pcm)) > -35
    heard = tiny.transcribe(pcm, RATE).text
    assert wer(" ".join(texts), heard) <= 0.35, heard
    wait_for(lambda: not pending(sync_redis, keys.queue("tts"), "tts"), what="the acks")
    logs = workers.logs()
    assert "TTS ready" in logs and "seq 1: first audio" in logs and "piper: ok" in logs


def test_a_broken_voice_is_replaced_by_espeak(workers: WorkerProcs, sync_redis: redis.Redis,
                                              tmp_path: Path) -> None:
    workers.start_cli("tts", VOICEBUS_TTS__VOICE=str(corrupt_voice(tmp_path)))
    keys, session = Keys(workers.prefix), f"s{uuid.uuid4().hex[:8]}"
    texts = ["Go forward ten meters."]
    say(sync_redis, keys, session, texts)
    parts = whole_reply(sync_redis, keys, session, 1)
    check_complete(parts, texts)
    assert level_db(pcm16_to_float(b"".join(a.pcm for a in parts))) > -35
    logs = workers.logs()
    assert "WARNING" in logs and "piper failed to load" in logs and "INVALID_PROTOBUF" in logs
    assert "espeak: ok" in logs


def test_cancelling_the_turn_stops_its_audio(workers: WorkerProcs, redis_url: str,
                                             sync_redis: redis.Redis) -> None:
    workers.start_cli("tts", VOICEBUS_TTS__CHUNK_SIZE="5")  # 200 ms parts
    keys, session = Keys(workers.prefix), f"s{uuid.uuid4().hex[:8]}"
    sentence = "This sentence is one of many in a reply that goes on for quite a while."
    say(sync_redis, keys, session, [" ".join([sentence] * 20)])  # ~1.5 s of synthesis
    wait_for(lambda: audio(sync_redis, keys, session), what="the first audio")
    cancel_turn(redis_url, keys, session, "t1", "barge-in")
    wait_for(lambda: ": cancelled" in workers.logs(), what="the worker to see the cancel")
    heard = len(audio(sync_redis, keys, session))
    time.sleep(0.5)
    got = audio(sync_redis, keys, session)
    assert len(got) == heard  # nothing after the cancel
    assert not any(a.final_part or a.last for a in got)  # it stopped before the end
    wait_for(lambda: not pending(sync_redis, keys.queue("tts"), "tts"), what="the ack")

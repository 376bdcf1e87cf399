"""The ASR stage as an operator runs it: ``python -m voicebus worker asr`` (real tiny.en)
against a real redis-server, fed TurnEnded events of real speech.

One worker process serves the whole module (loading the model costs ~1.5 s); every
test uses its own session ids.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis

from schemas import Transcript, TurnEnded
from tests.busutil import cancel_turn, dead_letters, pending, publish, read_all
from tests.conftest import ROOT, wait_for
from tests.test_asr import MAX_WER, long_utterance, manifest, read_pcm, resampled, wer, words
from workers.asr_worker import NOTHING_HEARD
from workers.runtime.keys import Keys

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class AsrWorker:
    url: str
    keys: Keys
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def transcriptions(self, turn_id: str) -> int:
        """How many times the worker ran the model for this turn (its log says so)."""
        return sum(1 for line in self.log().splitlines()
                   if f"turn={turn_id} " in line and " transcribed " in line)


@pytest.fixture(scope="module")
def asr(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsrWorker]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    log_path = tmp_path_factory.mktemp("asr") / "asr-worker.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": redis_url,
           "VOICEBUS_REDIS__KEY_PREFIX": prefix, "VOICEBUS_REDIS__BLOCK_MS": "200",
           "VOICEBUS_WORKER__JANITOR_INTERVAL_S": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "voicebus", "worker", "asr"], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: b"started (group" in log_path.read_bytes() or proc.poll() is not None,
                 timeout=120, what="the ASR worker to start")
        assert proc.poll() is None, log_path.read_text()
        yield AsrWorker(redis_url, Keys(prefix), proc, log_path)
        assert proc.poll() is None, "the ASR worker died:\n" + log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def turn_ended(session: str, turn: str, pcm: bytes, rate: int = 16000, *,
               speculative: bool = False, end_ms: int | None = None,
               audio_ref: str = "") -> TurnEnded:
    end = len(pcm) * 1000 // (2 * rate) if end_ms is None else end_ms
    return TurnEnded(session_id=session, turn_id=turn, sample_rate=rate, audio=pcm,
                     audio_ref=audio_ref, speech_start_ms=0, speech_end_ms=end,
                     decided_ms=end + 200, rule="test", speculative=speculative,
                     traceparent=TRACEPARENT)


def transcripts(r: redis.Redis, stream: str, session: str, count: int,
                timeout: float = 30) -> list[Transcript]:
    """The session's events on ``stream`` (the LLM queue is shared), once there are ``count``."""
    def ours() -> list[Transcript]:
        return [e for e in read_all(r, stream) if e.session_id == session]  # type: ignore[misc]

    found: list[Transcript] = wait_for(lambda: (e := ours()) and len(e) >= count and e,
                                       timeout=timeout, what=f"{count} events on {stream}")
    assert all(isinstance(e, Transcript) for e in found)
    return found


def by_turn(events: list[Transcript]) -> dict[str, Transcript]:
    return {e.turn_id: e for e in events}


def test_samples_become_final_transcripts_on_out_and_llm(asr: AsrWorker,
                                                         sync_redis: redis.Redis) -> None:
    queue = asr.keys.queue("asr")
    names = sorted(manifest())
    for i, name in enumerate(names):
        publish(sync_redis, queue, turn_ended("samples", f"t{i}", read_pcm(name)))
    out = by_turn(transcripts(sync_redis, asr.keys.out("samples"), "samples", 3))
    to_llm = by_turn(transcripts(sync_redis, asr.keys.queue("llm"), "samples", 3))
    assert out == to_llm
    for i, name in enumerate(names):
        t = out[f"t{i}"]
        assert t.final and not t.failed and t.error == "" and t.language == "en"
        assert wer(manifest()[name], t.text) <= MAX_WER, (name, t.text)
        assert t.traceparent == TRACEPARENT
    wait_for(lambda: not pending(sync_redis, queue, "asr"), what="the jobs to be acked")


def test_bad_and_odd_input_never_kills_the_worker(asr: AsrWorker,
                                                  sync_redis: redis.Redis) -> None:
    s = "odd"
    goforward = read_pcm("cmu_goforward.wav")
    loud = np.frombuffer(goforward, dtype="<i2").astype(np.float32) * 30
    clipped = np.clip(loud, -32768, 32767).astype("<i2").tobytes()
    ref = f"{asr.keys.prefix}:{{{s}}}:audio-ref-test"
    sync_redis.set(ref, goforward, ex=60)
    cases = {
        "empty": turn_ended(s, "empty", b""),
        "lost-ref": turn_ended(s, "lost-ref", b"", audio_ref=f"{ref}-gone"),
        "by-ref": turn_ended(s, "by-ref", b"", audio_ref=ref, end_ms=2786),
        "silence": turn_ended(s, "silence", b"\0\0" * 32000),
        "clipped": turn_ended(s, "clipped", clipped),
        "8k": turn_ended(s, "8k", resampled(goforward, 8000), 8000),
        "44k": turn_ended(s, "44k", resampled(goforward, 44100), 44100),
        "60s": turn_ended(s, "60s", long_utterance(60.0)),
    }
    for event in cases.values():
        publish(sync_redis, asr.keys.queue("asr"), event)
    out = by_turn(transcripts(sync_redis, asr.keys.out(s), s, len(cases), timeout=60))
    assert by_turn(transcripts(sync_redis, asr.keys.queue("llm"), s, len(cases))) == out

    for turn, error in [("empty", "bad audio: empty utterance: 0 samples"),
                        ("lost-ref", "does not exist"), ("silence", NOTHING_HEARD)]:
        assert out[turn].failed and out[turn].final and out[turn].text == "", out[turn]
        assert error in out[turn].error
        assert out[turn].traceparent == TRACEPARENT
    for turn in ("by-ref", "clipped", "8k", "44k"):
        assert not out[turn].failed, out[turn]
        assert wer("Go forward ten meters.", out[turn].text) <= MAX_WER, out[turn]
    long_words = words(out["60s"].text)
    assert all(long_words.count(w) >= 3 for w in ("forward", "sharply", "young")), long_words
    assert dead_letters(sync_redis, asr.keys) == []
    assert asr.proc.poll() is None


def test_speculative_then_final_transcribes_once(asr: AsrWorker,
                                                 sync_redis: redis.Redis) -> None:
    s, queue = "spec", asr.keys.queue("asr")
    pcm = read_pcm("cmu_arctic_slt_a0009.wav")
    key = asr.keys.asr_result(s, "later", 2880)

    # 1. The final comes after the speculative result is parked: it is reused.
    publish(sync_redis, queue, turn_ended(s, "later", pcm, speculative=True, end_ms=2880))
    wait_for(lambda: (v := sync_redis.get(key)) is not None and v != b"pending",
             what="the speculative result to be parked")
    assert 0 < sync_redis.ttl(key) <= 30
    assert read_all(sync_redis, asr.keys.out(s)) == []  # nothing goes downstream for a guess
    publish(sync_redis, queue, turn_ended(s, "later", pcm, end_ms=2880))
    # 2. The final comes while the speculative transcription still runs: it waits for it.
    publish(sync_redis, queue, turn_ended(s, "racing", pcm, speculative=True, end_ms=2880))
    publish(sync_redis, queue, turn_ended(s, "racing", pcm, end_ms=2880))
    # 3. The final comes first: a late speculative guess is not computed.
    publish(sync_redis, queue, turn_ended(s, "late-guess", pcm, end_ms=2880))
    publish(sync_redis, queue, turn_ended(s, "late-guess", pcm, speculative=True, end_ms=2880))
    # 4. The user went on after the pause: the final (later speech end) is transcribed anew.
    publish(sync_redis, queue, turn_ended(s, "went-on", pcm[:40000], speculative=True))
    publish(sync_redis, queue, turn_ended(s, "went-on", pcm, end_ms=2880))

    transcripts(sync_redis, asr.keys.out(s), s, 4)
    wait_for(lambda: not pending(sync_redis, queue, "asr"), what="every job acked")
    time.sleep(0.3)  # room for a duplicate to show up, if there were one
    out = read_all(sync_redis, asr.keys.out(s))
    assert sorted(t.turn_id for t in out) == ["late-guess", "later", "racing", "went-on"]
    for t in out:
        assert not t.failed and wer(manifest()["cmu_arctic_slt_a0009.wav"], t.text) <= MAX_WER
    counts = {turn: asr.transcriptions(turn)
              for turn in ("later", "racing", "late-guess", "went-on")}
    assert counts == {"later": 1, "racing": 1, "late-guess": 1, "went-on": 2}, asr.log()
    assert any("turn=later " in line and "used the speculative transcript" in line
               for line in asr.log().splitlines())


def test_a_turn_cancelled_during_asr_gets_no_transcript(asr: AsrWorker,
                                                        sync_redis: redis.Redis) -> None:
    s, queue = "cancel", asr.keys.queue("asr")
    job = turn_ended(s, "barged", long_utterance(60.0))
    publish(sync_redis, queue, job)
    # The worker's claim on the transcript: it is transcribing (a job only read, not yet
    # started, would be skipped as cancelled, not dropped during ASR).
    claim = asr.keys.asr_result(s, "barged", job.speech_end_ms)
    wait_for(lambda: sync_redis.exists(claim), what="the transcription to start")
    cancel_turn(asr.url, asr.keys, s, "barged", "barge-in")
    wait_for(lambda: "turn=barged turn cancelled during ASR" in asr.log(), timeout=30,
             what="the worker to drop the turn")
    wait_for(lambda: not pending(sync_redis, queue, "asr"), what="the job acked")
    assert read_all(sync_redis, asr.keys.out(s)) == []
    assert all(e.session_id != s for e in read_all(sync_redis, asr.keys.queue("llm")))

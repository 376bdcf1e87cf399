"""VAD and ASR together, scaled out: real processes, real models, real Redis."""

from __future__ import annotations

import re

import pytest

from schemas import Transcript
from tests.audio import ARCTIC, GO_FORWARD, LIBRIVOX, join, silence, speech
from tests.busutil import read_all
from tests.conftest import wait_for
from tests.test_vad_worker import stream_session
from tests.transcripts import wer
from workers.runtime.keys import Keys

N_SESSIONS = int(__import__("os").environ.get("TEST_SESSIONS", "20"))
WORDS = {GO_FORWARD: "go forward ten meters",
         ARCTIC: "he turned sharply and faced gregson across the table",
         LIBRIVOX: "he was not an ill disposed young man"}


def similar(heard: str, said: str) -> bool:
    """Most of the words said were heard (tiny.en may miss a name or two)."""
    return wer(said, heard) <= 0.3


@pytest.mark.timeout(400)
def test_20_sessions_through_2_vad_and_2_asr_workers(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    # The audio is sent faster than real time, so the second turn starts before the
    # first could have been answered; barge-in would (rightly) cancel the first.
    for stage in ("vad", "vad", "asr", "asr"):
        workers.start_cli(stage, VOICEBUS_VAD__BARGE_IN="false")
    names = [GO_FORWARD, ARCTIC, LIBRIVOX]
    plan = {}
    for i in range(N_SESSIONS):
        first, second = names[i % 3], names[(i + 1) % 3]
        plan[f"s{i:02d}"] = (first, second)
        audio = join(silence(0.5, seed=i), speech(first), silence(2.0), speech(second),
                     silence(2.0))
        stream_session(sync_redis, keys, f"s{i:02d}", audio, user=f"user{i:02d}")

    def transcripts(sid: str) -> list[Transcript]:
        return [e for e in read_all(sync_redis, keys.out(sid))
                if isinstance(e, Transcript) and e.final]

    wait_for(lambda: all(len(transcripts(s)) >= 2 for s in plan), timeout=300, interval=1.0,
             what="two transcripts per session")
    for sid, (first, second) in plan.items():
        got = transcripts(sid)
        assert len(got) == 2, (sid, got)  # each turn transcribed once
        assert not any(t.failed for t in got)
        assert similar(got[0].text, WORDS[first]), (sid, got[0].text)  # in order
        assert similar(got[1].text, WORDS[second]), (sid, got[1].text)
        assert got[0].turn_id != got[1].turn_id
        # The token's user travels with the turn, for the LLM stage's memory.
        assert {t.user_id for t in got} == {f"user{sid[1:]}"}
    logs = workers.logs()
    # Both workers of each stage did some of the work.
    vad_owners = set(re.findall(r"(vad-\S+): owns session", logs))
    assert len(vad_owners) == 2, vad_owners

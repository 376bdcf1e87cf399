"""The VAD stage as an operator runs it (`voicebus worker vad`), through a real Redis."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import redis

from schemas import (
    AudioFrame,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TurnCancelled,
    TurnEnded,
    encode,
)
from tests.audio import ARCTIC, GO_FORWARD, RATE, join, pcm, silence, speech
from tests.busutil import dead_letters, publish, read_all
from tests.conftest import wait_for
from workers.backends.audio import resample
from workers.runtime.bus import FIELD
from workers.runtime.keys import Keys


def stream_session(r: redis.Redis, keys: Keys, sid: str, audio: np.ndarray, rate: int = RATE,
                   frame_ms: int = 20, end: bool = True, user: str = "u",
                   announce: bool = True, first_seq: int = 0) -> None:
    """Announce a session and send its audio as frames (decisions are in audio time,
    so sending faster than real time changes nothing)."""
    if announce:
        publish(r, keys.sessions(),
                SessionStarted(session_id=sid, user_id=user, sample_rate=rate))
    data = pcm(resample(audio, RATE, rate))
    step = rate * frame_ms // 1000 * 2
    pipe = r.pipeline(transaction=False)
    for seq, offset in enumerate(range(0, len(data), step), first_seq):
        pipe.xadd(keys.audio(sid), {FIELD: encode(AudioFrame(  # offset_ms: as the gateway
            session_id=sid, seq=seq, sample_rate=rate, pcm=data[offset:offset + step],
            offset_ms=seq * step * 500 // rate))})
    if end:
        pipe.xadd(keys.audio(sid), {FIELD: encode(SessionEnded(session_id=sid))})
    pipe.execute()


def final_turns(r: redis.Redis, keys: Keys) -> list[TurnEnded]:
    return [e for e in read_all(r, keys.queue("asr"))
            if isinstance(e, TurnEnded) and not e.speculative]


def test_a_spoken_command_becomes_a_turn(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start_cli("vad")
    stream_session(sync_redis, keys, "s1", join(silence(1.0), speech(GO_FORWARD), silence(2.0)))
    [turn] = wait_for(lambda: final_turns(sync_redis, keys), what="turn ended")
    assert turn.rule == "smart_turn" and turn.probability and turn.probability >= 0.7
    assert abs(turn.speech_start_ms - 1500) < 150 and abs(turn.speech_end_ms - 3360) < 150
    assert 150 <= turn.decided_ms - turn.speech_end_ms <= 300  # decided ~0.2 s after speech
    assert turn.sample_rate == RATE and len(turn.audio) >= (3360 - 1500) * 32  # the utterance

    # No ASR runs here, so the end is tentative, and committed later (text_wait, or at the
    # end of the session, whichever comes first): both records go to the out stream.
    out = wait_for(lambda: (e := read_all(sync_redis, keys.out("s1"))) and len(e) >= 4 and e,
                   what="out events")
    assert [type(e) for e in out] == [SpeechStarted, SpeechStopped, TurnEnded, TurnEnded]
    assert len({e.turn_id for e in out}) == 1 and out[0].turn_id == turn.turn_id
    assert out[2].audio == b"" and out[2].rule == "smart_turn"  # the decision record
    assert out[2].tentative and not out[3].tentative  # ...and its commit
    wait_for(lambda: "ended by smart_turn" in workers.logs(), what="the decision logged")


def test_a_frame_sent_twice_is_heard_once(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    # The gateway retries a publish through a Redis outage: a frame that had arrived is
    # sent again. Heard twice, it would shift the audio clock and the turn's audio.
    keys = Keys(prefix)
    workers.start_cli("vad")
    publish(sync_redis, keys.sessions(), SessionStarted(session_id="s1", user_id="u",
                                                        sample_rate=RATE))
    data = pcm(join(silence(1.0), speech(GO_FORWARD), silence(2.0)))
    step = RATE * 20 // 1000 * 2
    for seq, offset in enumerate(range(0, len(data), step)):
        frame = encode(AudioFrame(session_id="s1", seq=seq, sample_rate=RATE,
                                  pcm=data[offset:offset + step]))
        for _ in range(2 if seq % 3 == 0 else 1):
            sync_redis.xadd(keys.audio("s1"), {FIELD: frame})
    publish(sync_redis, keys.audio("s1"), SessionEnded(session_id="s1"))
    [turn] = wait_for(lambda: final_turns(sync_redis, keys), what="turn ended")
    assert abs(turn.speech_start_ms - 1500) < 150 and abs(turn.speech_end_ms - 3360) < 150
    assert len(turn.audio) < (3360 - 1500 + 600) * 32  # the utterance, not a third more


def test_a_vad_killed_mid_utterance_loses_no_turn(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """The frames of a turn in progress stay pending: the peer that takes the session
    over replays them and ends the whole utterance as one turn."""
    keys = Keys(prefix)
    first = workers.start_cli("vad")
    audio = join(silence(1.0), speech(GO_FORWARD), silence(2.0))
    cut = 95 * 320  # 1.9 s: the middle of the utterance (1.5-3.36 s), on a frame edge
    stream_session(sync_redis, keys, "s1", audio[:cut], end=False)
    wait_for(lambda: any(isinstance(e, SpeechStarted)
                         for e in read_all(sync_redis, keys.out("s1"))), what="speech started")
    time.sleep(0.3)  # the frames sent are handled (acked, before the fix)
    first.send_signal(signal.SIGKILL)
    first.wait()
    workers.start_cli("vad")
    stream_session(sync_redis, keys, "s1", audio[cut:], announce=False, first_seq=95)
    [turn] = wait_for(lambda: final_turns(sync_redis, keys), timeout=30, what="the turn")
    # The whole utterance (1.86 s of speech), not the half heard after the kill.
    assert len(turn.audio) // 32 >= 1700, len(turn.audio) // 32
    assert "owns session s1 (took over" in workers.logs()
    # ... as the turn the device saw start (it would wait forever for another's end),
    # on the session's clock.
    out = read_all(sync_redis, keys.out("s1"))
    started = [e for e in out if isinstance(e, SpeechStarted)]
    ended = {e.turn_id for e in out if isinstance(e, TurnEnded)}  # tentative, or the commit
    assert [e.turn_id for e in started] == [turn.turn_id] and ended == {turn.turn_id}
    assert 1300 <= turn.speech_start_ms <= 1700 and 3200 <= turn.speech_end_ms <= 3600, turn


def test_two_sentences_are_two_turns_in_order(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    # Without continuation: with it, the second sentence would continue the first (no
    # reply was heard in between; see the next test).
    workers.start_cli("vad", VOICEBUS_VAD__CONTINUATION__ENABLED="false")
    audio = join(silence(0.5), speech(GO_FORWARD), silence(2.0), speech(ARCTIC), silence(2.0))
    stream_session(sync_redis, keys, "s1", audio)
    turns = wait_for(lambda: (t := final_turns(sync_redis, keys)) and len(t) == 2 and t,
                     what="two turns")
    assert turns[0].speech_end_ms < turns[1].speech_start_ms
    assert turns[0].turn_id != turns[1].turn_id
    # Each turn starts its own trace; the turn's events all carry it.
    traces = [t.traceparent.split("-")[1] for t in turns]
    assert traces[0] != traces[1] and all(len(t) == 32 for t in traces)
    for turn in turns:
        started = [e for e in read_all(sync_redis, keys.out("s1"))
                   if isinstance(e, SpeechStarted) and e.turn_id == turn.turn_id]
        assert [e.traceparent for e in started] == [turn.traceparent]


def test_speech_before_any_reply_was_heard_continues_the_turn(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start_cli("vad")
    audio = join(silence(0.5), speech(GO_FORWARD), silence(1.0), speech(ARCTIC), silence(2.5))
    stream_session(sync_redis, keys, "s1", audio)
    first, whole = wait_for(lambda: (t := final_turns(sync_redis, keys)) and len(t) == 2 and t,
                            what="the cut turn and the turn that continues it")
    # The first sentence ended a turn; the user went on before hearing anything, so its
    # reply is dropped (cancelled as "continued") and the next turn covers both sentences,
    # from the first speech start, in the same trace, naming the turn it replaces.
    assert whole.continues == first.turn_id and whole.turn_id != first.turn_id
    assert whole.speech_start_ms == first.speech_start_ms
    assert whole.speech_end_ms > first.speech_end_ms + 1000
    assert len(whole.audio) > len(first.audio) + 2 * RATE * 2
    assert whole.traceparent == first.traceparent
    cancels = wait_for(lambda: [e for e in read_all(sync_redis, keys.control())
                                if isinstance(e, TurnCancelled)], what="the cancel")
    assert [(c.turn_id, c.reason) for c in cancels] == [(first.turn_id, "continued")]
    started = [e for e in read_all(sync_redis, keys.out("s1")) if isinstance(e, SpeechStarted)]
    assert [(e.turn_id, e.continues) for e in started] == [
        (first.turn_id, ""), (whole.turn_id, first.turn_id)]
    wait_for(lambda: sync_redis.get(keys.active_turn("s1")) == whole.turn_id.encode(),
             what="the whole turn is the live agent turn")


def test_speech_after_the_reply_was_heard_is_a_barge_in(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start_cli("vad")
    # The gateway marks the reply audible when it sends its first audio: long before the
    # user speaks again (frame times are their arrival, i.e. now).
    stream_session(sync_redis, keys, "s1", join(silence(0.5), speech(GO_FORWARD), silence(2.0)),
                   end=False)
    [first] = wait_for(lambda: final_turns(sync_redis, keys), what="the first turn")
    sync_redis.set(keys.audible("s1"), f"{first.turn_id} {time.time_ns() - 2_000_000_000}")
    stream_session(sync_redis, keys, "s1", join(speech(ARCTIC), silence(2.0)), announce=False,
                   first_seq=1000)
    turns = wait_for(lambda: (t := final_turns(sync_redis, keys)) and len(t) == 2 and t,
                     what="a second turn")
    assert turns[1].continues == "" and turns[1].speech_start_ms > first.speech_end_ms
    cancels = wait_for(lambda: [e for e in read_all(sync_redis, keys.control())
                                if isinstance(e, TurnCancelled)], what="the cancel")
    assert [(c.turn_id, c.reason) for c in cancels] == [(first.turn_id, "barge-in")]


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_input_rate_is_resampled(rate, workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start_cli("vad")
    stream_session(sync_redis, keys, "s1", join(silence(1.0), speech(GO_FORWARD), silence(2.0)),
                   rate=rate, frame_ms=30)
    [turn] = wait_for(lambda: final_turns(sync_redis, keys), what="turn")
    assert turn.sample_rate == RATE  # ASR always gets 16 kHz
    assert abs(turn.speech_start_ms - 1500) < 200 and abs(turn.speech_end_ms - 3360) < 200


def test_bad_and_odd_input_never_kills_the_worker(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    proc = workers.start_cli("vad")
    sid = "odd"
    publish(sync_redis, keys.sessions(), SessionStarted(session_id=sid, user_id="u",
                                                        sample_rate=RATE))
    square = np.sign(np.sin(np.arange(RATE) / RATE * 2 * np.pi * 200)).astype(np.float32)
    frames = [
        b"",  # an empty frame
        pcm(square),  # clipped, full-scale square wave
        pcm(np.full(4000, np.nan, dtype=np.float32)),  # NaNs from a device become silence
    ]
    for seq, data in enumerate(frames):
        publish(sync_redis, keys.audio(sid), AudioFrame(session_id=sid, seq=seq,
                                                        sample_rate=RATE, pcm=data))
    sync_redis.xadd(keys.audio(sid), {FIELD: b"\xc1 not an event"})  # undecodable
    # The device switches to 48 kHz mid-session, then says something.
    data48 = pcm(resample(join(silence(0.5), speech(GO_FORWARD), silence(2.0)), RATE, 48000))
    for i, offset in enumerate(range(0, len(data48), 2880)):
        publish(sync_redis, keys.audio(sid), AudioFrame(session_id=sid, seq=10 + i,
                                                        sample_rate=48000,
                                                        pcm=data48[offset:offset + 2880]))
    publish(sync_redis, keys.audio(sid), SessionEnded(session_id=sid))
    turns = wait_for(lambda: final_turns(sync_redis, keys), what="the real turn")
    assert turns[-1].rule in ("smart_turn", "smart_turn_probable", "silence_timeout")
    [dead] = dead_letters(sync_redis, keys)
    assert dead.stream == keys.audio(sid) and "undecodable" in dead.reason
    assert proc.poll() is None


def test_speech_during_an_agent_turn_cancels_it(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start_cli("vad")
    sync_redis.set(keys.active_turn("s1"), "agent-turn-1")  # the agent is answering
    stream_session(sync_redis, keys, "s1", join(silence(0.5), speech(GO_FORWARD), silence(2.0)))
    cancels = wait_for(lambda: [e for e in read_all(sync_redis, keys.control())
                                if isinstance(e, TurnCancelled)], what="barge-in cancel")
    assert [(c.session_id, c.turn_id, c.reason) for c in cancels] == [
        ("s1", "agent-turn-1", "barge-in")]
    assert sync_redis.hget(keys.cancelled("s1"), "agent-turn-1") == b"barge-in"
    # The new user turn becomes the live agent turn once it has ended.
    [turn] = wait_for(lambda: final_turns(sync_redis, keys), what="turn")
    wait_for(lambda: sync_redis.get(keys.active_turn("s1")) == turn.turn_id.encode(),
             what="active turn")


def test_noise_and_blips_produce_nothing(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    from tests.audio import blip, cough, noise_burst

    keys = Keys(prefix)
    workers.start_cli("vad")
    sync_redis.set(keys.active_turn("s1"), "agent-turn-1")
    audio = join(silence(1.0), noise_burst(0.5), silence(1.0), cough(), silence(1.0), blip(),
                 silence(2.0))
    stream_session(sync_redis, keys, "s1", audio)
    wait_for(lambda: not sync_redis.exists(keys.audio("s1")) or
             sync_redis.xlen(keys.audio("s1")) == 0 or
             "session s1 ended" in workers.logs(), what="session processed")
    assert final_turns(sync_redis, keys) == []
    assert read_all(sync_redis, keys.out("s1")) == []
    assert sync_redis.get(keys.active_turn("s1")) == b"agent-turn-1"  # no barge-in


def test_barge_in_can_be_turned_off(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start_cli("vad", VOICEBUS_VAD__BARGE_IN="false")
    sync_redis.set(keys.active_turn("s1"), "agent-turn-1")
    stream_session(sync_redis, keys, "s1", join(silence(0.5), speech(GO_FORWARD), silence(2.0)))
    wait_for(lambda: final_turns(sync_redis, keys), what="turn")
    assert not [e for e in read_all(sync_redis, keys.control()) if isinstance(e, TurnCancelled)]

"""Turn detection on real speech with the real models (Silero + Smart Turn, ONNX)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tests.audio import (
    ARCTIC,
    ARCTIC_COMMA_S,
    GO_FORWARD,
    LIBRIVOX,
    RATE,
    blip,
    cough,
    join,
    noise_burst,
    silence,
    speech,
    with_pause,
)
from workers.backends.silero import SileroModel
from workers.backends.smart_turn import SmartTurnModel
from workers.config import Config, VadConfig
from workers.vad.turn_detection import (
    Blip,
    Commit,
    NeedsTurnCheck,
    Resumed,
    SpeechStart,
    SpeechStop,
    TurnDetector,
    TurnEnd,
)


@pytest.fixture(scope="module")
def models() -> tuple[SileroModel, SmartTurnModel]:
    return SileroModel(), SmartTurnModel()


Transcribe = Callable[[TurnEnd], "str | None"]


def detect(audio: np.ndarray, models: tuple[SileroModel, SmartTurnModel],
           config: VadConfig | None = None, chunk: int = 512, *,
           transcribe: Transcribe | None = None, text_after_s: float = 0.3,
           continue_turns: bool = False, allowance_s: float = 0.0) -> list[object]:
    """Run the detector over audio in ``chunk``-sized pieces, answering its model checks.

    ``transcribe`` plays ASR: it gets each speculative TurnEnd and its answer reaches the
    detector ``text_after_s`` of audio later (as a transcript would, in real time). With
    ``continue_turns`` every speech start after an ended turn continues it (nothing was
    heard in between). ``allowance_s``: the user's learned pause allowance."""
    silero, smart = models
    detector = TurnDetector(config or Config().vad, silero.stream())
    detector.pause_allowance = int(allowance_s * RATE)
    actions: list[object] = []
    pending: list[object] = []
    texts: list[tuple[int, int, str | None]] = []  # (due at, speech end, text)
    def due_texts() -> None:
        for due, speech_end, text in [t for t in texts if t[0] <= detector.pos]:
            texts.remove((due, speech_end, text))
            pending.extend(detector.texted(speech_end, text))

    for i in range(0, audio.size - 511, 512):
        pending.extend(detector.push(audio[i:i + 512]))
        due_texts()
        while pending:
            action = pending.pop(0)
            due_texts()
            if isinstance(action, NeedsTurnCheck):
                pending.extend(detector.judged(smart.probability(action.audio)))
            elif isinstance(action, TurnEnd) and action.speculative and transcribe:
                texts.append((detector.pos + int(text_after_s * RATE), action.speech_end,
                              transcribe(action)))
            elif isinstance(action, SpeechStart) and continue_turns and detector.continuable:
                pending.extend(detector.continue_turn())
            actions.append(action)
    return actions + list(detector.flush())


def turns(actions: list[object]) -> list[TurnEnd]:
    return [a for a in actions if isinstance(a, TurnEnd) and not a.speculative]


@pytest.mark.parametrize("name", [GO_FORWARD, ARCTIC, LIBRIVOX])
def test_one_utterance_is_one_turn_with_speech_bounds_in_audio_time(name, models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), speech(name), silence(2.0)), models)
    [turn] = turns(actions)
    starts = [a for a in actions if isinstance(a, SpeechStart)]
    assert len(starts) == 1
    # Manifest bounds of the speech (+1 s of leading silence), within ~100 ms.
    bounds = {GO_FORWARD: (0.50, 2.36), ARCTIC: (0.21, 2.88), LIBRIVOX: (0.25, 2.77)}[name]
    assert abs(starts[0].at / RATE - (1.0 + bounds[0])) < 0.15
    assert abs(turn.speech_end / RATE - (1.0 + bounds[1])) < 0.15
    assert turn.rule in ("smart_turn", "smart_turn_probable", "silence_timeout")
    assert turn.audio.size >= (bounds[1] - bounds[0]) * RATE  # the whole utterance


def test_complete_questions_end_fast_by_smart_turn(models) -> None:  # type: ignore[no-untyped-def]
    [turn] = turns(detect(join(silence(1.0), speech(GO_FORWARD), silence(2.0)), models))
    assert turn.rule == "smart_turn" and turn.probability is not None
    assert turn.probability >= 0.7
    assert 150 <= turn.delay_ms <= 300  # trigger_silence (0.2 s) plus one window


def test_incomplete_sounding_speech_waits_for_the_silence_timeout(models) -> None:  # type: ignore[no-untyped-def]
    # Smart Turn judges this book excerpt unfinished; the fallback ends it at 1.5 s.
    actions = detect(join(silence(1.0), speech(LIBRIVOX), silence(2.5)), models)
    [turn] = turns(actions)
    assert turn.rule == "silence_timeout"
    assert 1500 <= turn.delay_ms <= 1550
    # ...and ASR got the same utterance speculatively at the first pause.
    [guess] = [a for a in actions if isinstance(a, TurnEnd) and a.speculative]
    assert guess.speech_end == turn.speech_end and guess.decided < turn.decided


def test_a_600ms_pause_mid_sentence_is_one_turn(models) -> None:  # type: ignore[no-untyped-def]
    audio = join(silence(1.0), with_pause(ARCTIC, ARCTIC_COMMA_S, 0.6), silence(2.0))
    actions = detect(audio, models)
    [turn] = turns(actions)
    assert turn.speech_end / RATE > 1.0 + 2.88 + 0.6 - 0.15  # ends after the second half
    assert sum(isinstance(a, SpeechStop) for a in actions) == 2  # it noticed the pause


def test_two_sentences_2s_apart_are_two_turns(models) -> None:  # type: ignore[no-untyped-def]
    audio = join(silence(1.0), speech(GO_FORWARD), silence(2.0), speech(ARCTIC), silence(2.0))
    first, second = turns(detect(audio, models))
    assert first.speech_end < second.start
    assert second.start / RATE == pytest.approx(1.0 + 2.786 + 2.0 + 0.21, abs=0.15)


def test_a_loud_noise_burst_in_silence_starts_no_turn(models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), noise_burst(0.5), silence(2.0)), models)
    assert not any(isinstance(a, (SpeechStart, TurnEnd)) for a in actions)


@pytest.mark.parametrize("sound", [cough(), blip(0.2)], ids=["cough", "speech-blip"])
def test_a_blip_alone_is_not_a_turn(sound, models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), sound, silence(2.0)), models)
    assert not any(isinstance(a, (SpeechStart, TurnEnd)) for a in actions)


@pytest.mark.parametrize("sound", [cough(), blip(0.2)], ids=["cough", "speech-blip"])
def test_a_blip_in_a_pause_does_not_end_the_turn(sound, models) -> None:  # type: ignore[no-untyped-def]
    clip = speech(ARCTIC)
    cut = int(ARCTIC_COMMA_S * RATE)
    audio = join(silence(1.0), clip[:cut], silence(0.5), sound, silence(0.5), clip[cut:],
                 silence(2.0))
    [turn] = turns(detect(audio, models))
    assert turn.speech_end / RATE > 1.0 + 2.88 + 1.2 - 0.15


def test_any_chunking_gives_the_same_decisions(models) -> None:  # type: ignore[no-untyped-def]
    """Decisions depend on the audio only, not on how it was cut into frames."""
    audio = join(silence(0.7), speech(GO_FORWARD), silence(2.0))

    def decisions(chunk: int) -> list[tuple[str, int]]:
        silero, smart = models
        detector = TurnDetector(Config().vad, silero.stream())
        from workers.backends.audio import Reblocker

        reblock, out = Reblocker(512), []
        for i in range(0, audio.size, chunk):
            for window in reblock(audio[i:i + chunk]):
                for a in detector.push(window):
                    if isinstance(a, NeedsTurnCheck):
                        a = detector.judged(smart.probability(a.audio))[0]
                    if isinstance(a, TurnEnd):
                        out.append((a.rule, a.decided))
        return out

    assert decisions(160) == decisions(512) == decisions(1777)


def test_silero_only_mode_uses_the_silence_timeout(models) -> None:  # type: ignore[no-untyped-def]
    config = Config().vad.model_copy(update={"type": "silero"})
    actions = detect(join(silence(1.0), speech(GO_FORWARD), silence(2.0)), models, config)
    assert not any(isinstance(a, NeedsTurnCheck) for a in actions)
    [turn] = turns(actions)
    assert turn.rule == "silence_timeout"


def test_a_turn_longer_than_the_cap_is_cut(models) -> None:  # type: ignore[no-untyped-def]
    config = Config().vad.model_copy(update={"fallback": Config().vad.fallback.model_copy(
        update={"max_turn_duration": 2.0})})
    long_speech = join(speech(ARCTIC), speech(LIBRIVOX))
    actions = detect(join(silence(0.5), long_speech, silence(2.0)), models, config)
    assert turns(actions)[0].rule == "max_duration"


def test_bad_windows_are_refused(models) -> None:  # type: ignore[no-untyped-def]
    detector = TurnDetector(Config().vad, models[0].stream())
    with pytest.raises(ValueError, match="512"):
        detector.push(np.zeros(100, dtype=np.float32))


def test_blip_record(models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), blip(0.2), silence(2.0)), models)
    [record] = [a for a in actions if isinstance(a, Blip)]
    assert 0 < record.speech <= 0.25 * RATE


def hum(seconds: float, db: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    tone = np.sin(2 * np.pi * 120 * t) + 0.5 * np.sin(2 * np.pi * 240 * t)
    return (tone / np.sqrt(np.mean(tone**2)) * 10 ** (db / 20)).astype(np.float32)


def test_the_noise_floor_is_learnt_from_the_room(models) -> None:  # type: ignore[no-untyped-def]
    detector = TurnDetector(Config().vad, models[0].stream())
    for room_db in (-60.0, -35.0):  # a quiet room, then a fan starts
        audio = hum(4.0, room_db)
        for i in range(0, audio.size - 511, 512):
            detector.push(audio[i:i + 512])
        assert detector.noise_db == pytest.approx(room_db, abs=1.5)


def test_speech_over_a_steady_hum_is_still_a_turn(models) -> None:  # type: ignore[no-untyped-def]
    audio = hum(6.0, -32.0)
    s = speech(GO_FORWARD)
    audio[RATE:RATE + s.size] += s
    assert len(turns(detect(audio, models))) == 1


def test_quality_gating_rejects_what_a_fooled_vad_calls_speech(models) -> None:  # type: ignore[no-untyped-def]
    """A VAD fooled by a steady machine hum (here: one that says "speech" to
    everything) must not produce turns when the audio carries nothing above the
    room's noise floor; with gating off, it does."""
    audio = hum(5.0, -25.0)

    def run(gating: bool) -> list[object]:
        config = Config().vad.model_copy(update={
            "type": "silero", "quality_gating": Config().vad.quality_gating.model_copy(
                update={"enabled": gating})})
        detector = TurnDetector(config, lambda window: 0.9)
        actions: list[object] = []
        for i in range(0, audio.size - 511, 512):
            actions.extend(detector.push(audio[i:i + 512]))
        return actions + list(detector.flush())

    assert not any(isinstance(a, SpeechStart) for a in run(gating=True))
    assert any(isinstance(a, SpeechStart) for a in run(gating=False))


# -- the transcript as a signal, tentative ends, continuation, learned pauses ---------
def commits(actions: list[object]) -> list[Commit]:
    return [a for a in actions if isinstance(a, Commit)]


def test_a_confident_end_is_tentative_until_the_text_agrees(models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), speech(GO_FORWARD), silence(2.5)), models,
                     transcribe=lambda _: "Go forward ten meters.", text_after_s=0.4)
    [turn] = turns(actions)
    assert turn.rule == "smart_turn" and turn.tentative and 150 <= turn.delay_ms <= 300
    [commit] = commits(actions)  # the text came 0.4 s later; committed at commit_silence
    assert commit.rule == "text" and commit.text_verdict.startswith("complete")
    assert (commit.decided - turn.speech_end) / RATE == pytest.approx(0.7, abs=0.05)
    late = detect(join(silence(1.0), speech(GO_FORWARD), silence(2.5)), models,
                  transcribe=lambda _: "Go forward ten meters.", text_after_s=0.9)
    [turn], [commit] = turns(late), commits(late)  # as soon as a late text came
    assert (commit.decided - turn.decided) / RATE == pytest.approx(0.9, abs=0.05)


def test_text_that_goes_on_holds_the_turn_to_the_silence_timeout(models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), speech(GO_FORWARD), silence(2.5)), models,
                     transcribe=lambda _: "Go forward ten meters and")
    [turn] = turns(actions)
    assert turn.tentative  # Smart Turn was sure; the text came after
    [commit] = commits(actions)
    assert commit.rule == "silence_timeout" and "ends on 'and'" in commit.text_verdict
    assert (commit.decided - turn.speech_end) / RATE == pytest.approx(1.5, abs=0.05)


def test_text_known_before_smart_turn_decides_gives_a_committed_end(models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), speech(GO_FORWARD), silence(2.5)), models,
                     transcribe=lambda _: "Go forward ten meters,", text_after_s=0.0)
    [turn] = turns(actions)  # the comma says it goes on: no tentative end, the timeout
    assert not turn.tentative and turn.rule == "silence_timeout"
    assert turn.text_verdict.startswith("incomplete") and commits(actions) == []


def test_no_transcript_falls_back_to_smart_turn(models) -> None:  # type: ignore[no-untyped-def]
    actions = detect(join(silence(1.0), speech(GO_FORWARD), silence(2.5)), models,
                     transcribe=lambda _: None)
    [turn] = turns(actions)
    [commit] = commits(actions)
    assert turn.tentative and commit.rule == "text" and commit.text_verdict.startswith("unknown")


def test_a_short_turn_ends_fast_only_when_smart_turn_and_the_text_agree(models) -> None:  # type: ignore[no-untyped-def]
    # "Short": less speech than min_speech_duration (Go forward has ~1.9 s of it).
    cfg = Config().vad.model_copy(update={"fallback": Config().vad.fallback.model_copy(
        update={"min_speech_duration": 3.0})})
    audio = join(silence(1.0), speech(GO_FORWARD), silence(2.5))
    agreed = detect(audio, models, cfg, transcribe=lambda _: "Go forward ten meters.")
    [turn] = turns(agreed)
    [commit] = commits(agreed)
    assert turn.rule == "smart_turn" and commit.rule == "text"
    assert (commit.decided - turn.speech_end) * 1000 // RATE <= 750  # commit_silence
    unsure = detect(audio, models, cfg, transcribe=lambda _: None)
    [commit] = commits(unsure)  # no text: Smart Turn alone does not end a short turn
    assert commit.rule == "silence_timeout"


def test_a_question_ends_at_the_probable_wait_even_if_smart_turn_doubts(models) -> None:  # type: ignore[no-untyped-def]
    # Smart Turn judges this excerpt unfinished (see above); a question mark says it is.
    actions = detect(join(silence(1.0), speech(LIBRIVOX), silence(2.5)), models,
                     transcribe=lambda _: "Was he not an ill disposed young man?")
    [turn] = turns(actions)
    assert turn.rule == "smart_turn_probable" and not turn.tentative
    assert 700 <= turn.delay_ms <= 800


def test_a_transcript_that_reads_complete_ends_the_turn_at_complete_silence(models) -> None:  # type: ignore[no-untyped-def]
    # Smart Turn doubts this excerpt (see above); with complete_silence set, a transcript
    # that reads finished ends it then, and one that reads unfinished still waits.
    vad = Config().vad
    config = vad.model_copy(update={"endpointing": vad.endpointing.model_copy(
        update={"complete_silence": 1.0, "preempt_silence": None})})
    audio = join(silence(1.0), speech(LIBRIVOX), silence(2.5))
    [turn] = turns(detect(audio, models, config,
                          transcribe=lambda _: "He was not an ill disposed young man."))
    assert turn.rule == "text_complete" and 1000 <= turn.delay_ms <= 1050
    [turn] = turns(detect(audio, models, config,
                          transcribe=lambda _: "He was not an ill disposed young man and"))
    assert turn.rule == "silence_timeout"


def test_a_pause_left_to_the_timeout_ends_tentatively_once_the_text_reads_done(models) -> None:  # type: ignore[no-untyped-def]
    # Smart Turn doubts this excerpt: only the silence timeout may commit its end, but
    # the reply is prepared from preempt_silence on (the text came 0.3 s after the check).
    audio = join(silence(1.0), speech(LIBRIVOX), silence(2.5))
    actions = detect(audio, models, transcribe=lambda _: "He was not an ill disposed young man.")
    [turn] = turns(actions)
    assert turn.rule == "preemptive" and turn.tentative and 500 <= turn.delay_ms <= 560
    [commit] = commits(actions)
    assert commit.rule == "silence_timeout"
    assert (commit.decided - turn.speech_end) / RATE == pytest.approx(1.5, abs=0.05)
    # A transcript that goes on prepares nothing: the timeout ends the turn, committed.
    [turn] = turns(detect(audio, models,
                          transcribe=lambda _: "He was not an ill disposed young man and"))
    assert turn.rule == "silence_timeout" and not turn.tentative
    # Off: the same turn starts at the timeout.
    vad = Config().vad
    off = vad.model_copy(update={"endpointing": vad.endpointing.model_copy(
        update={"preempt_silence": None})})
    [turn] = turns(detect(audio, models, off,
                          transcribe=lambda _: "He was not an ill disposed young man."))
    assert turn.rule == "silence_timeout" and not turn.tentative


def test_speech_after_a_preemptive_end_continues_the_turn(models) -> None:  # type: ignore[no-untyped-def]
    # A 1.2 s pause (the clip ends in 0.6 s of it): past preempt_silence, before the timeout.
    audio = join(silence(1.0), speech(LIBRIVOX), silence(0.6), speech(GO_FORWARD), silence(2.5))
    actions = detect(audio, models, continue_turns=True,
                     transcribe=lambda _: "He was not an ill disposed young man.")
    first, whole = turns(actions)
    assert first.rule == "preemptive" and first.tentative
    assert whole.start == first.start and whole.speech_end > first.speech_end + RATE
    [commit] = commits(actions)  # the whole utterance's; the fragment's never came
    assert commit.decided > whole.speech_end


def test_speech_before_the_reply_continues_the_turn_from_its_first_word(models) -> None:  # type: ignore[no-untyped-def]
    audio = join(silence(1.0), speech(GO_FORWARD), silence(1.0), speech(ARCTIC), silence(2.5))
    actions = detect(audio, models, continue_turns=True)
    first, whole = turns(actions)
    assert whole.start == first.start  # one turn from the first speech...
    assert whole.speech_end > first.speech_end + 2 * RATE  # ...to the end of the second
    head = first.audio.size
    assert np.array_equal(whole.audio[:head - 2000], first.audio[:head - 2000])
    [resumed] = [a for a in actions if isinstance(a, Resumed)]
    assert resumed.pause / RATE == pytest.approx(1.0 + 0.43 + 0.21, abs=0.2)


def test_learned_long_pauses_stretch_the_silence_timeout(models) -> None:  # type: ignore[no-untyped-def]
    audio = join(silence(1.0), speech(LIBRIVOX), silence(3.5))
    [turn] = turns(detect(audio, models, allowance_s=2.4))
    assert turn.rule == "silence_timeout" and 2400 <= turn.delay_ms <= 2450
    [turn] = turns(detect(audio, models, allowance_s=9.0))  # at most max_stretch (2x)
    assert turn.rule == "silence_timeout" and 3000 <= turn.delay_ms <= 3050


def test_a_user_who_pauses_long_has_replies_committed_later(models) -> None:  # type: ignore[no-untyped-def]
    # "Go forward ten meters." reads complete to Smart Turn and the text alike; a user
    # whose inner pauses are long goes on after ~1 s (0.3 s + the clips' own quiet).
    audio = join(silence(1.0), speech(GO_FORWARD), silence(0.3), speech(ARCTIC), silence(3.0))
    def complete(_: TurnEnd) -> str:
        return "Go forward ten meters."
    quick = detect(audio, models, transcribe=complete, continue_turns=True)
    first = turns(quick)[0]
    assert first.tentative and first.speech_end / RATE < 1.0 + 2.5
    assert (commits(quick)[0].decided - first.speech_end) / RATE == pytest.approx(0.7, abs=0.05)
    slow = detect(audio, models, transcribe=complete, continue_turns=True, allowance_s=1.2)
    first, whole = turns(slow)  # the first end stays tentative; the user went on
    assert first.tentative and whole.start == first.start
    [commit] = commits(slow)  # only the whole utterance is committed, after 1.2 s
    assert commit.decided > whole.speech_end
    assert (commit.decided - whole.speech_end) / RATE == pytest.approx(1.2, abs=0.05)
    # The reply is still prepared at once: the tentative end does not wait.
    assert 150 <= whole.delay_ms <= 300
    # A question yields the turn whoever asks it: committed at the configured wait.
    asked = detect(join(silence(1.0), speech(GO_FORWARD), silence(2.5)), models,
                   transcribe=lambda _: "Can you go forward ten meters?", allowance_s=1.2)
    [turn], [commit] = turns(asked), commits(asked)
    assert commit.rule == "text" and commit.text_verdict.startswith("question")
    assert (commit.decided - turn.speech_end) / RATE == pytest.approx(0.7, abs=0.05)


def test_a_resumed_pause_is_reported_for_learning(models) -> None:  # type: ignore[no-untyped-def]
    audio = join(silence(1.0), with_pause(ARCTIC, ARCTIC_COMMA_S, 0.6), silence(2.0))
    actions = detect(audio, models, transcribe=lambda _: "He turned sharply,")
    [turn] = turns(actions)
    assert turn.speech_end / RATE > 1.0 + 2.88 + 0.6 - 0.15
    pauses = [a.pause / RATE for a in actions if isinstance(a, Resumed)]
    assert len(pauses) == 1 and 0.6 <= pauses[0] <= 0.9

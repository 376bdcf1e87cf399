"""Hybrid turn detection: when has the user finished a thought?

Fed with 32 ms windows of 16 kHz audio, in order, it decides — in *audio time*
(sample counts), so the result never depends on machine load:

* **Speech** per window: ``workers.vad.speech_gate`` (Silero, hysteresis, noise floor).
* **A turn starts** once it holds ``min_turn_speech`` of speech; anything shorter
  is a blip (cough, click): never a turn or a barge-in.
* **A turn ends** at a pause. At ``trigger_silence`` the detector sends ASR a
  *speculative* ``TurnEnd`` of the turn so far and asks for Smart Turn's judgement
  (``NeedsTurnCheck`` -> ``judged(p)``); the caller hands ASR's transcript of that
  guess back whenever it comes (``texted``). Together they set the silence at which
  the pause ends the turn (``endpointing``):

  ========================  ==========================================  =================
  Smart Turn P              text of the turn so far                     the turn ends
  ========================  ==========================================  =================
  any                       goes on ("and", "to", "the", ",", a list)   silence timeout
  >= confidence_threshold   anything else (or no transcript)            now (``smart_turn``)
  >= threshold              anything else                               ``probable_silence``
  below                     a question                                  ``probable_silence``
  below                     reads complete ("... the table.")           ``complete_silence``
  below                     anything else                               silence timeout
  ========================  ==========================================  =================

  A turn with less than ``min_speech_duration`` of speech ("yes", a name) ends
  early only if Smart Turn says complete *and* the text does not say "goes on".
  The waits that let a reply play (commit wait, silence timeout) stretch to the
  user's ``pause_allowance`` (``workers.vad.pauses``), at most
  ``adaptive.max_stretch`` x. A turn longer than ``max_turn_duration`` is cut.

* **Tentative ends.** ASR (~0.4-0.7 s on a small CPU) is slower than Smart Turn
  (~60 ms). When the table says "now" but the transcript is not in, the turn ends
  *tentatively* (``TurnEnd(tentative=True)``: ASR and the LLM start, nothing plays)
  and is committed (``Commit``) once the text agrees — or, if it says "goes on", at
  the silence timeout, which always commits. Speech before the commit continues the
  turn. No end is committed before ``commit_silence`` (0.7 s; stretched for users
  who pause long, except after a question): the reply is not ready sooner anyway,
  and a shorter pause is often the user drawing breath.

* **Preemptive ends.** A pause left to the silence timeout (Smart Turn unsure) ends
  tentatively after ``preempt_silence`` once the transcript is in and does not say
  "goes on" (rule ``preemptive``): the reply is prepared while the timeout runs and
  plays at the commit. It costs an LLM request each time the user goes on.

* **Continuation**: an ended turn's audio is kept. If the user speaks again before
  hearing the reply, the caller calls ``continue_turn()`` right after the
  ``SpeechStart``: the next ``TurnEnd`` covers the whole utterance.

The detector does no I/O: it returns ``Action``s and asks for a judgement with
``NeedsTurnCheck``; the caller runs the model off the event loop and hands the
probability back (``judged``), and the transcript whenever it comes (``texted``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.backends.audio import MODEL_RATE
from workers.backends.silero import WINDOW
from workers.config import VadConfig
from workers.vad.actions import (
    Action,
    Blip,
    Commit,
    NeedsTurnCheck,
    Resumed,
    SpeechStart,
    SpeechStop,
    TurnEnd,
)
from workers.vad.kept_audio import KeptAudio
from workers.vad.speech_gate import SpeechGate
from workers.vad.turn_text import TextVerdict, judge_text

RATE = MODEL_RATE
__all__ = ["RATE", "WINDOW", "Action", "Blip", "Commit", "NeedsTurnCheck", "Resumed",
           "SpeechStart", "SpeechStop", "TurnDetector", "TurnEnd", "seconds"]
PREROLL = RATE * 3 // 10  # audio kept before the first speech window (soft onsets)
TAIL = RATE // 10  # audio kept after the last speech window


@dataclass
class _Ended:
    """The last turn that ended: speech before its reply is heard continues it."""

    start: int
    speech: int
    speech_end: int
    probability: float | None
    verdict: TextVerdict | None  # None: the transcript has not come yet
    committed: bool


def seconds(value: float) -> int:
    """Seconds -> samples of audio time."""
    return int(value * RATE)


class TurnDetector:
    def __init__(self, config: VadConfig, speech_probability: Callable[[np.ndarray], float]):
        self.cfg = config
        self.gate = SpeechGate(config, speech_probability)
        self.use_model = config.type in ("hybrid", "smart_turn")
        self.use_text = config.endpointing.text and config.speculative_asr
        fb, st = config.fallback, config.smart_turn
        self.min_turn_speech = seconds(fb.min_turn_speech)
        self.min_model_speech = seconds(fb.min_speech_duration)
        self.silence_timeout = seconds(fb.silence_timeout) if fb.enabled else None
        self.probable_silence = seconds(config.endpointing.probable_silence)
        self.commit_silence = seconds(config.endpointing.commit_silence) if self.use_text else 0
        self.max_stretch = config.adaptive.max_stretch
        complete = config.endpointing.complete_silence
        self.complete_silence = seconds(complete) if complete is not None else None
        preempt = config.endpointing.preempt_silence
        self.preempt_silence = seconds(preempt) if preempt is not None and self.use_text else None
        self.trigger = seconds(st.trigger_silence)
        self.max_turn = seconds(fb.max_turn_duration)
        self.max_model_audio = seconds(st.max_audio)
        self.max_gap = seconds(config.continuation.max_gap)
        # Samples of silence this user's waits cover (workers.vad.pauses); 0: the defaults.
        self.pause_allowance = 0

        self.pos = 0  # samples consumed
        self.audio = KeptAudio()  # pre-roll while idle, the turn while active
        self._ended: _Ended | None = None  # the last turn, while it may still be continued
        self._reset_turn()

    def _reset_turn(self) -> None:
        self.turn_start: int | None = None  # first speech sample of a turn (or blip)
        self.announced = False  # SpeechStart emitted (the turn is real)
        self.speech = 0  # samples of speech in the turn
        self.run = 0  # samples in the current run of speech windows
        self.last_speech_end = 0
        self._checked_pause = False
        self._probability: float | None = None  # Smart Turn at this pause (None: not asked)
        self._verdict: TextVerdict | None = None  # the text at this pause (None: not yet)
        self._run_pause = 0  # the silence before the current run of speech
        self._continuable: _Ended | None = None  # offered to continue_turn() until next push

    # -- one window ------------------------------------------------------
    def push(self, window: np.ndarray) -> list[Action]:
        if window.shape != (WINDOW,):
            raise ValueError(f"windows must be {WINDOW} samples, got {window.shape}")
        actions: list[Action] = []
        if self._continuable is not None:  # not continued: the ended turn is over for good
            ended, self._continuable = self._continuable, None
            if not ended.committed:  # (the caller cut it off, or lets it stand)
                self._ended = ended
                actions.append(self._commit("new_turn"))
            self._forget_ended()
        start = self.pos
        self.pos += WINDOW
        self._keep(window)
        is_speech = self.gate.is_speech(window)
        actions.extend(self._on_speech(start) if is_speech else self._on_silence())
        return actions

    def judged(self, probability: float) -> list[Action]:
        """Smart Turn's probability for the last ``NeedsTurnCheck``."""
        self._probability = probability
        return self._check_end()

    def texted(self, speech_end: int, text: str | None) -> list[Action]:
        """ASR's transcript (None: none came) of the speculative ``TurnEnd`` whose speech
        ended at ``speech_end``; ignored if the user has gone on since."""
        verdict = judge_text(text)
        ended = self._ended
        if self.turn_start is not None and self._checked_pause \
                and self.last_speech_end == speech_end and self._verdict is None:
            self._verdict = verdict
            return self._check_end()
        if ended is not None and not ended.committed and ended.speech_end == speech_end \
                and ended.verdict is None:
            ended.verdict = verdict
            return self._check_commit()
        return []

    def continue_turn(self) -> list[Action]:
        """Right after a ``SpeechStart`` (while ``continuable``): this speech goes on with
        the turn that ended last (none of its reply reached the user)."""
        ended, self._continuable = self._continuable, None
        if ended is None or self.turn_start is None:
            raise RuntimeError("continue_turn() without a continuable turn")
        pause = self.turn_start - ended.speech_end
        self.turn_start = ended.start
        self.speech += ended.speech
        return self._resumed(pause)

    @property
    def continuable(self) -> bool:
        """A ``SpeechStart`` just came within ``continuation.max_gap`` of the last turn."""
        return self._continuable is not None

    def flush(self) -> list[Action]:
        """The stream ended: a turn in progress ends now (a tentative one is committed)."""
        if self.announced:
            return [self._end("end_of_stream", tentative=False)]
        ended = self._ended
        if ended is not None and not ended.committed:
            return [self._commit("end_of_stream")]
        return []

    @property
    def noise_db(self) -> float:  # the tracked noise floor, dBFS
        return self.gate.noise_db

    # -- the rule table ----------------------------------------------------
    def _wait(self, probability: float | None, verdict: TextVerdict | None,
              speech: int) -> tuple[int | None, str]:
        """The silence (samples) after which a pause ends the turn, and the rule, from
        Smart Turn's probability and the text's verdict (None: not known yet, decide on
        Smart Turn alone). None: only the silence timeout ends it."""
        st = self.cfg.smart_turn
        kind = verdict.verdict if verdict is not None else "pending"
        if probability is None or kind == "incomplete":
            return None, ""
        complete = probability >= st.confidence_threshold
        if speech < self.min_model_speech:  # short: Smart Turn alone misjudges it
            if complete and kind != "unknown":
                return self.trigger, "smart_turn"
            return None, ""
        if complete:
            return self.trigger, "smart_turn"
        # With the text these ends start the reply (the commit wait lets it play);
        gate = self._stretched if not self.use_text else int  # without, they commit.
        if probability >= st.threshold or kind == "question":
            return gate(self.probable_silence), "smart_turn_probable"
        if kind == "complete" and self.complete_silence is not None:
            return gate(self.complete_silence), "text_complete"
        return None, ""

    def _check_end(self) -> list[Action]:
        """End the turn if this pause lasted long enough; tentatively until the text's
        verdict is in and the commit wait has passed (the reply may not play before)."""
        if self.turn_start is None or not self.announced or not self._checked_pause:
            return []
        silence = self.pos - self.last_speech_end
        verdict = self._verdict if self.use_text else judge_text(None)
        wait, rule = self._wait(self._probability, verdict, self.speech)
        if wait is None and verdict is None and self.speech < self.min_model_speech:
            # A short turn waits for its text; Smart Turn saying "complete" ends it
            # tentatively (the commit needs the text to agree).
            wait, rule = self._wait(self._probability, judge_text("."), self.speech)
        if wait is not None and silence >= wait:
            return [self._end(rule, tentative=verdict is None
                              or silence < self._commit_wait(verdict))]
        timeout = self._timeout
        if timeout is not None and silence >= timeout:
            return [self._end("silence_timeout", tentative=False)]
        if wait is None and self.preempt_silence is not None \
                and silence >= self.preempt_silence \
                and verdict is not None and verdict.verdict != "incomplete":
            # Left to the timeout, but nothing says the user goes on: prepare the reply
            # now (it waits for the commit, which comes by the rules above).
            return [self._end("preemptive", tentative=True)]
        return []

    def _check_commit(self) -> list[Action]:
        ended = self._ended
        if ended is None or ended.committed:
            return []
        silence = self.pos - ended.speech_end
        if ended.verdict is not None:
            wait, _ = self._wait(ended.probability, ended.verdict, ended.speech)
            if wait is not None and silence >= max(wait, self._commit_wait(ended.verdict)):
                return [self._commit("text")]
        timeout = self._timeout
        if timeout is not None and silence >= timeout:
            return [self._commit("silence_timeout")]
        return []

    def _commit(self, rule: str) -> Commit:
        ended = self._ended
        assert ended is not None
        ended.committed = True
        return Commit(self.pos, rule, _describe(ended.verdict))

    # -- speech / silence ------------------------------------------------
    def _on_speech(self, start: int) -> list[Action]:
        actions: list[Action] = []
        if self.turn_start is None:
            self.turn_start = start
        pause = start - self.last_speech_end
        self.speech += WINDOW
        self.run += WINDOW
        if self.run == WINDOW:
            self._run_pause = pause  # the silence this run of speech broke
        self.last_speech_end = self.pos
        if self.run >= self.min_turn_speech:
            # The user really goes on. A blip in a pause (a cough) does not re-arm the
            # turn check: Smart Turn on audio ending in a cough can say "complete".
            if self.announced and self._checked_pause:
                actions.extend(self._resumed(self._run_pause))
            self._checked_pause = False
            self._probability = None
            self._verdict = None
        if not self.announced and self.speech >= self.min_turn_speech:
            self.announced = True
            actions.append(SpeechStart(self.turn_start))
            ended, self._ended = self._ended, None
            if ended is not None and self.turn_start - ended.speech_end <= self.max_gap:
                self._continuable = ended
            elif ended is not None:
                if not ended.committed:
                    self._ended = ended
                    actions.append(self._commit("new_turn"))
                    self._ended = None
                self.audio.trim_to(self.turn_start - PREROLL)
        if self.announced and self.pos - self.turn_start >= self.max_turn:
            actions.append(self._end("max_duration", tentative=False))
        return actions

    def _resumed(self, pause: int) -> list[Action]:
        return [Resumed(pause)] if pause >= self.trigger else []

    def _on_silence(self) -> list[Action]:
        self.run = 0
        commit = self._check_commit()  # a tentative turn's commit waits on silence too
        if self.turn_start is None:
            return list(commit)
        silence = self.pos - self.last_speech_end
        if not self.announced:  # a blip so far
            if silence >= (self.silence_timeout or self.trigger * 4):
                blip = Blip(self.turn_start, self.speech)
                self._reset_turn()
                return [*commit, blip]
            return list(commit)
        if silence >= self.trigger and not self._checked_pause:
            self._checked_pause = True
            actions: list[Action] = [SpeechStop(self.last_speech_end)]
            # With the text signal every turn is judged (a short one needs Smart Turn and
            # the text to agree); without it only turns long enough for Smart Turn.
            if self.use_text or self.speech >= self.min_model_speech:
                # ASR starts on the turn as it stands *before* Smart Turn judges it: if
                # the turn is over, the final TurnEnded finds its transcript under way.
                if self.cfg.speculative_asr:
                    actions.append(self._guess())
                if self.use_model:
                    actions.append(NeedsTurnCheck(self._recent(self.max_model_audio)))
            return actions
        return self._check_end()

    @property
    def _timeout(self) -> int | None:
        if self.silence_timeout is None:
            return None
        return self._stretched(self.silence_timeout)

    def _commit_wait(self, verdict: TextVerdict | None) -> int:
        if verdict is not None and verdict.verdict == "question":
            return self.commit_silence  # a question yields the turn, however one pauses
        return self._stretched(self.commit_silence)

    def _stretched(self, samples: int) -> int:  # to the user's allowance, within bounds
        return min(max(samples, self.pause_allowance), int(samples * self.max_stretch))

    # -- turn audio --------------------------------------------------------
    def _keep(self, window: np.ndarray) -> None:
        self.audio.append(window, self.pos)
        if self.turn_start is None and self._ended is None:  # idle: keep only the pre-roll
            self.audio.trim_to(self.pos - PREROLL - WINDOW)
        elif self.turn_start is None and self._ended is not None:
            if self._ended.committed and self.pos - self._ended.speech_end > self.max_gap:
                self._forget_ended()  # too long ago to be continued

    def _forget_ended(self) -> None:
        self._ended = None
        keep_from = (self.turn_start if self.turn_start is not None else self.pos) - PREROLL
        self.audio.trim_to(keep_from - WINDOW)

    def _recent(self, samples: int) -> np.ndarray:
        return self.audio.span(max(self.audio.start, self.pos - samples), self.pos)

    def _utterance(self) -> np.ndarray:
        assert self.turn_start is not None
        return self.audio.span(self.turn_start - PREROLL, self.last_speech_end + TAIL)

    def _guess(self) -> TurnEnd:
        assert self.turn_start is not None
        return TurnEnd(self.turn_start, self.last_speech_end, self.pos, "speculative",
                       self._probability, self._utterance(), speculative=True)

    def _end(self, rule: str, *, tentative: bool) -> TurnEnd:
        assert self.turn_start is not None
        verdict = self._verdict if self.use_text else None
        end = TurnEnd(self.turn_start, self.last_speech_end, self.pos, rule, self._probability,
                      self._utterance(), text_verdict=_describe(verdict), tentative=tentative)
        # Its audio stays while the turn may still be continued (continue_turn).
        self._ended = _Ended(self.turn_start, self.speech, self.last_speech_end,
                             self._probability, verdict, committed=not tentative)
        self._reset_turn()
        return end


def _describe(verdict: TextVerdict | None) -> str:
    return "" if verdict is None else f"{verdict.verdict}: {verdict.reason}"

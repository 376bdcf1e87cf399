"""Hybrid turn detection: when has the user finished a thought?

Fed with 32 ms windows of 16 kHz audio, in order, it decides — in *audio time*
(sample counts), so the result never depends on machine load:

* **Speech** per window: Silero P(speech) >= ``speech_threshold`` (with
  hysteresis), and, when quality gating is on, enough power above a tracked
  noise floor (``min_snr``) in an input that is not hopelessly noisy
  (``max_noise_level``). The noise floor is the quietest window of the last
  ~3 s (minimum statistics): pauses between words reach it, a steady hum or fan
  becomes it, and it needs no help from the VAD, which such noise can fool.
* **A turn starts** once it holds ``min_turn_speech`` of speech; anything shorter
  that fades out is a blip (cough, click) and never becomes a turn or a barge-in.
* **A turn ends** at a pause:
  1. at ``trigger_silence`` Smart Turn judges the turn so far (only once it has
     ``min_speech_duration`` of speech: the model misjudges very short audio):
     P >= ``confidence_threshold`` ends it now (``smart_turn``); P >= ``threshold``
     ends it at half the silence timeout (``smart_turn_probable``);
  2. otherwise the silence timeout ends it (``silence_timeout``);
  3. a turn longer than ``max_turn_duration`` is cut (``max_duration``).

At each pause with enough speech it also emits a *speculative* ``TurnEnd``
(before asking Smart Turn), so ASR can start on the audio the turn will most
likely end with.

The detector does no I/O: it returns ``Action``s, and asks for a Smart Turn
judgement with ``NeedsTurnCheck``; the caller runs the model (off the event
loop) and hands the probability back with ``judged``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.backends.audio import level_db
from workers.config import VadConfig

RATE = 16_000
WINDOW = 512
PREROLL = RATE * 3 // 10  # audio kept before the first speech window (soft onsets)
TAIL = RATE // 10  # audio kept after the last speech window
STOP_THRESHOLD_GAP = 0.15  # hysteresis: speech continues down to threshold - gap
FLOOR_WINDOWS = 94  # ~3 s of levels for the noise-floor minimum


@dataclass(frozen=True)
class SpeechStart:
    at: int  # sample where speech began (audio time)


@dataclass(frozen=True)
class SpeechStop:
    at: int  # end of the last speech window


@dataclass(frozen=True)
class NeedsTurnCheck:
    audio: np.ndarray  # the turn so far, at most max_audio seconds, pause included


@dataclass(frozen=True)
class TurnEnd:
    start: int  # first speech sample
    speech_end: int  # end of the last speech window
    decided: int  # audio time of the decision
    rule: str
    probability: float | None
    audio: np.ndarray  # the utterance, with a little audio before and after
    speculative: bool = False  # a guess at a pause, for ASR to start on; the turn may go on

    @property
    def delay_ms(self) -> int:
        """How long after the last speech the decision came."""
        return (self.decided - self.speech_end) * 1000 // RATE


@dataclass(frozen=True)
class Blip:
    start: int
    speech: int  # samples of speech it held


Action = SpeechStart | SpeechStop | NeedsTurnCheck | TurnEnd | Blip


def seconds(value: float) -> int:
    """Seconds -> samples of audio time."""
    return int(value * RATE)


class TurnDetector:
    def __init__(self, config: VadConfig, speech_probability: Callable[[np.ndarray], float]):
        self.cfg = config
        self.vad = speech_probability
        self.use_model = config.type in ("hybrid", "smart_turn")
        fb, st = config.fallback, config.smart_turn
        self.min_turn_speech = seconds(fb.min_turn_speech)
        self.min_model_speech = seconds(fb.min_speech_duration)
        self.silence_timeout = seconds(fb.silence_timeout) if fb.enabled else None
        self.trigger = seconds(st.trigger_silence)
        self.max_turn = seconds(fb.max_turn_duration)
        self.max_model_audio = seconds(st.max_audio)

        self.pos = 0  # samples consumed
        self._levels: deque[float] = deque(maxlen=FLOOR_WINDOWS)
        self._speaking = False  # window-level speech state (with hysteresis)
        self._audio: list[np.ndarray] = []  # pre-roll while idle, the turn while active
        self._audio_start = 0  # sample index of _audio[0]
        self._reset_turn()

    def _reset_turn(self) -> None:
        self.turn_start: int | None = None  # first speech sample of a turn (or blip)
        self.announced = False  # SpeechStart emitted (the turn is real)
        self.speech = 0  # samples of speech in the turn
        self.run = 0  # samples in the current run of speech windows
        self.last_speech_end = 0
        self._checked_pause = False
        self._end_at: int | None = None  # a probable end, waiting for this much silence
        self._probability: float | None = None

    # -- one window ------------------------------------------------------
    def push(self, window: np.ndarray) -> list[Action]:
        if window.shape != (WINDOW,):
            raise ValueError(f"windows must be {WINDOW} samples, got {window.shape}")
        start = self.pos
        self.pos += WINDOW
        self._keep(window, start)
        is_speech = self._is_speech(window)
        if is_speech:
            return self._on_speech(start)
        return self._on_silence()

    def judged(self, probability: float) -> list[Action]:
        """The Smart Turn probability for the last ``NeedsTurnCheck``."""
        cfg = self.cfg.smart_turn
        self._probability = probability
        if probability >= cfg.confidence_threshold:
            return [self._end("smart_turn")]
        if probability >= cfg.threshold and self.silence_timeout is not None:
            self._end_at = max(self.trigger, self.silence_timeout // 2)
        return []

    def flush(self) -> list[Action]:
        """The stream ended: a turn in progress ends now."""
        if self.announced:
            return [self._end("end_of_stream")]
        return []

    @property
    def noise_db(self) -> float:
        """The tracked noise floor, dBFS."""
        return min(self._levels) if self._levels else -100.0

    # -- speech / silence ------------------------------------------------
    def _is_speech(self, window: np.ndarray) -> bool:
        prob = self.vad(window)
        level = level_db(window)
        threshold = self.cfg.speech_threshold
        if self._speaking:
            threshold = max(0.05, threshold - STOP_THRESHOLD_GAP)
        voiced = prob >= threshold
        self._levels.append(level)
        gate = self.cfg.quality_gating
        if voiced and gate.enabled:
            snr = 1.0 - 10.0 ** (-(level - self.noise_db) / 10.0)
            too_noisy = 10.0 ** (self.noise_db / 20.0) > gate.max_noise_level
            voiced = snr >= gate.min_snr and not too_noisy
        self._speaking = voiced
        return voiced

    def _on_speech(self, start: int) -> list[Action]:
        actions: list[Action] = []
        if self.turn_start is None:
            self.turn_start = start
        self.speech += WINDOW
        self.run += WINDOW
        self.last_speech_end = self.pos
        if self.run >= self.min_turn_speech:
            # The user really goes on. A blip in a pause (a cough) does not re-arm the
            # turn check: Smart Turn on audio ending in a cough can say "complete".
            self._checked_pause = False
            self._end_at = None
        if not self.announced and self.speech >= self.min_turn_speech:
            self.announced = True
            actions.append(SpeechStart(self.turn_start))
        if self.announced and self.pos - self.turn_start >= self.max_turn:
            actions.append(self._end("max_duration"))
        return actions

    def _on_silence(self) -> list[Action]:
        self.run = 0
        if self.turn_start is None:
            return []
        silence = self.pos - self.last_speech_end
        if not self.announced:  # a blip so far
            if silence >= (self.silence_timeout or self.trigger * 4):
                blip = Blip(self.turn_start, self.speech)
                self._reset_turn()
                return [blip]
            return []
        actions: list[Action] = []
        if silence >= self.trigger and not self._checked_pause:
            self._checked_pause = True
            actions.append(SpeechStop(self.last_speech_end))
            if self.speech >= self.min_model_speech:
                # ASR starts on the turn as it stands *before* Smart Turn judges it: if
                # the turn is over, the final TurnEnded finds its transcript under way.
                if self._speculating:
                    actions.append(self._guess())
                if self.use_model:
                    actions.append(NeedsTurnCheck(self._recent(self.max_model_audio)))
            return actions
        if self._end_at is not None and silence >= self._end_at:
            return [self._end("smart_turn_probable")]
        if self.silence_timeout is not None and silence >= self.silence_timeout:
            return [self._end("silence_timeout")]
        return actions

    @property
    def _speculating(self) -> bool:
        return self.cfg.speculative_asr

    # -- turn audio --------------------------------------------------------
    def _keep(self, window: np.ndarray, start: int) -> None:
        self._audio.append(window.copy())
        if self.turn_start is None:  # idle: keep only the pre-roll
            while len(self._audio) * WINDOW > PREROLL + WINDOW:
                self._audio.pop(0)
        self._audio_start = self.pos - len(self._audio) * WINDOW

    def _span(self, begin: int, end: int) -> np.ndarray:
        audio = np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)
        lo = max(0, begin - self._audio_start)
        return audio[lo:max(lo, end - self._audio_start)]

    def _recent(self, samples: int) -> np.ndarray:
        return self._span(max(self._audio_start, self.pos - samples), self.pos)

    def _utterance(self) -> np.ndarray:
        assert self.turn_start is not None
        return self._span(self.turn_start - PREROLL, self.last_speech_end + TAIL)

    def _guess(self) -> TurnEnd:
        assert self.turn_start is not None
        return TurnEnd(self.turn_start, self.last_speech_end, self.pos, "speculative",
                       self._probability, self._utterance(), speculative=True)

    def _end(self, rule: str) -> TurnEnd:
        assert self.turn_start is not None
        end = TurnEnd(self.turn_start, self.last_speech_end, self.pos, rule, self._probability,
                      self._utterance())
        self._reset_turn()
        # Keep only the pre-roll: speech right after this turn starts the next one.
        while len(self._audio) * WINDOW > PREROLL + WINDOW:
            self._audio.pop(0)
        self._audio_start = self.pos - len(self._audio) * WINDOW
        return end

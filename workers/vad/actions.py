"""What the turn detector (``workers.vad.turn_detection``) tells its caller, one
``Action`` per event, in audio time (samples at 16 kHz)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.backends.audio import MODEL_RATE as RATE


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
    text_verdict: str = ""  # what the transcript at the deciding pause said, and why
    tentative: bool = False  # ended before the text's verdict: a ``Commit`` follows

    @property
    def delay_ms(self) -> int:
        """How long after the last speech the decision came."""
        return (self.decided - self.speech_end) * 1000 // RATE


@dataclass(frozen=True)
class Blip:
    start: int
    speech: int  # samples of speech it held


@dataclass(frozen=True)
class Commit:
    """The tentatively ended turn is over for good: its reply may be played."""

    decided: int  # audio time of the commit
    rule: str  # "text" (the transcript agreed) or "silence_timeout"
    text_verdict: str


@dataclass(frozen=True)
class Resumed:
    """The user went on after a pause inside their turn (what ``stretch`` learns from)."""

    pause: int  # samples of silence between the two runs of speech


Action = SpeechStart | SpeechStop | NeedsTurnCheck | TurnEnd | Blip | Resumed | Commit

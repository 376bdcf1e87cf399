"""The VAD stage's backend contract: a per-window speech probability (with per-session
state) and an end-of-turn model, loaded by ``vad.type`` from the config. The stage
(``workers.vad_worker``) and the detector use only these; Silero and Smart Turn are
today's implementations (``workers.backends.silero``, ``workers.backends.smart_turn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from workers.config import VadConfig

# One session's speech probability: call with consecutive windows of MODEL_WINDOW samples.
SpeechStream = Callable[[np.ndarray], float]


class SpeechModel(Protocol):
    path: Path

    def stream(self) -> SpeechStream:
        """A new stream with its own state (one per session)."""
        ...


class TurnEndModel(Protocol):
    path: Path

    def probability(self, audio: np.ndarray) -> float:
        """P(the turn is complete) for its audio so far (16 kHz float, pause included)."""
        ...


@dataclass(frozen=True)
class VadModels:
    """Loaded once per process, shared by every session it owns."""

    speech: SpeechModel
    turn_end: TurnEndModel | None  # None: vad.type "silero" (the silence fallback alone)


def load_vad_models(config: VadConfig) -> VadModels:
    from workers.backends.silero import SileroModel
    from workers.backends.smart_turn import SmartTurnModel

    turn_end = None
    if config.type != "silero":
        turn_end = SmartTurnModel(config.smart_turn.model_path, config.device,
                                  config.smart_turn.threads)
    return VadModels(SileroModel(device=config.device), turn_end)

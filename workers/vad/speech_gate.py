"""Is this 32 ms window speech? Silero P(speech) >= ``vad.speech_threshold`` (with
hysteresis), and, with ``vad.quality_gating``, enough power above a tracked noise floor
(``min_snr``) in an input that is not hopelessly noisy (``max_noise_level``). The
noise floor is the quietest window of the last ~3 s (minimum statistics): pauses
between words reach it, a steady hum or fan becomes it, and it needs no help from the
VAD, which such noise can fool."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from workers.backends.audio import level_db
from workers.config import VadConfig

STOP_THRESHOLD_GAP = 0.15  # hysteresis: speech continues down to threshold - gap
FLOOR_WINDOWS = 94  # ~3 s of levels for the noise-floor minimum


class SpeechGate:
    def __init__(self, config: VadConfig, speech_probability: Callable[[np.ndarray], float]):
        self.cfg = config
        self.vad = speech_probability
        self._levels: deque[float] = deque(maxlen=FLOOR_WINDOWS)
        self._speaking = False  # window-level speech state (with hysteresis)

    @property
    def noise_db(self) -> float:
        """The tracked noise floor, dBFS."""
        return min(self._levels) if self._levels else -100.0

    def is_speech(self, window: np.ndarray) -> bool:
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

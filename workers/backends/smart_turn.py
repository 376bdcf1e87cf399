"""Smart Turn v3 (ONNX): probability that the user has finished their turn.

Input: Whisper-style log-mel features of the last 8 s of the turn (front-padded
with zeros to 8 s). The model file ships in ``pipecat-ai``; the features are
computed here with numpy (no torch, no transformers).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from workers.backends.assets import resolve_model
from workers.backends.audio import MODEL_RATE
from workers.backends.onnx import session

RATE = MODEL_RATE
SECONDS = 8
N_FFT, HOP, N_MELS = 400, 160, 80


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log, linear)


@cache
def mel_filters() -> np.ndarray:
    """(n_freqs, n_mels) triangular filters with Slaney area normalisation."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(RATE / 2)),
                                   N_MELS + 2))
    freqs = np.linspace(0, RATE / 2, N_FFT // 2 + 1)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return np.asarray(filters * (2.0 / (upper - lower)), dtype=np.float64)


@cache
def _window() -> np.ndarray:
    return np.asarray(np.hanning(N_FFT + 1)[:-1], dtype=np.float64)  # periodic Hann


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Features of the last 8 s of 16 kHz audio: float32 (80, 800)."""
    samples = RATE * SECONDS
    clip = np.asarray(audio, dtype=np.float64)[-samples:]
    clip = np.pad(clip, (samples - clip.size, 0))
    clip = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
    padded = np.pad(clip, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _window(), axis=-1)) ** 2  # (801, 201)
    mel = power[:-1] @ mel_filters()  # drop the last frame, as Whisper does -> (800, 80)
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return np.asarray(((logs + 4.0) / 4.0).T, dtype=np.float32)


class SmartTurnModel:
    def __init__(self, path: str | None = None, device: str = "cpu", threads: int = 1) -> None:
        self.path: Path = resolve_model(
            path, "pipecat-ai", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx")
        self._session = session(self.path, device=device, threads=threads)

    def probability(self, audio: np.ndarray) -> float:
        """P(turn complete) for the turn's audio so far (16 kHz float, trailing pause included)."""
        features = log_mel(audio)[np.newaxis]
        (logits,) = self._session.run(None, {"input_features": features})
        return float(np.clip(np.asarray(logits).reshape(-1)[0], 0.0, 1.0))

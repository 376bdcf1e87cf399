"""Test audio built from real recordings (voicebus/samples) plus silence and noise.

Deterministic: every random signal is seeded. Times are in seconds at 16 kHz.
"""

from __future__ import annotations

import wave
from functools import cache

import numpy as np

from tests.conftest import ROOT
from workers.backends.audio import float_to_pcm16, pcm16_to_float

RATE = 16_000
SAMPLES = ROOT / "voicebus" / "samples"
# Words of each sample (manifest.tsv), and a point between two words where a
# pause can be inserted without cutting a word.
GO_FORWARD = "cmu_goforward"  # "Go forward ten meters."
ARCTIC = "cmu_arctic_slt_a0009"  # "He turned sharply, | and faced Gregson across the table."
ARCTIC_COMMA_S = 1.31
LIBRIVOX = "librivox_sense_sensibility_0880"  # "He was not an ill disposed young man."


@cache
def speech(name: str) -> np.ndarray:
    with wave.open(str(SAMPLES / f"{name}.wav"), "rb") as w:
        assert w.getframerate() == RATE
        return pcm16_to_float(w.readframes(w.getnframes()))


def silence(seconds: float, db: float = -70.0, seed: int = 0) -> np.ndarray:
    """A quiet room: faint white noise at ``db`` dBFS."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 10 ** (db / 20)).astype(np.float32)


def noise_burst(seconds: float, rms: float = 0.25, seed: int = 1) -> np.ndarray:
    """Loud broadband noise (a door, a fan kicking in, wind on the mic)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * rms).astype(np.float32)


def cough(seconds: float = 0.2, seed: int = 2) -> np.ndarray:
    """A short, sharp, decaying noise burst: cough-like."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    shaped = np.convolve(rng.standard_normal(n), np.hanning(9), "same")
    return (shaped * np.exp(-np.arange(n) / RATE * 25) * 0.5).astype(np.float32)


def blip(seconds: float = 0.2) -> np.ndarray:
    """A fragment of real speech: a word-piece, shorter than any turn."""
    return speech(GO_FORWARD)[int(0.6 * RATE):int((0.6 + seconds) * RATE)].copy()


def join(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts).astype(np.float32)


def with_pause(name: str, at_s: float, pause_s: float) -> np.ndarray:
    clip = speech(name)
    cut = int(at_s * RATE)
    return join(clip[:cut], silence(pause_s, seed=7), clip[cut:])


def pcm(audio: np.ndarray) -> bytes:
    return float_to_pcm16(audio)

"""Audio plumbing shared by the speech stages: PCM16 <-> float, resampling, re-blocking."""

from __future__ import annotations

from collections import deque

import numpy as np
import soxr

MODEL_RATE = 16_000  # every speech model here runs at 16 kHz
MODEL_WINDOW = MODEL_RATE * 32 // 1000  # the VAD's window: 512 samples, 32 ms


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """Little-endian PCM16 -> float32 in [-1, 1)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """float -> PCM16; non-finite samples become silence, out-of-range ones are clipped."""
    clean = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(clean, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()


def resample(audio: np.ndarray, rate: int, to: int = MODEL_RATE) -> np.ndarray:
    """Resample a whole clip (high quality, soxr)."""
    if rate == to or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    out = soxr.resample(audio.astype(np.float32, copy=False), rate, to)
    return np.asarray(out, dtype=np.float32)


class StreamResampler:
    """Resamples a live stream chunk by chunk, keeping the filter state between chunks."""

    def __init__(self, rate: int, to: int = MODEL_RATE) -> None:
        self.rate, self.to = rate, to
        self._stream = None if rate == to else soxr.ResampleStream(rate, to, 1, dtype="float32")

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return chunk
        out = self._stream.resample_chunk(chunk.astype(np.float32, copy=False))
        return np.asarray(out, dtype=np.float32)


class Reblocker:
    """Cuts a stream of chunks of any size into fixed-size blocks (the model's window)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buffer = np.zeros(0, dtype=np.float32)

    def __call__(self, chunk: np.ndarray) -> list[np.ndarray]:
        data = np.concatenate([self._buffer, chunk]) if self._buffer.size else chunk
        whole = data.size // self.size * self.size
        self._buffer = data[whole:].copy()
        return [data[i:i + self.size] for i in range(0, whole, self.size)]


def level_db(block: np.ndarray) -> float:
    """RMS level in dBFS (a full-scale sine is about -3 dB); silence floors at -100."""
    power = float(np.mean(np.square(block, dtype=np.float64))) if block.size else 0.0
    return 10.0 * float(np.log10(max(power, 1e-10)))


def voiced_end(audio: np.ndarray, rate: int, floor_db: float = -40.0) -> int:
    """Samples up to the end of the last 10 ms frame above ``floor_db`` (0: all silent)."""
    frame = max(1, rate // 100)
    n = audio.size // frame
    if n == 0:
        return 0
    frames = audio[: n * frame].reshape(n, frame).astype(np.float64)
    power = np.mean(np.square(frames), axis=1)
    voiced = np.flatnonzero(10.0 * np.log10(np.maximum(power, 1e-10)) > floor_db)
    return int(voiced[-1] + 1) * frame if voiced.size else 0


class ArrivalClock:
    """When audio time reached us: (audio ms at the end of each frame, wall-clock ns it
    arrived) for the recent frames, so a speech end in audio time can be placed on the
    wall clock (latency is measured from it)."""

    def __init__(self, keep: int = 4096) -> None:  # 4096 frames of 20 ms: ~80 s
        self._marks: deque[tuple[int, int]] = deque(maxlen=keep)

    def mark(self, audio_end_ms: int, arrived_ns: int) -> None:
        self._marks.append((audio_end_ms, arrived_ns))

    def wall_ns(self, audio_ms: int) -> int | None:
        """When the frame holding audio time ``audio_ms`` arrived; None if not kept."""
        return next((ns for end_ms, ns in self._marks if end_ms >= audio_ms), None)

"""Silero VAD (ONNX, no torch): speech probability per 32 ms window at 16 kHz.

The model file ships in ``pipecat-ai``. One inference session serves every
session of the process; each audio stream keeps its own recurrent state and
the 64 samples of context the model prepends to every 512-sample window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workers.backends.assets import resolve_model
from workers.backends.audio import MODEL_WINDOW
from workers.backends.onnx import session

MODEL_FILE = "pipecat/audio/vad/data/silero_vad.onnx"
WINDOW = MODEL_WINDOW  # samples at 16 kHz = 32 ms
CONTEXT = 64
# Reset the recurrent state after this much clear non-speech: long silence or
# noise drifts the state so that the next speech is under-reported.
RESET_AFTER_WINDOWS = 63  # ~2 s
CLEAR_NONSPEECH = 0.1


class SileroModel:
    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        self.path: Path = resolve_model(path, "pipecat-ai", MODEL_FILE)
        self._session = session(self.path, device=device, threads=1)
        self._sr = np.array(16_000, dtype=np.int64)

    def stream(self) -> SileroStream:
        return SileroStream(self)

    def run(self, x: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        out, new_state = self._session.run(None, {"input": x, "state": state, "sr": self._sr})
        return float(out[0][0]), new_state


class SileroStream:
    """Per-stream state; call with consecutive 512-sample windows."""

    def __init__(self, model: SileroModel) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._quiet_windows = 0

    def __call__(self, window: np.ndarray) -> float:
        if window.shape != (WINDOW,):
            raise ValueError(f"Silero needs {WINDOW}-sample windows, got {window.shape}")
        x = np.concatenate([self._context, window]).astype(np.float32)[np.newaxis, :]
        prob, self._state = self.model.run(x, self._state)
        self._context = window[-CONTEXT:].astype(np.float32)
        self._quiet_windows = self._quiet_windows + 1 if prob < CLEAR_NONSPEECH else 0
        if self._quiet_windows >= RESET_AFTER_WINDOWS:
            self.reset()
        return prob

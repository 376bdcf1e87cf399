"""The audio the turn detector keeps: whole windows from a sample index on (the pre-roll
while idle; the turn, and an ended turn while it may still be continued)."""

from __future__ import annotations

import numpy as np

from workers.backends.audio import MODEL_WINDOW as WINDOW


class KeptAudio:
    def __init__(self) -> None:
        self._windows: list[np.ndarray] = []
        self.start = 0  # sample index of the first window kept

    def append(self, window: np.ndarray, end: int) -> None:
        """The window that ends at sample ``end`` (the detector's position)."""
        self._windows.append(window.copy())
        self.start = end - len(self._windows) * WINDOW

    def trim_to(self, sample: int) -> None:
        """Drop audio before ``sample`` (whole windows)."""
        while self._windows and self.start + WINDOW <= sample:
            self._windows.pop(0)
            self.start += WINDOW

    def span(self, begin: int, end: int) -> np.ndarray:
        """Samples ``begin``..``end`` as far as they are kept."""
        audio = np.concatenate(self._windows) if self._windows else np.zeros(0, np.float32)
        lo = max(0, begin - self.start)
        return audio[lo:max(lo, end - self.start)]

"""How many frames a second a device may send: a flood is closed with 4008, but the
burst of frames that waited in the socket while Redis was away is not a flood."""

from __future__ import annotations

BACKLOG_AFTER_S = 0.2  # a publish blocked this long leaves a burst of frames behind it


class FrameRate:
    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.window_start, self.frames = now, 0
        self.backlog_until = 0.0  # until then, frames held back arrive at once

    def allows(self, now: float) -> bool:
        """Count one frame; False when it is one too many for its second."""
        if now - self.window_start >= 1.0:
            self.window_start, self.frames = now, 0
        self.frames += 1
        return self.frames <= self.limit or now < self.backlog_until

    def held_back(self, waited_s: float, now: float) -> None:
        """A publish waited ``waited_s``: what the device sent meanwhile comes at once now,
        and drains long before as much time again has passed."""
        if waited_s > BACKLOG_AFTER_S:
            self.backlog_until = now + waited_s

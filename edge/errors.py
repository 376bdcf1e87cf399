"""The one error the edge client raises: what a person at the device can act on.

Its own module so that the audio devices (``edge.audio_io``) and the session
(``edge.client``) raise the same type without importing each other; the CLI turns
it into a one-line message and exit code 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.client_session import TurnResult


class ClientError(Exception):
    """The session could not run or ended badly; the message says why in plain words.

    ``turns`` holds the turns completed (or begun) before the failure, so that a
    caller such as the demo can still report them.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.turns: list[TurnResult] = []


class AudioDeviceError(ClientError):
    """No usable microphone or speaker (or no sounddevice/PortAudio to reach one)."""

"""The shared language of voicebus: every event type, versioned, and its codec.

This package imports nothing else of the project.
"""

from schemas.codec import (
    DEFAULT_MAX_EVENT_BYTES,
    EVENT_TYPES,
    SUPPORTED_VERSIONS,
    SchemaError,
    decode,
    encode,
)
from schemas.events import (
    ALL_EVENTS,
    AudioChunk,
    AudioFrame,
    DeadLetter,
    Event,
    Heard,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TextChunk,
    Transcript,
    TurnCancelled,
    TurnEnded,
    TurnEvent,
    now_ns,
)

__all__ = [
    "ALL_EVENTS",
    "DEFAULT_MAX_EVENT_BYTES",
    "EVENT_TYPES",
    "SUPPORTED_VERSIONS",
    "AudioChunk",
    "AudioFrame",
    "DeadLetter",
    "Event",
    "Heard",
    "SchemaError",
    "SessionEnded",
    "SessionStarted",
    "SpeechStarted",
    "SpeechStopped",
    "TextChunk",
    "Transcript",
    "TurnCancelled",
    "TurnEnded",
    "TurnEvent",
    "decode",
    "encode",
    "now_ns",
]

"""voicebus: a real-time voice AI agent built as workers on Redis Streams."""

__version__ = "0.1.0"

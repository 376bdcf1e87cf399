"""voicebus workers: independent processes that talk over Redis Streams."""

"""MessagePack encoding of events, and decoding that rejects bad input early.

``decode`` raises ``SchemaError`` (never anything else) for bytes that are not an
event we understand, so a worker can dead-letter the entry with a reason instead
of failing somewhere further down.
"""

from __future__ import annotations

from typing import Any, Final, Union

import msgspec

from schemas.events import ALL_EVENTS, Event

# Whole encoded event. A 60 s utterance at 16 kHz PCM16 is ~1.9 MB.
DEFAULT_MAX_EVENT_BYTES: Final = 4 * 1024 * 1024

# Versions of each type this build can read. Writers always write ``VERSION``.
SUPPORTED_VERSIONS: Final[dict[str, frozenset[int]]] = {
    str(cls.__struct_config__.tag): frozenset({cls.VERSION}) for cls in ALL_EVENTS
}
EVENT_TYPES: Final[dict[str, type[Event]]] = {
    str(cls.__struct_config__.tag): cls for cls in ALL_EVENTS
}


class SchemaError(ValueError):
    """Bytes that are not a valid event. ``kind`` is a short machine-readable cause."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class _Header(msgspec.Struct, gc=False):
    """Just enough of an event to route it; every other key is ignored."""

    type: str
    v: int


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(_Header)
_event_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    Union[ALL_EVENTS]  # noqa: UP007  (a runtime union of classes)
)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(raw: bytes, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Event:
    """Decode one event, or raise ``SchemaError`` saying what is wrong with it."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise SchemaError("undecodable", f"expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise SchemaError("oversized", f"{len(raw)} bytes exceeds the {max_bytes}-byte limit")
    try:
        header = _header_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise SchemaError("invalid", f"event header: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SchemaError("undecodable", f"not MessagePack: {exc}") from None
    versions = SUPPORTED_VERSIONS.get(header.type)
    if versions is None:
        raise SchemaError("unknown_type", f"unknown event type {header.type!r}")
    if header.v not in versions:
        raise SchemaError(
            "unsupported_version",
            f"{header.type} v{header.v} is not supported (this build reads {sorted(versions)})",
        )
    try:
        event: Event = _event_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise SchemaError("invalid", f"{header.type} v{header.v}: {exc}") from None
    return event

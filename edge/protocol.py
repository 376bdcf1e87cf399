"""The device <-> gateway WebSocket protocol (v1): what crosses the network.

One WebSocket connection is one session. The device authenticates at the
handshake with a token (``edge.auth``): ``Authorization: Bearer <token>``, or
``?token=<token>`` in the URL for clients that cannot set headers. A missing,
bad, expired or tampered token is refused with HTTP 401 before any WebSocket
traffic. The user id comes from the token, never from a message.

Frames:

* **binary, device -> gateway**: microphone audio, PCM16 little-endian mono at the
  rate the device declared in ``start``, in capture order.
* **binary, gateway -> device**: the agent's speech, PCM16 mono at ``out_rate``
  (from ``ready``), for the turn named by the last ``audio`` message, in play order,
  each byte once.
* **text, both ways**: one JSON object per frame with a ``type`` (below).

Device -> gateway:

* ``{"type": "start", "sample_rate": 16000}`` - first message; audio may follow.
* ``{"type": "played", "turn_id": T, "samples": N}`` - the device has played the
  first N samples of turn T's audio (sent as it plays; at least at the end of a turn
  and when it flushes). The gateway uses it to store only what the user heard.
* ``{"type": "stop"}`` - the user is done; the gateway ends the session and closes.

Gateway -> device:

* ``{"type": "ready", "session_id": S, "user_id": U, "out_rate": 24000, "limits": {...}}``
* ``{"type": "speech_started", "turn_id": T}`` - the user started speaking.
* ``{"type": "transcript", "turn_id": T, "text": ..., "final": true}``
* ``{"type": "reply", "turn_id": T, "seq": n, "text": ..., "last": bool}`` - reply text.
* ``{"type": "audio", "turn_id": T, "sample_rate": R}`` - the binary frames that
  follow are turn T's speech (sent before its first audio).
* ``{"type": "flush", "turn_id": T, "reason": "barge-in"}`` - drop every buffered
  sample of turn T now (the user interrupted it); none of its audio follows.
* ``{"type": "turn_done", "turn_id": T, "interrupted": bool, "trace_id": ...,
  "latency_ms": {...}}`` - all of turn T's audio has been sent (or it was cut off).
* ``{"type": "error", "reason": ...}`` - sent before the gateway closes on an error.

Close codes (with a reason text): 1000 normal, 1008 policy (bad message), 1009 frame
too large, 4002 session too long, 4003 idle too long, 4008 too many frames per
second, 1011 server error.

Each control message is a frozen dataclass here (``Start``, ``Played``, ``Stop`` from
the device; ``Ready``, ``SpeechStartedMessage``, ``TranscriptMessage``, ``Reply``,
``Audio``, ``Flush``, ``TurnDone``, ``Error`` from the gateway); ``dump`` writes one,
``parse_device_message`` checks and reads what a device sent.

This module is stdlib-only: the device side imports it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, Final

VERSION: Final = 1
PATH: Final = "/v1/session"


class Close(IntEnum):
    """The WebSocket close codes the gateway sends (RFC 6455's, then ours in 4000-4999)."""
    NORMAL = 1000
    POLICY = 1008
    TOO_BIG = 1009
    SERVER_ERROR = 1011
    SESSION_TOO_LONG = 4002
    IDLE = 4003
    RATE = 4008


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text says what is wrong."""


# -- the control messages, one struct each (stdlib dataclasses: the device imports this) --
@dataclass(frozen=True)
class Start:
    sample_rate: int
    type: ClassVar[str] = "start"


@dataclass(frozen=True)
class Played:
    turn_id: str
    samples: int
    type: ClassVar[str] = "played"


@dataclass(frozen=True)
class Stop:
    type: ClassVar[str] = "stop"


DeviceMessage = Start | Played | Stop
DEVICE_MESSAGES: Final[dict[str, type[DeviceMessage]]] = {
    m.type: m for m in (Start, Played, Stop)}


@dataclass(frozen=True)
class Ready:
    session_id: str
    user_id: str
    out_rate: int
    limits: dict[str, float]
    version: int = VERSION
    type: ClassVar[str] = "ready"


@dataclass(frozen=True)
class SpeechStartedMessage:
    turn_id: str
    continues: str = ""  # the dropped turn this speech goes on with
    type: ClassVar[str] = "speech_started"


@dataclass(frozen=True)
class TranscriptMessage:
    turn_id: str
    text: str
    final: bool = True
    failed: bool = False
    type: ClassVar[str] = "transcript"


@dataclass(frozen=True)
class Reply:
    turn_id: str
    seq: int
    text: str
    last: bool = False
    type: ClassVar[str] = "reply"


@dataclass(frozen=True)
class Audio:
    turn_id: str
    sample_rate: int
    type: ClassVar[str] = "audio"


@dataclass(frozen=True)
class Flush:
    turn_id: str
    reason: str  # "barge-in" or "continued"
    type: ClassVar[str] = "flush"


@dataclass(frozen=True)
class TurnDone:
    turn_id: str
    interrupted: bool
    continued: bool
    continues: str
    trace_id: str
    rule: str
    latency_ms: dict[str, float]
    type: ClassVar[str] = "turn_done"


@dataclass(frozen=True)
class Error:
    reason: str
    type: ClassVar[str] = "error"


GatewayMessage = (Ready | SpeechStartedMessage | TranscriptMessage | Reply | Audio | Flush
                  | TurnDone | Error)
Message = DeviceMessage | GatewayMessage


def dump(message: Message) -> str:
    """A message as it goes on the wire: its fields and its ``type``."""
    return json.dumps({"type": message.type, **asdict(message)}, separators=(",", ":"))


def parse_device_message(text: str | bytes, max_bytes: int = 4096) -> DeviceMessage:
    """A device's JSON message, checked: a known type with its fields, typed."""
    if len(text) > max_bytes:
        raise ProtocolError(f"control message of {len(text)} bytes (at most {max_bytes})")
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a control message must be a JSON object")
    kind = message.get("type")
    cls = DEVICE_MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r} "
                            f"(expected one of {', '.join(DEVICE_MESSAGES)})")
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = message.get(f.name)
        want = {"int": int, "str": str}[str(f.type)]
        if not isinstance(value, want) or isinstance(value, bool):
            raise ProtocolError(f"{kind}: field {f.name!r} must be {want.__name__}, "
                                f"got {value!r}")
        values[f.name] = value
    return cls(**values)

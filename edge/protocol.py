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

This module is stdlib-only: the device side imports it.
"""

from __future__ import annotations

import json
from typing import Any, Final

VERSION: Final = 1
PATH: Final = "/v1/session"

CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_SERVER_ERROR: Final = 1011
CLOSE_SESSION_TOO_LONG: Final = 4002
CLOSE_IDLE: Final = 4003
CLOSE_RATE: Final = 4008

# Messages a device may send, and the fields each must have (with their types).
DEVICE_MESSAGES: Final[dict[str, dict[str, type | tuple[type, ...]]]] = {
    "start": {"sample_rate": int},
    "played": {"turn_id": str, "samples": int},
    "stop": {},
}


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text says what is wrong."""


def dump(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def parse_device_message(text: str | bytes, max_bytes: int = 4096) -> dict[str, Any]:
    """A device's JSON message, checked: a dict with a known type and typed fields."""
    if len(text) > max_bytes:
        raise ProtocolError(f"control message of {len(text)} bytes (at most {max_bytes})")
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a control message must be a JSON object")
    kind = message.get("type")
    fields = DEVICE_MESSAGES.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown message type {kind!r} "
                            f"(expected one of {', '.join(DEVICE_MESSAGES)})")
    for name, types in fields.items():
        value = message.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"{kind}: field {name!r} must be "
                                f"{getattr(types, '__name__', types)}, got {value!r}")
    return message

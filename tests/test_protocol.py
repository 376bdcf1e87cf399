"""The edge protocol's messages: one struct each, on the wire as JSON with a ``type``."""

from __future__ import annotations

import json

import pytest

from edge import protocol


@pytest.mark.parametrize("message", [protocol.Start(16000), protocol.Played("t1", 4800),
                                     protocol.Stop()])
def test_device_messages_go_through_the_wire_unchanged(message: protocol.DeviceMessage) -> None:
    wire = protocol.dump(message)
    assert json.loads(wire)["type"] == message.type
    assert protocol.parse_device_message(wire) == message


def test_gateway_messages_carry_their_type_and_fields() -> None:
    done = json.loads(protocol.dump(protocol.TurnDone("t1", True, False, "", "abc", "smart_turn",
                                                      {"asr": 120.0})))
    assert done == {"type": "turn_done", "turn_id": "t1", "interrupted": True,
                    "continued": False, "continues": "", "trace_id": "abc",
                    "rule": "smart_turn", "latency_ms": {"asr": 120.0}}
    ready = json.loads(protocol.dump(protocol.Ready("s1", "ann", 24000, {"idle_timeout_s": 30})))
    assert ready["type"] == "ready" and ready["version"] == protocol.VERSION


@pytest.mark.parametrize(("text", "says"), [
    ('{"type": "played", "turn_id": "t", "samples": true}', "'samples' must be int"),
    ('{"type": "start", "sample_rate": "16000"}', "'sample_rate' must be int"),
    ('{"type": "hello"}', "unknown message type 'hello'"),
    ("[1, 2]", "must be a JSON object"),
    ("{not json", "not JSON"),
    ('{"type": "stop", "pad": "' + "x" * 5000 + '"}', "at most 4096"),
])
def test_a_bad_device_message_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=says):
        protocol.parse_device_message(text)

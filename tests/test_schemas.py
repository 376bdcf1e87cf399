"""Events round-trip through MessagePack, and bad bytes are refused with a clear error."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    ALL_EVENTS,
    AudioChunk,
    AudioFrame,
    DeadLetter,
    Event,
    Heard,
    SchemaError,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TextChunk,
    Transcript,
    TurnCancelled,
    TurnEnded,
    decode,
    encode,
)

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SAMPLES = [
    AudioFrame(session_id="s1", seq=7, sample_rate=16000, pcm=b"\x01\x00" * 512,
               captured_ns=123, traceparent=TP),
    SessionStarted(session_id="s1", user_id="u1", sample_rate=48000),
    SessionEnded(session_id="s1", reason="client closed"),
    SpeechStarted(session_id="s1", turn_id="t1", audio_ms=250),
    SpeechStopped(session_id="s1", turn_id="t1", audio_ms=2770),
    TurnEnded(session_id="s1", turn_id="t1", sample_rate=16000, audio=b"\0\0" * 100,
              speech_start_ms=250, speech_end_ms=2770, decided_ms=2990, rule="smart_turn",
              probability=0.93),
    Transcript(session_id="s1", turn_id="t1", text="Go forward ten meters.", final=True),
    TextChunk(session_id="s1", turn_id="t1", seq=2, text="Sure.", last=True),
    AudioChunk(session_id="s1", turn_id="t1", seq=3, sample_rate=24000, pcm=b"\0\0" * 24),
    TurnCancelled(session_id="s1", turn_id="t1", reason="barge-in"),
    Heard(session_id="s1", turn_id="t1", user_id="u1", text="Sure, the",
          played_samples=9600, sent_samples=48000),
    DeadLetter(stream="vb:q:asr", entry_id="1-0", group="asr", consumer="c",
               reason="undecodable", payload=b"\xc1"),
]


def test_every_event_type_has_a_sample() -> None:
    assert {type(e) for e in SAMPLES} == set(ALL_EVENTS)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.type)
def test_round_trip(event: Event) -> None:
    raw = encode(event)
    assert decode(raw) == event
    # The wire form is plain MessagePack: any msgpack reader sees the tag and version.
    plain = msgpack.unpackb(raw)
    assert (plain["type"], plain["v"]) == (event.type, 1)
    assert plain["session_id"] == event.session_id


def test_events_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SAMPLES[0].seq = 8  # type: ignore[misc]


def _raw(**fields: object) -> bytes:
    return msgpack.packb(fields)


FRAME = {"type": "audio_frame", "v": 1, "session_id": "s1", "sample_rate": 16000,
         "pcm": b"\0\0"}


@pytest.mark.parametrize(("raw", "kind", "words"), [
    (b"\xc1\xc1", "undecodable", "MessagePack"),
    (b"", "undecodable", ""),
    (msgpack.packb([1, 2, 3]), "invalid", "header"),
    (_raw(type="telepathy", v=1, session_id="s1"), "unknown_type", "telepathy"),
    (_raw(**{**FRAME, "v": 2}), "unsupported_version", "v2"),
    (_raw(**{k: v for k, v in FRAME.items() if k != "sample_rate"}), "invalid", "sample_rate"),
    (_raw(**{**FRAME, "sample_rate": "fast"}), "invalid", "sample_rate"),
    (_raw(**{**FRAME, "sample_rate": 4000}), "invalid", "sample_rate"),
    (_raw(**{**FRAME, "pcm": b"\0\0\0"}), "invalid", "even number"),
    (_raw(**{**FRAME, "pcm": b"\0" * 200_000}), "invalid", "pcm"),
    (_raw(**{**FRAME, "session_id": ""}), "invalid", "session_id"),
    (_raw(**{**FRAME, "session_id": "a b/../"}), "invalid", "session_id"),
    (_raw(**{**FRAME, "traceparent": "not-a-trace"}), "invalid", "traceparent"),
    (_raw(type="transcript", v=1, session_id="s1", text="hi"), "invalid", "turn_id"),
])
def test_bad_input_is_refused_with_a_reason(raw: bytes, kind: str, words: str) -> None:
    with pytest.raises(SchemaError) as err:
        decode(raw)
    assert err.value.kind == kind
    assert words in str(err.value)


def test_oversized_events_are_refused_before_decoding() -> None:
    event = TurnEnded(session_id="s", turn_id="t", sample_rate=16000, audio=b"\0" * 2_000_000,
                      speech_start_ms=0, speech_end_ms=1, decided_ms=1)
    raw = encode(event)
    assert decode(raw) == event
    with pytest.raises(SchemaError) as err:
        decode(raw, max_bytes=1_000_000)
    assert err.value.kind == "oversized"


def test_unknown_extra_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode(_raw(**FRAME, added_in_a_later_release=True)).session_id == "s1"


def test_invalid_events_cannot_be_constructed() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"session_id": "s", "sample_rate": 16000, "pcm": b"\0"}, AudioFrame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_schema_error(raw: bytes) -> None:
    try:
        decode(raw)
    except SchemaError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["type", "v", "session_id", "turn_id", "seq", "pcm", "sample_rate", "text",
                     "audio", "rule"]),
    st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=20), st.binary(max_size=20),
              st.none(), st.booleans(),
              st.sampled_from(["audio_frame", "transcript", "turn_ended"]))))
def test_any_map_decodes_or_raises_schema_error(fields: dict[str, object]) -> None:
    try:
        event = decode(msgpack.packb(fields))
    except SchemaError:
        return
    assert decode(encode(event)) == event

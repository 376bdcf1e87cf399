#!/usr/bin/env python
"""Codec cost: our msgspec codec against plain msgpack plus hand-written validation.

    python -m bench.codec [--out bench/results/codec.json] [--repeat 7]

For three events (an AudioFrame with 1024 bytes of PCM, a Transcript, a TurnEnded
carrying 3 s of 16 kHz PCM16 = 96 000 bytes) it times one round trip,
encode + decode, two ways:

* ``msgspec``: ``schemas.encode`` / ``schemas.decode`` as the workers use them
  (decode reads the header, checks the type and version, then decodes into the
  typed, frozen Struct, validating every field's constraints);
* ``msgpack+check``: ``msgpack.packb`` of an equivalent dict, ``msgpack.unpackb``,
  then a hand-written check of the same fields and constraints that builds a
  frozen dataclass.

Reference rows, not alternatives: ``msgpack (no check)`` is packb + unpackb of
the dict only, the floor for any msgpack codec; ``msgspec (no header)`` skips
our header/version pre-check and decodes straight into the tagged union.
Both directions are cross-checked first: each side decodes the other's bytes to
the same fields.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Union

import msgpack
import msgspec

import schemas
from schemas import ALL_EVENTS, AudioFrame, Transcript, TurnEnded

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------
# The hand-written side: frozen dataclasses and explicit checks of the same
# constraints schemas/events.py declares with msgspec.Meta.
# ----------------------------------------------------------------------------
_ID = re.compile(r"^[A-Za-z0-9._:@-]+$")
_OPT_ID = re.compile(r"^$|^[A-Za-z0-9._:@-]+$")
_TRACEPARENT = re.compile(r"^$|^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class Invalid(ValueError):
    pass


def _int(d: dict[str, Any], key: str, default: int | None = None, lo: int | None = None,
         hi: int | None = None) -> int:
    value = d.get(key, default)
    if type(value) is not int:  # bool is not an int here, as in msgspec
        raise Invalid(f"{key}: expected int")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise Invalid(f"{key}: out of range")
    return value


def _str(d: dict[str, Any], key: str, default: str | None = None, max_len: int | None = None,
         pattern: re.Pattern[str] | None = None, min_len: int = 0) -> str:
    value = d.get(key, default)
    if type(value) is not str:
        raise Invalid(f"{key}: expected str")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise Invalid(f"{key}: bad length")
    if pattern is not None and not pattern.match(value):
        raise Invalid(f"{key}: does not match")
    return value


def _id(d: dict[str, Any], key: str) -> str:
    return _str(d, key, None, 128, _ID, 1)


def _opt_id(d: dict[str, Any], key: str) -> str:
    return _str(d, key, "", 128, _OPT_ID)


def _bytes(d: dict[str, Any], key: str, default: bytes | None, max_len: int,
           even: bool = False) -> bytes:
    value = d.get(key, default)
    if type(value) is not bytes:
        raise Invalid(f"{key}: expected bytes")
    if len(value) > max_len:
        raise Invalid(f"{key}: too long")
    if even and len(value) % 2:
        raise Invalid(f"{key}: odd PCM16 length")
    return value


def _bool(d: dict[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if type(value) is not bool:
        raise Invalid(f"{key}: expected bool")
    return value


def _header(d: Any, tag: str) -> None:
    if type(d) is not dict:
        raise Invalid("expected a map")
    if d.get("type") != tag:
        raise Invalid("wrong type")
    if d.get("v", 1) != 1:
        raise Invalid("unsupported version")


def _common(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "session_id": _id(d, "session_id"),
        "seq": _int(d, "seq", 0, 0, 2**53),
        "created_ns": _int(d, "created_ns"),
        "traceparent": _str(d, "traceparent", "", 55, _TRACEPARENT),
        "tracestate": _str(d, "tracestate", "", 512),
    }


@dataclass(frozen=True, slots=True)
class _DcEvent:
    """The envelope every event carries."""
    session_id: str
    seq: int
    created_ns: int
    traceparent: str
    tracestate: str

    def _head(self, tag: str) -> dict[str, Any]:
        return {"type": tag, "v": 1, "session_id": self.session_id, "seq": self.seq,
                "created_ns": self.created_ns, "traceparent": self.traceparent,
                "tracestate": self.tracestate}


@dataclass(frozen=True, slots=True)
class DcAudioFrame(_DcEvent):
    sample_rate: int
    pcm: bytes
    captured_ns: int
    offset_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {**self._head("audio_frame"), "sample_rate": self.sample_rate,
                "pcm": self.pcm, "captured_ns": self.captured_ns, "offset_ms": self.offset_ms}

    @classmethod
    def from_dict(cls, d: Any) -> DcAudioFrame:
        _header(d, "audio_frame")
        return cls(**_common(d), sample_rate=_int(d, "sample_rate", None, 8000, 48000),
                   pcm=_bytes(d, "pcm", None, 131_072, even=True),
                   captured_ns=_int(d, "captured_ns", 0), offset_ms=_int(d, "offset_ms", 0, 0))


@dataclass(frozen=True, slots=True)
class DcTranscript(_DcEvent):
    turn_id: str
    text: str
    final: bool
    failed: bool
    error: str
    language: str
    user_id: str
    continues: str

    def to_dict(self) -> dict[str, Any]:
        return {**self._head("transcript"), "turn_id": self.turn_id, "text": self.text,
                "final": self.final, "failed": self.failed, "error": self.error,
                "language": self.language, "user_id": self.user_id,
                "continues": self.continues}

    @classmethod
    def from_dict(cls, d: Any) -> DcTranscript:
        _header(d, "transcript")
        return cls(**_common(d), turn_id=_id(d, "turn_id"),
                   text=_str(d, "text", None, 16_384), final=_bool(d, "final", True),
                   failed=_bool(d, "failed", False), error=_str(d, "error", "", 1_024),
                   language=_str(d, "language", "", 16), user_id=_opt_id(d, "user_id"),
                   continues=_opt_id(d, "continues"))


@dataclass(frozen=True, slots=True)
class DcTurnEnded(_DcEvent):
    turn_id: str
    sample_rate: int
    audio: bytes
    audio_ref: str
    speech_start_ms: int
    speech_end_ms: int
    decided_ms: int
    rule: str
    probability: float | None
    speculative: bool
    user_id: str
    continues: str
    text_verdict: str
    tentative: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self._head("turn_ended"), "turn_id": self.turn_id,
                "sample_rate": self.sample_rate, "audio": self.audio,
                "audio_ref": self.audio_ref, "speech_start_ms": self.speech_start_ms,
                "speech_end_ms": self.speech_end_ms, "decided_ms": self.decided_ms,
                "rule": self.rule, "probability": self.probability,
                "speculative": self.speculative, "user_id": self.user_id,
                "continues": self.continues, "text_verdict": self.text_verdict,
                "tentative": self.tentative}

    @classmethod
    def from_dict(cls, d: Any) -> DcTurnEnded:
        _header(d, "turn_ended")
        probability = d.get("probability")
        if probability is not None:
            if type(probability) is int:
                probability = float(probability)
            if type(probability) is not float or not 0.0 <= probability <= 1.0:
                raise Invalid("probability: expected a float in [0, 1]")
        start = _int(d, "speech_start_ms", None, 0)
        end = _int(d, "speech_end_ms", None, 0)
        if end < start:
            raise Invalid("speech_end_ms is before speech_start_ms")
        return cls(**_common(d), turn_id=_id(d, "turn_id"),
                   sample_rate=_int(d, "sample_rate", None, 8000, 48000),
                   audio=_bytes(d, "audio", b"", 3_145_728, even=True),
                   audio_ref=_str(d, "audio_ref", "", 256), speech_start_ms=start,
                   speech_end_ms=end, decided_ms=_int(d, "decided_ms", None, 0),
                   rule=_str(d, "rule", "", 64), probability=probability,
                   speculative=_bool(d, "speculative", False), user_id=_opt_id(d, "user_id"),
                   continues=_opt_id(d, "continues"),
                   text_verdict=_str(d, "text_verdict", "", 256),
                   tentative=_bool(d, "tentative", False))


_DATACLASSES: dict[str, Any] = {"audio_frame": DcAudioFrame, "transcript": DcTranscript,
                                "turn_ended": DcTurnEnded}
_MAX_BYTES = schemas.DEFAULT_MAX_EVENT_BYTES


def mp_encode(obj: Any) -> bytes:
    return msgpack.packb(obj.to_dict(), use_bin_type=True)  # type: ignore[no-any-return]


def mp_decode(raw: bytes) -> Any:
    if len(raw) > _MAX_BYTES:
        raise Invalid("oversized")
    d = msgpack.unpackb(raw, raw=False)
    tag = d.get("type") if type(d) is dict else None
    cls = _DATACLASSES.get(tag) if type(tag) is str else None
    if cls is None:
        raise Invalid("unknown type")
    return cls.from_dict(d)


# ----------------------------------------------------------------------------
# Events and timing
# ----------------------------------------------------------------------------
def sample_events() -> dict[str, schemas.Event]:
    trace = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    return {
        "AudioFrame (1024 B PCM)": AudioFrame(
            session_id="sess-3f2a9c", seq=1234, sample_rate=16_000, pcm=os.urandom(1024),
            captured_ns=time.time_ns(), traceparent=trace),
        "Transcript": Transcript(
            session_id="sess-3f2a9c", turn_id="turn-7b1e02", seq=3, traceparent=trace,
            text="Could you tell me what the weather will be like in Lisbon tomorrow "
                 "afternoon, and whether I should bring an umbrella?", language="en"),
        "TurnEnded (3 s audio)": TurnEnded(
            session_id="sess-3f2a9c", turn_id="turn-7b1e02", seq=2, sample_rate=16_000,
            audio=os.urandom(3 * 16_000 * 2), speech_start_ms=1_200, speech_end_ms=4_200,
            decided_ms=4_400, rule="smart_turn", probability=0.93, traceparent=trace),
    }


def as_dataclass(event: schemas.Event) -> Any:
    fields = msgspec.structs.asdict(event)
    cls = _DATACLASSES[event.type]
    return cls(**{k: fields[k] for k in cls.__dataclass_fields__})


def cross_check(event: schemas.Event, dc: Any) -> None:
    """Both codecs describe the same wire form: each decodes the other's bytes."""
    ours = schemas.encode(event)
    theirs = mp_encode(dc)
    assert msgpack.unpackb(ours, raw=False) == dc.to_dict(), "wire forms differ"
    assert mp_decode(ours) == dc, "hand-written decoder disagrees with msgspec's bytes"
    assert schemas.decode(theirs) == event, "msgspec disagrees with msgpack's bytes"


_union_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    Union[ALL_EVENTS]  # noqa: UP007
)


def ms_round_trip(event: schemas.Event) -> object:
    return schemas.decode(schemas.encode(event))


def ms_union_round_trip(event: schemas.Event) -> object:
    return _union_decoder.decode(schemas.encode(event))


def mp_round_trip(obj: Any) -> object:
    return mp_decode(mp_encode(obj))


def mp_plain_round_trip(d: dict[str, Any]) -> object:
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False)


def time_all(fns: list[Callable[[], object]], repeat: int,
             target_s: float = 0.05) -> list[dict[str, float]]:
    """µs per call of each function: best and median of ``repeat`` runs of ~target_s.

    The runs are interleaved (one run of every function, then the next round), so a
    slow spell of a shared machine hits every codec alike instead of one of them.
    """
    timers = [timeit.Timer(fn) for fn in fns]
    numbers = []
    for timer in timers:
        number, took = timer.autorange()
        numbers.append(max(1, int(number * target_s / took)))
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, timer in enumerate(timers):
            runs[i].append(timer.timeit(numbers[i]) / numbers[i] * 1e6)
    return [{"best": min(r), "median": statistics.median(r), "calls_per_run": n}
            for r, n in zip(runs, numbers, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/codec.json")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], str, Callable[[], object]]] = []
    for name, event in sample_events().items():
        dc = as_dataclass(event)
        cross_check(event, dc)
        raw_ms = schemas.encode(event)
        raw_mp = mp_encode(dc)
        d = dc.to_dict()
        cases: dict[str, dict[str, Callable[[], object]]] = {
            "msgspec": {
                "encode": partial(schemas.encode, event),
                "decode": partial(schemas.decode, raw_ms),
                "round_trip": partial(ms_round_trip, event),
            },
            "msgpack+check": {
                "encode": partial(mp_encode, dc),
                "decode": partial(mp_decode, raw_mp),
                "round_trip": partial(mp_round_trip, dc),
            },
            "msgpack (no check)": {"round_trip": partial(mp_plain_round_trip, d)},
            "msgspec (no header)": {"round_trip": partial(ms_union_round_trip, event)},
        }
        for codec, ops in cases.items():
            row: dict[str, Any] = {"event": name, "codec": codec,
                                   "bytes": len(raw_ms if "msgspec" in codec else raw_mp),
                                   "us": {}}
            rows.append(row)
            pending.extend((row, op, fn) for op, fn in ops.items())
    for (row, op, _fn), timing in zip(
            pending, time_all([fn for _r, _o, fn in pending], args.repeat), strict=True):
        row["us"][op] = timing

    head = (f"{'event':<24} {'codec':<20} {'bytes':>6} {'round trip µs':>13} "
            f"{'(median)':>9} {'encode µs':>9} {'decode µs':>9} {'vs msgspec':>10}")
    print(head)
    print("-" * len(head))
    base: dict[str, float] = {}
    for row in rows:
        rt = row["us"]["round_trip"]["best"]
        if row["codec"] == "msgspec":
            base[row["event"]] = rt
        enc = row["us"].get("encode", {}).get("best")
        dec = row["us"].get("decode", {}).get("best")
        ratio = rt / base[row["event"]]
        row["round_trip_vs_msgspec"] = ratio
        print(f"{row['event']:<24} {row['codec']:<20} {row['bytes']:>6} {rt:>13.2f} "
              f"{row['us']['round_trip']['median']:>9.2f} "
              f"{'-' if enc is None else format(enc, '.2f'):>9} "
              f"{'-' if dec is None else format(dec, '.2f'):>9} {ratio:>9.2f}x")
    print(f"µs per call, best (and median) of {args.repeat} interleaved runs of ~50 ms each, "
          "one core; encode and decode also timed on their own")

    report = {
        "benchmark": "codec",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": os.cpu_count(), "msgspec": msgspec.__version__,
                 "msgpack": ".".join(map(str, msgpack.version))},
        "repeat": args.repeat,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Every event that travels on the bus: small, frozen, typed, versioned.

Each event is a ``msgspec.Struct`` encoded as MessagePack. The wire form is a map
whose ``type`` key names the event (the tag) and whose ``v`` key is the schema
version of that type. Rules for changing a type:

* adding an optional field (with a default) keeps ``v``: older readers ignore it;
* renaming, removing or re-typing a field bumps ``v`` and adds the new version to
  ``SUPPORTED_VERSIONS`` only once every reader understands it.

Audio is PCM16 little-endian mono throughout. Times: ``created_ns`` is the
producer's wall clock (``time.time_ns()``) for latency measurement; positions in a
session's audio are in milliseconds of *audio time* (``*_ms``), derived from
sample counts, never from a wall clock.
"""

from __future__ import annotations

import time
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

# Bounds on what may enter the bus. They protect every stage from a producer
# that is buggy or hostile; the codec also caps the whole encoded event.
Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Seq = Annotated[int, Meta(ge=0, le=2**53)]
SampleRate = Annotated[int, Meta(ge=8000, le=48000)]
Millis = Annotated[int, Meta(ge=0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Text = Annotated[str, Meta(max_length=16_384)]
Reason = Annotated[str, Meta(max_length=1_024)]
TraceParent = Annotated[
    str, Meta(max_length=55, pattern=r"^$|^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
]
TraceState = Annotated[str, Meta(max_length=512)]
# One audio frame: up to ~1.3 s at 48 kHz. Larger frames are a client bug.
FramePcm = Annotated[bytes, Meta(max_length=131_072)]
# The user a turn belongs to: set by the gateway from the device's token (never from
# the payload) on SessionStarted and carried on every event down to the LLM stage,
# which keys memory by it. Empty: unknown (memory then falls back to the session).
UserId = Annotated[str, Meta(max_length=128, pattern=r"^$|^[A-Za-z0-9._:@-]+$")]
# An utterance or synthesized chunk: 60 s at 16 kHz is 1.92 MB; allow ~3 MB.
UtterancePcm = Annotated[bytes, Meta(max_length=3_145_728)]


def now_ns() -> int:
    return time.time_ns()


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Fields every event carries."""

    VERSION: ClassVar[int] = 1

    v: int = 1
    session_id: Id
    seq: Seq = 0
    created_ns: int = msgspec.field(default_factory=now_ns)
    # W3C trace context, so one turn is one trace across every process.
    traceparent: TraceParent = ""
    tracestate: TraceState = ""

    @property
    def type(self) -> str:
        return str(type(self).__struct_config__.tag)


class TurnEvent(Event, frozen=True, kw_only=True):
    """An event that belongs to one turn of a session."""

    turn_id: Id


def _check_pcm16(pcm: bytes) -> None:
    if len(pcm) % 2:
        raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(pcm)}")


class AudioFrame(Event, frozen=True, kw_only=True, tag="audio_frame"):
    """A slice of the user's microphone audio, in capture order (``seq``)."""

    sample_rate: SampleRate
    pcm: FramePcm
    captured_ns: int = 0  # the device's clock when the frame was captured
    # Ms of the session's audio before this frame: a VAD that takes the session over
    # mid-way places what it replays on the session's clock.
    offset_ms: Annotated[int, Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        _check_pcm16(self.pcm)

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2


class SessionStarted(Event, frozen=True, kw_only=True, tag="session_started"):
    """Announces a session; the session-affine stage that claims it owns it."""

    user_id: Id
    sample_rate: SampleRate


class SessionEnded(Event, frozen=True, kw_only=True, tag="session_ended"):
    """Last event of a session's audio stream: the owner may release it."""

    reason: Reason = ""


# The turn a continued turn replaces: the user spoke again before hearing any of its
# reply, so that reply is dropped and this turn covers the whole utterance.
Continues = Annotated[str, Meta(max_length=128, pattern=r"^$|^[A-Za-z0-9._:@-]+$")]


class SpeechStarted(TurnEvent, frozen=True, kw_only=True, tag="speech_started"):
    audio_ms: Millis  # where speech began, in the session's audio time
    continues: Continues = ""  # non-empty: this speech continues that (ended) turn


class SpeechStopped(TurnEvent, frozen=True, kw_only=True, tag="speech_stopped"):
    audio_ms: Millis


class TurnEnded(TurnEvent, frozen=True, kw_only=True, tag="turn_ended"):
    """The user finished a thought: the utterance, and why the turn ended."""

    sample_rate: SampleRate
    audio: UtterancePcm = b""
    audio_ref: Annotated[str, Meta(max_length=256)] = ""  # a key holding the audio instead
    speech_start_ms: Millis
    speech_end_ms: Millis
    decided_ms: Millis  # audio time at which the detector decided
    rule: Annotated[str, Meta(max_length=64)] = ""  # e.g. "smart_turn", "silence_timeout"
    probability: Probability | None = None
    # A guess sent at the first pause so ASR can start early; the real TurnEnded
    # (speculative=False) follows, or the user goes on and the guess is wasted.
    speculative: bool = False
    user_id: UserId = ""
    continues: Continues = ""  # the turn this one replaces (see SpeechStarted)
    # What the transcript at the deciding pause said ("incomplete: ends on 'and'").
    text_verdict: Annotated[str, Meta(max_length=256)] = ""
    # Ended before the transcript's verdict was in: ASR and the LLM start, but nothing
    # of the reply is played until the VAD sends this turn's TurnEnded again with
    # tentative=False (the commit; on the out stream only), or the turn is continued.
    tentative: bool = False

    def __post_init__(self) -> None:
        _check_pcm16(self.audio)
        if self.speech_end_ms < self.speech_start_ms:
            raise ValueError("speech_end_ms is before speech_start_ms")


class Transcript(TurnEvent, frozen=True, kw_only=True, tag="transcript"):
    text: Text
    final: bool = True
    failed: bool = False  # ASR could not transcribe; `error` says why
    error: Reason = ""
    language: Annotated[str, Meta(max_length=16)] = ""
    user_id: UserId = ""
    continues: Continues = ""  # the turn whose user message this transcript replaces


class TextChunk(TurnEvent, frozen=True, kw_only=True, tag="text_chunk"):
    """A piece of the reply for TTS: a sentence, or a few words in word mode.

    ``last`` marks the end of the reply; a last chunk may have empty text (the reply
    ended exactly on the previous chunk)."""

    text: Text
    last: bool = False
    # On the reply's first chunk: the model's time to first token (the LLM stage's
    # own measure, for the turn's latency breakdown).
    ttft_ms: Annotated[float, Meta(ge=0)] | None = None


class AudioChunk(TurnEvent, frozen=True, kw_only=True, tag="audio_chunk"):
    """Synthesized reply audio for the speaker.

    One text chunk becomes one or more audio chunks, synthesized by whichever TTS
    worker took it (text chunks of one turn may be synthesized in parallel). Play
    order is ``(seq, part)``: ``seq`` is the text chunk's seq, ``part`` counts the
    audio pieces of that text chunk, ``final_part`` marks its last piece, and
    ``last`` marks the last audio of the whole reply (it may carry no samples).
    """

    sample_rate: SampleRate
    pcm: UtterancePcm
    last: bool = False
    part: Seq = 0
    final_part: bool = True
    text: Text = ""  # what this text chunk said (on part 0), for captions and memory

    def __post_init__(self) -> None:
        _check_pcm16(self.pcm)


class TurnCancelled(TurnEvent, frozen=True, kw_only=True, tag="turn_cancelled"):
    """Barge-in or teardown: every stage stops work on ``turn_id``."""

    reason: Reason = ""


class Heard(Event, frozen=True, kw_only=True, tag="heard"):
    """What the user heard of a reply that was cut off (barge-in), as the device played
    it: the gateway reports it, the LLM stage's memory keeps only that of the reply.

    Not a ``TurnEvent``: it is about a cancelled turn, and the runtime skips the events
    of cancelled turns."""

    turn_id: Id
    user_id: UserId = ""
    text: Text  # the reply's words the device played (may be empty: nothing was heard)
    played_samples: Annotated[int, Meta(ge=0)] = 0
    sent_samples: Annotated[int, Meta(ge=0)] = 0


class DeadLetter(Event, frozen=True, kw_only=True, tag="dead_letter"):
    """An entry a worker could not process, with the reason, for an operator."""

    session_id: Annotated[str, Meta(max_length=128)] = ""  # unknown if undecodable
    stream: Annotated[str, Meta(max_length=512)]
    entry_id: Annotated[str, Meta(max_length=64)]
    group: Annotated[str, Meta(max_length=128)]
    consumer: Annotated[str, Meta(max_length=256)]
    reason: Reason
    deliveries: int = 0
    payload: Annotated[bytes, Meta(max_length=65_536)] = b""  # the raw entry, truncated


ALL_EVENTS: tuple[type[Event], ...] = (
    AudioFrame,
    SessionStarted,
    SessionEnded,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
    Transcript,
    TextChunk,
    AudioChunk,
    TurnCancelled,
    Heard,
    DeadLetter,
)

"""``voicebus demo``: the whole bus, end to end, on sample utterances.

Starts Redis and one process per stage, then plays each WAV into the bus in
real time as one user session (32 ms frames, as a microphone would), and
prints what came back and how long each part took. Until the speech stages
land, the stages are placeholders (their outputs say so); the bus, the
processes and the timings are real.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import (
    AudioChunk,
    AudioFrame,
    Event,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    TextChunk,
    Transcript,
    decode,
)
from workers.bus import FIELD, Bus, connect, read
from workers.keys import Keys

SAMPLES = Path(__file__).parent / "samples"
FRAME_MS = 32


class DemoError(RuntimeError):
    pass


def default_wavs() -> list[Path]:
    return sorted(SAMPLES.glob("*.wav"))


def read_wav(path: Path) -> tuple[bytes, int]:
    """PCM16 mono audio and its rate, or a DemoError saying what is wrong with the file."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise DemoError(f"{path}: need 16-bit mono PCM, got {w.getsampwidth() * 8}-bit "
                                f"with {w.getnchannels()} channels")
            return w.readframes(w.getnframes()), w.getframerate()
    except (OSError, wave.Error, EOFError) as exc:
        raise DemoError(f"{path}: not a readable WAV file ({exc})") from None


@dataclass
class TurnReport:
    wav: str
    session_id: str
    turn_id: str = ""
    transcript: str = ""
    reply: str = ""
    audio_seconds: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    ok: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"wav": self.wav, "session_id": self.session_id, "turn_id": self.turn_id,
                "transcript": self.transcript, "reply": self.reply,
                "audio_seconds": round(self.audio_seconds, 3), "latency_ms": self.latency_ms,
                "answered": self.ok}

    def as_text(self) -> str:
        lat = ", ".join(f"{k} {v:.0f} ms" for k, v in self.latency_ms.items())
        status = "" if self.ok else "  (NO ANSWER)"
        return (f"{self.wav}{status}\n  user said : {self.transcript}\n"
                f"  agent said: {self.reply}  [{self.audio_seconds:.2f} s of audio]\n"
                f"  latency   : {lat}")


async def play_turn(bus: Bus, path: Path, answer_within_s: float = 30.0) -> TurnReport:
    pcm, rate = read_wav(path)
    sid = f"demo-{uuid.uuid4().hex[:8]}"
    keys = bus.keys
    report = TurnReport(path.name, sid)
    await bus.publish(keys.sessions(), SessionStarted(session_id=sid, user_id="demo",
                                                      sample_rate=rate))
    step = rate * FRAME_MS // 1000 * 2
    t0 = time.monotonic()
    for seq, offset in enumerate(range(0, len(pcm), step)):
        # Real time: frame n leaves when its audio would have been captured.
        await asyncio.sleep(max(0.0, t0 + seq * FRAME_MS / 1000 - time.monotonic()))
        await bus.publish(keys.audio(sid), AudioFrame(session_id=sid, seq=seq, sample_rate=rate,
                                                      pcm=pcm[offset:offset + step]))
    speech_end_ns = time.time_ns()
    await bus.publish(keys.audio(sid), SessionEnded(session_id=sid, reason="end of file"))

    last_id, deadline = "0-0", time.monotonic() + answer_within_s
    firsts: dict[str, int] = {}
    while time.monotonic() < deadline and not report.ok:
        for _stream, entries in await read(bus.redis, {keys.out(sid): last_id}, 100, 500):
            for entry_id, fields in entries:
                last_id = entry_id
                _absorb(report, firsts, decode(fields[FIELD]))
    since_end = {name: (ns - speech_end_ns) / 1e6 for name, ns in firsts.items()}
    report.latency_ms = {k: round(v, 1) for k, v in since_end.items()}
    await bus.redis.expire(keys.out(sid), 60)
    return report


def _absorb(report: TurnReport, firsts: dict[str, int], event: Event) -> None:
    """Fold one event from the session's out stream into the report."""
    if isinstance(event, SpeechStarted):
        report.turn_id = event.turn_id
    elif isinstance(event, Transcript) and event.final:
        report.transcript = event.text
        firsts.setdefault("end_of_speech_to_transcript", event.created_ns)
    elif isinstance(event, TextChunk):
        report.reply += (" " if report.reply else "") + event.text
        firsts.setdefault("end_of_speech_to_reply_text", event.created_ns)
    elif isinstance(event, AudioChunk):
        report.audio_seconds += len(event.pcm) / 2 / event.sample_rate
        firsts.setdefault("end_of_speech_to_first_audio", event.created_ns)
        report.ok = report.ok or event.last


async def play_all(url: str, prefix: str, wavs: list[Path]) -> list[TurnReport]:
    client = connect(url)
    try:
        bus = Bus(client, Keys(prefix))
        return [await play_turn(bus, wav) for wav in wavs]
    finally:
        await client.aclose()


def print_reports(reports: list[TurnReport], as_json: bool) -> None:
    for r in reports:
        print(json.dumps(r.as_json()) if as_json else r.as_text(), flush=True)
    if not as_json:
        answered = sum(r.ok for r in reports)
        print(f"\n{answered}/{len(reports)} turns answered")

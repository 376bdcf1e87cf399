"""``voicebus demo``: the whole bus, end to end, on sample utterances.

Starts Redis and one process per stage, then plays the WAVs into the bus in
real time as one user session (32 ms frames, as a microphone would: each WAV
is a user turn, spoken once the previous answer has arrived, with silence
streamed in between), and prints what came back and how long each part took. Until the speech stages
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

import numpy as np

from schemas import (
    AudioChunk,
    AudioFrame,
    Event,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    TextChunk,
    Transcript,
    TurnEnded,
    decode,
)
from workers.backends.audio import MODEL_RATE, float_to_pcm16, pcm16_to_float, resample
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
    rule: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)
    ok: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"wav": self.wav, "session_id": self.session_id, "turn_id": self.turn_id,
                "transcript": self.transcript, "reply": self.reply, "turn_rule": self.rule,
                "audio_seconds": round(self.audio_seconds, 3), "latency_ms": self.latency_ms,
                "answered": self.ok}

    def as_text(self) -> str:
        lat = ", ".join(f"{k} {v:.0f} ms" for k, v in self.latency_ms.items())
        status = "" if self.ok else "  (NO ANSWER)"
        return (f"{self.wav}{status}\n  user said : {self.transcript}\n"
                f"  agent said: {self.reply}  [{self.audio_seconds:.2f} s of audio]\n"
                f"  turn ended: {self.rule}\n  latency   : {lat}")


class Microphone:
    """Streams one session's audio in real time, like a device would: the queued
    utterances, and silence in between (a mic never stops sending)."""

    def __init__(self, bus: Bus, session_id: str, rate: int = MODEL_RATE) -> None:
        self.bus, self.session_id, self.rate = bus, session_id, rate
        self.step = rate * FRAME_MS // 1000
        self._queue = np.zeros(0, dtype=np.float32)
        self.sent = 0  # samples sent: the session's audio time
        self.started_ns = 0  # wall clock of audio time 0

    def say(self, audio: np.ndarray) -> None:
        self._queue = np.concatenate([self._queue, audio])

    def wall_ns(self, audio_ms: int) -> int:
        """When audio time ``audio_ms`` had been captured, on the wall clock."""
        return self.started_ns + audio_ms * 1_000_000

    async def run(self, stop: asyncio.Event) -> None:
        keys = self.bus.keys
        await self.bus.publish(keys.sessions(), SessionStarted(
            session_id=self.session_id, user_id="demo", sample_rate=self.rate))
        t0 = time.monotonic()
        self.started_ns = time.time_ns()
        seq = 0
        while not stop.is_set():
            chunk = self._queue[:self.step]
            self._queue = self._queue[self.step:]
            if chunk.size < self.step:
                chunk = np.concatenate([chunk, np.zeros(self.step - chunk.size, np.float32)])
            # A frame leaves once all of its audio would have been captured.
            await asyncio.sleep(max(0.0, t0 + (seq + 1) * FRAME_MS / 1000 - time.monotonic()))
            await self.bus.publish(keys.audio(self.session_id), AudioFrame(
                session_id=self.session_id, seq=seq, sample_rate=self.rate,
                pcm=float_to_pcm16(chunk)))
            self.sent += self.step
            seq += 1
        await self.bus.publish(keys.audio(self.session_id),
                               SessionEnded(session_id=self.session_id, reason="demo over"))


async def play_all(url: str, prefix: str, wavs: list[Path],
                   answer_within_s: float = 30.0) -> list[TurnReport]:
    """One session; each WAV is one user turn, spoken after the previous answer."""
    client = connect(url)
    bus = Bus(client, Keys(prefix))
    mic = Microphone(bus, f"demo-{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    sender = asyncio.create_task(mic.run(stop))
    reports: list[TurnReport] = []
    last_id = "0-0"
    try:
        for wav in wavs:
            pcm, rate = read_wav(wav)
            mic.say(resample(pcm16_to_float(pcm), rate))
            report = TurnReport(wav.name, mic.session_id)
            timings: dict[str, int] = {}
            deadline = time.monotonic() + answer_within_s + len(pcm) / 2 / rate
            while time.monotonic() < deadline and not report.ok:
                replies = await read(client, {bus.keys.out(mic.session_id): last_id}, 100, 200)
                for _stream, entries in replies:
                    for entry_id, fields in entries:
                        last_id = entry_id
                        _absorb(report, timings, decode(fields[FIELD]))
            report.latency_ms = _latencies(timings, mic)
            reports.append(report)
    finally:
        stop.set()
        await asyncio.gather(sender, return_exceptions=True)
        await client.expire(bus.keys.out(mic.session_id), 60)
        await client.aclose()
    return reports


def _absorb(report: TurnReport, timings: dict[str, int], event: Event) -> None:
    """Fold one event from the session's out stream into the report of its turn."""
    if isinstance(event, SpeechStarted) and not report.turn_id:
        report.turn_id = event.turn_id
    if getattr(event, "turn_id", None) != report.turn_id:
        return  # an event of an earlier turn
    if isinstance(event, TurnEnded):
        report.rule = event.rule
        timings["speech_end_ms"] = event.speech_end_ms
        timings.setdefault("turn_ended", event.created_ns)
    elif isinstance(event, Transcript) and event.final:
        report.transcript = event.text
        timings.setdefault("transcript", event.created_ns)
    elif isinstance(event, TextChunk):
        report.reply += (" " if report.reply else "") + event.text
        timings.setdefault("first_text", event.created_ns)
    elif isinstance(event, AudioChunk):
        report.audio_seconds += len(event.pcm) / 2 / event.sample_rate
        timings.setdefault("first_audio", event.created_ns)
        report.ok = report.ok or event.last


def _latencies(t: dict[str, int], mic: Microphone) -> dict[str, float]:
    """Per-stage latency, from the end of the user's speech (in audio time) on."""
    if "speech_end_ms" not in t:
        return {}
    marks = [("turn_detect", mic.wall_ns(t["speech_end_ms"]), t.get("turn_ended")),
             ("asr", t.get("turn_ended"), t.get("transcript")),
             ("llm_first_text", t.get("transcript"), t.get("first_text")),
             ("tts_first_chunk", t.get("first_text"), t.get("first_audio")),
             ("end_of_speech_to_first_audio", mic.wall_ns(t["speech_end_ms"]),
              t.get("first_audio"))]
    return {name: round((end - start) / 1e6, 1) for name, start, end in marks
            if start is not None and end is not None}


def print_reports(reports: list[TurnReport], as_json: bool) -> None:
    for r in reports:
        print(json.dumps(r.as_json()) if as_json else r.as_text(), flush=True)
    if not as_json:
        answered = sum(r.ok for r in reports)
        print(f"\n{answered}/{len(reports)} turns answered")

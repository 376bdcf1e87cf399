#!/usr/bin/env python
"""From a final transcript to the first audio: LLM and TTS latency, sentence vs word mode.

    python -m bench.reply_latency [--runs 3] [--modes sentence word] [--no-bus]
                                  [--out bench/results/reply_latency.json]

Uses the shipped defaults: the local LLM (llama.cpp serving Qwen2.5-Coder-1.5B
Q4_K_M, 2 threads, started here) and the Piper voice. Two measurements:

* **in process** (no bus): the LLM stage's own pieces called directly: the
  ``OpenAIChat`` stream through the ``Chunker``, then the TTS backend on each
  chunk, one after the other, as one TTS worker does. Per reply: LLM
  time-to-first-token, time to the first chunk (the first sentence, or the first
  3-5 words), the reply's tokens/s; per chunk: TTS time to first audio and RTF
  (synthesis seconds / audio seconds); and "first audio": first chunk + its first
  audio piece.
* **through the bus** (``--no-bus`` skips it): a private redis-server and real
  ``voicebus worker llm`` and ``voicebus worker tts`` processes; a ``Transcript``
  is published and the first ``TextChunk`` / ``AudioChunk`` on the session's out
  stream are timed from the publish (``created_ns``, one clock).

Every prompt is asked ``--runs`` times per mode, each with a fresh user (no memory)
and temperature 0, so both modes get the same replies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.worker_process import start_worker
from schemas import AudioChunk, TextChunk, Transcript, decode, encode
from voicebus.local_llm import LocalLlmServer
from voicebus.redis_server import EmbeddedRedis
from workers.backends.llm import OpenAIChat
from workers.backends.tts import TtsBackend, load_backend
from workers.config import LlmConfig, TtsConfig
from workers.observability.metrics import percentile as interpolated
from workers.runtime.bus import FIELD
from workers.runtime.keys import Keys
from workers.text.chunking import Chunker

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "What is the capital of France?",
    "Can you recommend a good book for a long flight?",
    "How do I make a cup of green tea?",
    "What's the weather usually like in Lisbon in May?",
    "Tell me a fun fact about octopuses.",
    "How far is the Moon from the Earth?",
]


def pct(values: list[float], q: float) -> float | None:
    return interpolated(values, q) if values else None


def summary(values: list[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "p50": pct(values, 0.5), "p95": pct(values, 0.95),
            "mean": statistics.fmean(values) if values else None}


# -- in process -------------------------------------------------------------------
async def one_reply(chat: OpenAIChat, tts: TtsBackend, cfg: LlmConfig, mode: str,
                    prompt: str) -> dict[str, Any]:
    chunker = Chunker(mode, first_words_min=cfg.word_chunk_min,
                      first_words_max=cfg.word_chunk_max)
    messages = [{"role": "system", "content": cfg.system_prompt},
                {"role": "user", "content": prompt}]
    started = time.perf_counter()
    first_token = first_chunk = None
    tokens = 0
    chunks: list[str] = []
    async for delta in chat.stream(messages, max_tokens=cfg.max_tokens,  # type: ignore[arg-type]
                                   temperature=0.0):
        now = time.perf_counter()
        first_token = first_token or now
        tokens += 1
        for text in chunker.push(delta):
            first_chunk = first_chunk or now
            chunks.append(text)
    done = time.perf_counter()
    chunks += chunker.flush()
    first_chunk = first_chunk or done
    assert first_token is not None, "the model sent nothing"
    tts_runs = []
    for text in chunks:  # one TTS worker: chunk after chunk
        t0 = time.perf_counter()
        first_audio, audio_s = None, 0.0
        for piece in tts.synthesize(text):
            first_audio = first_audio or time.perf_counter()
            audio_s += piece.seconds
        total = time.perf_counter() - t0
        tts_runs.append({"words": len(text.split()), "first_audio_ms":
                         ((first_audio or time.perf_counter()) - t0) * 1000,
                         "audio_s": audio_s, "synth_s": total,
                         "rtf": total / audio_s if audio_s else None})
    return {
        "mode": mode, "prompt": prompt, "reply": " ".join(chunks), "chunks": len(chunks),
        "first_chunk_words": len(chunks[0].split()) if chunks else 0,
        "llm_ttft_ms": (first_token - started) * 1000,
        "first_chunk_ms": (first_chunk - started) * 1000,
        "llm_total_ms": (done - started) * 1000,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / (done - first_token) if done > first_token else None,
        "tts": tts_runs,
        "first_audio_ms": (first_chunk - started) * 1000 + tts_runs[0]["first_audio_ms"],
    }


async def in_process(url: str, cfg: LlmConfig, modes: list[str], runs: int) -> list[dict[str, Any]]:
    chat = OpenAIChat(url, cfg.api_key, cfg.model, cfg.timeout)
    tts = load_backend(TtsConfig())
    await one_reply(chat, tts, cfg, "sentence", "Hello!")  # warm-up
    rows = []
    # Modes outer, prompts inner: llama.cpp reuses the KV cache of the previous
    # request's prompt, so the same prompt twice in a row would make the second
    # mode's first token look ~5x faster. Consecutive prompts share only the system
    # prompt, as consecutive turns of different users do.
    for run in range(runs):
        for mode in modes:
            for prompt in PROMPTS:
                row = await one_reply(chat, tts, cfg, mode, prompt)
                row["run"] = run
                rows.append(row)
                print(f"  {mode:8} ttft {row['llm_ttft_ms']:5.0f}  first chunk "
                      f"{row['first_chunk_ms']:5.0f} ({row['first_chunk_words']} words)  "
                      f"tts first {row['tts'][0]['first_audio_ms']:4.0f}  first audio "
                      f"{row['first_audio_ms']:5.0f} ms  | {row['reply'][:60]!r}", flush=True)
    return rows


# -- through the bus --------------------------------------------------------------
def through_bus(llm_url: str, modes: list[str], runs: int, logdir: Path) -> list[dict[str, Any]]:
    import redis

    rows = []
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        for mode in modes:
            prefix = f"bench{uuid.uuid4().hex[:6]}"
            env = {**os.environ, "REDIS_URL": server.url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
                   "VOICEBUS_LLM__BASE_URL": llm_url, "VOICEBUS_LLM__TEMPERATURE": "0",
                   "VOICEBUS_LLM__CHUNKING": mode, "PYTHONUNBUFFERED": "1"}
            procs = [start_worker(s, env, logdir / f"reply_latency.{s}.{mode}.log")
                     for s in ("llm", "tts")]
            keys = Keys(prefix)
            try:
                for run in range(runs + 1):  # the first round warms up
                    for prompt in PROMPTS:
                        sid = f"s{uuid.uuid4().hex[:8]}"
                        sent = Transcript(session_id=sid, turn_id="t1", text=prompt,
                                          user_id=f"bench-{sid}")
                        r.xadd(keys.queue("llm"), {FIELD: encode(sent)})
                        first_text = first_audio = None
                        deadline = time.monotonic() + 60
                        last_id = "0-0"
                        done = False
                        while not done and time.monotonic() < deadline:
                            got = r.xread({keys.out(sid): last_id}, block=200, count=100)
                            for _stream, entries in got or []:
                                for entry_id, fields in entries:
                                    last_id = entry_id
                                    event = decode(fields[FIELD])
                                    if isinstance(event, TextChunk) and first_text is None:
                                        first_text = event.created_ns
                                    if isinstance(event, AudioChunk):
                                        if first_audio is None and event.pcm:
                                            first_audio = event.created_ns
                                        done = done or event.last
                        if run == 0:
                            continue
                        row = {"mode": mode, "prompt": prompt, "run": run, "answered": done,
                               "first_text_ms": ((first_text or 0) - sent.created_ns) / 1e6,
                               "first_audio_ms": ((first_audio or 0) - sent.created_ns) / 1e6}
                        rows.append(row)
                        print(f"  bus {mode:8} first text {row['first_text_ms']:5.0f}  "
                              f"first audio {row['first_audio_ms']:5.0f} ms", flush=True)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=30)
        r.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["sentence", "word"],
                        choices=["sentence", "word"])
    parser.add_argument("--no-bus", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/reply_latency.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cfg = LlmConfig()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version,
                                           "platform": platform.platform()},
                               "llm": {"model": cfg.model, "threads": cfg.local.threads},
                               "tts": TtsConfig().backend, "runs": args.runs}
    with LocalLlmServer(cfg) as server:
        print("in process (no bus):", flush=True)
        rows = asyncio.run(in_process(server.url, cfg, args.modes, args.runs))
        results["in_process"] = rows
        bus_rows = [] if args.no_bus else through_bus(server.url, args.modes, args.runs,
                                                      args.out.parent)
        results["bus"] = bus_rows
    table: dict[str, Any] = {}
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        tts_all = [t for r in mine for t in r["tts"]]
        table[mode] = {
            "llm_ttft_ms": summary([r["llm_ttft_ms"] for r in mine]),
            "first_chunk_ms": summary([r["first_chunk_ms"] for r in mine]),
            "tokens_per_s": summary([r["tokens_per_s"] for r in mine if r["tokens_per_s"]]),
            "tts_first_audio_ms": summary([t["first_audio_ms"] for t in tts_all]),
            "tts_first_chunk_first_audio_ms": summary([r["tts"][0]["first_audio_ms"]
                                                       for r in mine]),
            "tts_rtf": summary([t["rtf"] for t in tts_all if t["rtf"]]),
            "first_audio_ms": summary([r["first_audio_ms"] for r in mine]),
        }
        bus = [r for r in bus_rows if r["mode"] == mode and r["answered"]]
        if bus:
            table[mode]["bus_first_text_ms"] = summary([r["first_text_ms"] for r in bus])
            table[mode]["bus_first_audio_ms"] = summary([r["first_audio_ms"] for r in bus])
    results["summary"] = table
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{'metric':32}" + "".join(f"{m + ' p50':>14}{m + ' p95':>14}" for m in args.modes))
    for metric in table[args.modes[0]]:
        cells = ""
        for mode in args.modes:
            s = table[mode].get(metric, {})
            for q in ("p50", "p95"):
                v = s.get(q)
                text = "-" if v is None else f"{v:.2f}" if "rtf" in metric else f"{v:.0f}"
                cells += f"{text:>14}"
        print(f"{metric:32}{cells}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

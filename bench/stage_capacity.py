"""How many live sessions one worker of a job stage holds, on the cores its pod requests.

    python -m bench.stage_capacity [--stages asr tts llm] [--sessions 5 10 20 30 40]
                                   [--seconds 45] [--out bench/results/stage_capacity.json]

One real worker (``voicebus worker STAGE``, the configured models) pinned to the cores
``deploy/k8s`` requests for it (ASR 2, TTS 1, and for ``llm`` the local LLM server's 2,
which serves the worker; ``--cores`` changes that), on a private Redis. For each session
count N, N sessions send it their turns' jobs at random (Poisson) times, at the rate of
the busy conversation ``bench/footprint.py`` measured (4.1 turns per session-minute),
for ``--seconds``:

* **asr**: a ``TurnEnded`` with a real utterance of the benchmark corpus
  (``bench/speech_corpus.py``); done when its ``Transcript`` is written.
* **llm**: a ``Transcript`` of what a corpus speaker said, each session its own user
  whose memory grows over the round; first text when the first ``TextChunk`` is
  written, done at the last. The local llama.cpp server answers one request at a time.
* **tts**: a reply as the LLM stage sends it (one ``TextChunk`` per sentence, all at
  once: the LLM types faster than TTS speaks), from a fixed set of 12 replies of 1-3
  sentences; first audio when its first ``AudioChunk`` is written, done at the last.

Latency is what the stage adds to a turn: the job's ``created_ns`` (set just before its
XADD) to the output's, queueing in Redis included. The baseline (``sessions`` 0 in the
table) is 20 jobs sent one at a time, each once the one before is done: the service time
with no queueing. A worker *holds* N sessions when every job of the round was done and
the p95 stayed within 1.5x the baseline's p95 (or 200 ms above it, whichever is more):
more sessions would make every turn later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from bench.measure import busy_cores_before_start, proc_cpu_s
from bench.speech_corpus import load_corpus
from bench.worker_process import start_worker
from schemas import AudioChunk, Event, TextChunk, Transcript, TurnEnded
from schemas.codec import decode, encode
from voicebus.local_llm import LocalLlmServer
from voicebus.redis_server import EmbeddedRedis
from workers.config_load import load_config
from workers.observability.metrics import percentile
from workers.runtime.bus import FIELD, read
from workers.runtime.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
TURNS_PER_MINUTE = 4.1  # bench/footprint.py's busy conversation (deploy/SCALING.md)
# The CPU each pod of deploy/k8s/base requests (llm: the LLM server's; its worker waits).
POD_CORES = {"asr": 2, "tts": 1, "llm": 2}
BASELINE_JOBS = 20  # sent one at a time: the latency with nothing queued
REPLIES = [  # shaped like the local LLM's replies: 1-3 sentences
    "Sure. I can help with that.",
    "The weather today is mild, with a light breeze in the afternoon.",
    "Your next meeting is at three o'clock. It is in the small room on the second floor.",
    "I set a timer for ten minutes.",
    "That sounds like a good plan. Let me know if you want me to remind you later.",
    "The capital of Australia is Canberra, not Sydney as many people think.",
    "Nine times seven is sixty three.",
    "I am not sure I understood. Could you say that again?",
    "Here is a quick idea for dinner. Pasta with tomatoes, garlic and a little basil. "
    "It takes about twenty minutes.",
    "Okay, I added milk, eggs and bread to your shopping list.",
    "You walked about six thousand steps today. That is a bit more than yesterday.",
    "Good morning. It is seven thirty, and you have two meetings before lunch.",
]


@dataclass
class Round:
    sessions: int
    sent: dict[str, int] = field(default_factory=dict)  # turn -> created_ns of its job
    first: dict[str, int] = field(default_factory=dict)  # turn -> first output's created_ns
    done: dict[str, int] = field(default_factory=dict)  # turn -> last output's created_ns
    cpu_s: float = 0.0
    wall_s: float = 0.0
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # set on each turn done

    async def wait_done(self, count: int, within_s: float) -> None:
        """Until ``count`` turns are done, or ``within_s`` pass."""
        deadline = time.monotonic() + within_s
        while len(self.done) < count and time.monotonic() < deadline:
            self.finished.clear()
            try:
                await asyncio.wait_for(self.finished.wait(), deadline - time.monotonic())
            except TimeoutError:
                return


Speech = tuple[bytes, int, int, str]  # PCM16, speech start ms, end ms, what was said


def utterances(limit: int = 60) -> list[Speech]:
    """Real corpus turns, and their reference text."""
    turns, _ = load_corpus()
    random.Random(15).shuffle(turns)
    out = []
    for turn in turns[:limit]:
        pcm = (np.clip(turn.audio, -1, 1) * 32767).astype("<i2").tobytes()
        out.append((pcm, int(turn.speech_start_s * 1000), int(turn.speech_end_s * 1000),
                    turn.text))
    return out


def jobs_for(stage: str, sid: str, tid: str, rng: random.Random,
             speech: list[Speech]) -> list[Event]:
    if stage == "asr":
        pcm, start, end, _ = rng.choice(speech)
        return [TurnEnded(session_id=sid, turn_id=tid, sample_rate=16000, audio=pcm,
                          speech_start_ms=start, speech_end_ms=end, decided_ms=end + 300)]
    if stage == "llm":
        return [Transcript(session_id=sid, turn_id=tid, text=rng.choice(speech)[3],
                           user_id=sid)]
    sentences = [s.strip() for s in re.findall(r"[^.?!]+[.?!]", rng.choice(REPLIES))]
    return [TextChunk(session_id=sid, turn_id=tid, seq=i, text=text,
                      last=i == len(sentences) - 1) for i, text in enumerate(sentences)]


async def collect(r: aioredis.Redis, stage: str, keys: Keys, sids: list[str],
                  rnd: Round, stop: asyncio.Event) -> None:
    """Read the stage's outputs and note when each turn's first and last were made."""
    outputs = {"asr": [keys.queue("llm")], "llm": [keys.queue("tts")],
               "tts": [keys.out(s) for s in sids]}
    streams = dict.fromkeys(outputs[stage], "$")
    while not stop.is_set():
        for stream, entries in await read(r, streams, 100, 200):
            for entry_id, fields in entries:
                streams[stream] = entry_id
                event = decode(fields[FIELD])
                if isinstance(event, Transcript):
                    rnd.first.setdefault(event.turn_id, event.created_ns)
                    rnd.done[event.turn_id] = event.created_ns
                    rnd.finished.set()
                elif isinstance(event, TextChunk):
                    rnd.first.setdefault(event.turn_id, event.created_ns)
                    if event.last:
                        rnd.done[event.turn_id] = event.created_ns
                        rnd.finished.set()
                elif isinstance(event, AudioChunk):
                    rnd.first.setdefault(event.turn_id, event.created_ns)
                    if event.last:
                        rnd.done[event.turn_id] = event.created_ns
                        rnd.finished.set()


async def run_round(url: str, stage: str, keys: Keys, sessions: int, seconds: float,
                    pid: int, speech: list[Speech], seed: int,
                    one_at_a_time: int = 0) -> Round:
    r = aioredis.from_url(url)
    rng = random.Random(seed)
    sids = [f"n{sessions}-s{i}" for i in range(sessions)]
    rnd = Round(sessions)
    stop = asyncio.Event()
    reader = asyncio.create_task(collect(r, stage, keys, sids, rnd, stop))
    await asyncio.sleep(0.3)  # the reader's "$" is set before the first job
    rate = sessions * TURNS_PER_MINUTE / 60  # turns per second, all sessions together
    cpu0, t0 = proc_cpu_s(pid) or 0.0, time.monotonic()
    at, n = t0, 0
    while True:
        if one_at_a_time:  # the baseline: each job alone, so no queueing at all
            if n == one_at_a_time:
                break
            await rnd.wait_done(n, 60)
        else:
            at += rng.expovariate(rate)
            if at - t0 > seconds:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
        sid, tid = rng.choice(sids), f"t{n}"
        n += 1
        jobs = jobs_for(stage, sid, tid, rng, speech)
        rnd.sent[tid] = jobs[0].created_ns
        async with r.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.xadd(keys.job_queue(stage, sid), {FIELD: encode(job)})
            await pipe.execute()
    await rnd.wait_done(len(rnd.sent), 60)  # drain: what was sent must be done
    rnd.wall_s = time.monotonic() - t0
    rnd.cpu_s = (proc_cpu_s(pid) or 0.0) - cpu0
    stop.set()
    await reader
    await r.aclose()
    return rnd


def pct(values: list[float], q: float) -> float | None:
    return round(percentile(values, q / 100), 1) if values else None


def summarize(rnd: Round) -> dict[str, Any]:
    done = [(rnd.done[t] - rnd.sent[t]) / 1e6 for t in rnd.sent if t in rnd.done]
    first = [(rnd.first[t] - rnd.sent[t]) / 1e6 for t in rnd.sent if t in rnd.first]
    return {"sessions": rnd.sessions, "turns": len(rnd.sent), "done": len(done),
            "first_p50_ms": pct(first, 50), "first_p95_ms": pct(first, 95),
            "done_p50_ms": pct(done, 50), "done_p95_ms": pct(done, 95),
            "done_max_ms": pct(done, 100),
            "worker_cores": round(rnd.cpu_s / max(rnd.wall_s, 1e-9), 2)}


def holds(rows: list[dict[str, Any]]) -> int:
    """The most sessions before the p95 left 1.5x (or +200 ms of) the baseline's p95."""
    base = rows[0]["done_p95_ms"]
    limit = max(1.5 * base, base + 200)
    held = 0
    for row in rows[1:]:
        if row["done"] < row["turns"] or row["done_p95_ms"] > limit:
            break
        held = row["sessions"]
    return held


def measure_stage(url: str, stage: str, args: argparse.Namespace,
                  speech: list[Speech], tmp: Path) -> dict[str, Any]:
    prefix = f"cap{secrets.token_hex(3)}"
    keys = Keys(prefix)
    cores = args.cores or POD_CORES[stage]
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    with contextlib.ExitStack() as stack:
        settings = {}
        if stage == "llm":  # the server does the work: it is pinned, and its CPU counted
            llm = load_config().llm
            server = stack.enter_context(LocalLlmServer(
                llm.model_copy(update={"local": llm.local.model_copy(update={"port": 0})})))
            assert server.pid is not None
            os.sched_setaffinity(server.pid, cpus)
            settings["VOICEBUS_LLM__BASE_URL"] = server.url
        worker = start_worker(stage, {
            **os.environ, "REDIS_URL": url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
            "PYTHONUNBUFFERED": "1", **settings}, tmp / f"{stage}.log", cpus=cpus)
        stack.callback(worker.wait, timeout=30)
        stack.callback(worker.terminate)
        busy = server.pid if stage == "llm" else worker.pid
        assert busy is not None
        asyncio.run(run_round(url, stage, keys, 1, 0, busy, speech, 0, 3))  # warm up
        print(f"{stage}: baseline, {BASELINE_JOBS} jobs one at a time ...", flush=True)
        rows = [summarize(asyncio.run(run_round(url, stage, keys, 1, 0, busy, speech,
                                                1, one_at_a_time=BASELINE_JOBS)))]
        rows[0]["sessions"] = 0
        for n in args.sessions:
            print(f"{stage}: {n} sessions, {args.seconds:.0f} s ...", flush=True)
            rnd = asyncio.run(run_round(url, stage, keys, n, args.seconds, busy, speech,
                                        seed=n))
            rows.append(summarize(rnd))
    return {"stage": stage, "cores": cores, "rows": rows, "holds_sessions": holds(rows)}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['stage']} on {result['cores']} core(s): holds "
          f"{result['holds_sessions']} sessions")
    head = ("sessions", "turns", "done", "first p50", "first p95", "done p50", "done p95",
            "max", "cores")
    print(" ".join(f"{h:>9}" for h in head))
    for row in result["rows"]:
        cells = [row["sessions"], row["turns"], row["done"], row["first_p50_ms"],
                 row["first_p95_ms"], row["done_p50_ms"], row["done_p95_ms"],
                 row["done_max_ms"], row["worker_cores"]]
        print(" ".join(f"{'-' if c is None else c:>9}" for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=sorted(POD_CORES),
                        default=["asr", "tts"])
    parser.add_argument("--sessions", nargs="+", type=int, default=[5, 10, 20, 30, 40])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--cores", type=int, default=0,
                        help="cores to pin the worker to (default: its pod's request)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/stage_capacity.json")
    args = parser.parse_args()
    idle = busy_cores_before_start()
    speech = utterances() if {"asr", "llm"} & set(args.stages) else []
    results = []
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            results.append(measure_stage(server.url, stage, args, speech, Path(tmp)))
            print_table(results[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(),
        "cpus": os.cpu_count(), "busy_cores_before": round(idle, 2),
        "turns_per_minute": TURNS_PER_MINUTE, "seconds": args.seconds,
        "results": results}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""End of speech -> first audio through the whole pipeline, and what the bus costs.

    python -m bench.pipeline_latency [--runs 3] [--concurrency 1 2 3 | --no-concurrency]
                                     [--concurrency-runs 2] [--vad-sessions 10 25 50 100]
                                     [--vad-reps 2] [--no-vad | --vad-only] [--quick]
                                     [--seed 1]
                                     [--out bench/results/pipeline_latency.json]

1. **bus**: ``Supervisor`` (embedded Redis, the local LLM, one process per stage, the
   gateway on a free port). One device session per run (``edge.client.talk_wavs``, a
   fresh user, so a fresh memory) plays the sample WAVs in real time, each a turn
   spoken once the previous answer has played; ``--runs`` times. Per turn: the
   gateway's ``latency_ms`` breakdown from ``turn_done``.
2. **in process** (no Redis, no worker processes): the same turn with the same models
   and code called directly, interleaved run by run with the bus runs so a busy spell
   hits both: the WAVs and silence go into a ``TurnDetector`` (real Silero and Smart
   Turn, ``VadModels``) one 32 ms window at a time in real time; Smart Turn in a thread
   as the VAD worker runs it; ASR (``recognizer.transcribe`` on one thread, as the ASR
   worker with ``asr.concurrency`` 1) started at the detector's speculative
   ``TurnEnd`` and reused when the final one has the same speech end; ``OpenAIChat``
   on the same llama.cpp server with the same prompt (system prompt + this session's
   earlier turns, as the LLM worker's memory builds it) through the ``Chunker``; every
   chunk into ``TtsStage.speak`` (the TTS worker's own code) as it appears. The same
   stage marks are taken: speech end captured -> decided -> transcript -> first text
   chunk -> first audio.
3. **concurrency**: N device sessions at once through the gateway (each its own user,
   playing the WAVs, starting 0-1 s apart at random), ``--concurrency-runs`` rounds per
   N; end of speech -> first audio p95 per N. N=1 is the bus runs of step 1.
4. **VAD path alone**: a private redis-server and one real ``voicebus worker vad``;
   N sessions (``bench.busmic.Microphone``) stream the WAVs in real time straight onto
   the bus, each WAV followed by 2 s of silence, ``--vad-reps`` times, the sessions
   starting at random points of one such cycle; end of speech (the frame holding it,
   as sent) -> ``TurnEnded.created_ns``. A 1-session round runs first as the baseline.

Writes the JSON (every turn) and a PNG chart of the stage breakdown beside it, and the
processes' logs (``*.supervisor.log``, ``*.vad_worker.log``) and spans
(``*.spans.jsonl``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import secrets
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.busmic import Microphone
from bench.measure import (
    busy_cores_before_start,
    machine_cpu,
    peak_rss_mb,
    proc_cpu_s,
    rss_mb,
)
from bench.worker_process import start_worker
from edge.auth import mint
from edge.client import ClientError, talk_wavs
from schemas import AudioFrame, Event, TurnEnded, decode
from voicebus import processes
from voicebus.demo import default_wavs, read_wav
from voicebus.redis_server import EmbeddedRedis
from workers.backends.asr import AsrResult, Recognizer, load_recognizer
from workers.backends.audio import float_to_pcm16, pcm16_to_float, resample
from workers.backends.llm import ChatMessage, OpenAIChat
from workers.backends.tts import load_backend
from workers.backends.vad import VadModels, load_vad_models
from workers.config import Config
from workers.config_load import load_config
from workers.llm_worker import SAY_AGAIN
from workers.observability.metrics import percentile as interpolated
from workers.runtime.bus import FIELD, Bus, read
from workers.runtime.connection import connect
from workers.runtime.keys import Keys
from workers.text.chunking import Chunker
from workers.tts_worker import ChunkMetrics, TtsStage
from workers.vad.turn_detection import (
    RATE,
    WINDOW,
    NeedsTurnCheck,
    TurnDetector,
    TurnEnd,
)

ROOT = Path(__file__).resolve().parent.parent

STAGES = ("turn_detect", "asr", "llm_ttft", "llm_first_text", "tts_first_chunk",
          "end_of_speech_to_first_audio")
E2E = "end_of_speech_to_first_audio"
# Consecutive marks: speech end -> decided -> transcript -> first text -> first audio
# made -> first audio sent. They add up to E2E with "delivery" (the bus's last hop).
ADDITIVE = ("turn_detect", "asr", "llm_first_text", "tts_first_chunk")
WINDOW_S = WINDOW / RATE
FRAME_MS = 32  # bench.busmic.Microphone's frames: one VAD window each at 16 kHz
TURN_TIMEOUT_S = 60.0
P95_LIMIT_MS = 2000.0
VAD_SLACK_MS = 100.0
QUIET = 0.25  # busy cores below which the machine counts as idle
VAD_DRAIN_LIMIT_S = 240.0  # how long a round waits for the worker to catch up at the end


# -- numbers ----------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); q in percent; None
    if empty."""
    return interpolated(values, q / 100) if values else None


def summary(values: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(values)}
    for q in (50, 95, 99):
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else round(v, 1)
    out["mean"] = round(sum(values) / len(values), 1) if values else None
    out["max"] = round(max(values), 1) if values else None
    return out






@dataclass
class Load:
    """Cores busy on the whole machine while some spans of time ran (all processes)."""

    busy: int = 0
    total: int = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        b0, t0 = machine_cpu()
        try:
            yield
        finally:
            b1, t1 = machine_cpu()
            self.busy += b1 - b0
            self.total += t1 - t0

    @property
    def cores(self) -> float | None:
        return self.busy / self.total * (os.cpu_count() or 1) if self.total else None


def clip16k(path: Path) -> np.ndarray:
    pcm, rate = read_wav(path)
    return resample(pcm16_to_float(pcm), rate)


def turn_row(latency: dict[str, Any]) -> dict[str, float]:
    """The stage marks, plus ``delivery``: what the stages leave of the total."""
    out = {k: float(latency[k]) for k in STAGES if latency.get(k) is not None}
    if E2E in out and all(k in out for k in ADDITIVE):
        out["delivery"] = round(out[E2E] - sum(out[k] for k in ADDITIVE), 1)
    return out


# -- 1. through the bus -------------------------------------------------------------
async def bus_session(url: str, secret: bytes, wavs: list[Path], delay_s: float = 0.0,
                      tag: str = "") -> dict[str, Any]:
    """One device session through the gateway: every WAV a turn; the gateway's marks."""
    await asyncio.sleep(delay_s)
    user = f"bench-{tag}{secrets.token_hex(4)}"  # a fresh user: a fresh memory
    rules: dict[str, str] = {}

    def on_message(message: dict[str, Any]) -> None:
        if message.get("type") == "turn_done":
            rules[str(message.get("turn_id"))] = str(message.get("rule", ""))

    error = ""
    try:
        turns = await talk_wavs(url, mint(secret, user, 3600), wavs, on_message=on_message,
                                answer_timeout_s=TURN_TIMEOUT_S)
    except ClientError as exc:
        turns, error = exc.turns, str(exc)
    rows = []
    for i, t in enumerate(turns):
        rows.append({"turn": i, "wav": wavs[i].stem if i < len(wavs) else "?",
                     "transcript": t.transcript, "reply": t.reply,
                     "rule": rules.get(t.turn_id, ""),
                     "answered": bool(t.audio) and not t.interrupted,
                     "latency_ms": turn_row(t.latency_ms)})
    return {"user": user, "error": error, "delay_s": round(delay_s, 3), "turns": rows}


# -- 2. in process ------------------------------------------------------------------
@dataclass
class InProcess:
    """The pipeline's models and code in this process, called directly."""

    config: Config
    vad: VadModels
    recognizer: Recognizer
    tts: TtsStage
    chat: OpenAIChat
    asr_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="asr"))

    @classmethod
    def load(cls, config: Config, llm_url: str) -> InProcess:
        vad = load_vad_models(config.vad)
        recognizer = load_recognizer(config.asr)
        recognizer.transcribe(b"\0\0" * 8_000, RATE)  # the ASR worker's warm-up call
        backend = load_backend(config.tts)  # warms itself up
        tts = TtsStage(backend, config.tts.sample_rate, config.tts.chunk_size)
        llm = config.llm
        return cls(config, vad, recognizer, tts,
                   OpenAIChat(llm_url, llm.api_key, llm.model, llm.timeout))

    def transcribe(self, end: TurnEnd) -> asyncio.Future[AsrResult]:
        """As the ASR worker (one job at a time): the turn's PCM16 audio, in a thread."""
        return asyncio.get_running_loop().run_in_executor(
            self.asr_pool, self.recognizer.transcribe, float_to_pcm16(end.audio), RATE)

    async def session(self, wavs: list[Path]) -> dict[str, Any]:
        """One user's turns: the WAVs "captured" in real time, each answered in turn."""
        detector = TurnDetector(self.config.vad, self.vad.speech.stream())
        pending: deque[np.ndarray] = deque()
        captured: dict[int, int] = {}  # a window's end (sample) -> wall ns it was captured
        finals: asyncio.Queue[tuple[TurnEnd, int]] = asyncio.Queue()
        guesses: dict[int, asyncio.Future[AsrResult]] = {}  # speech end -> its ASR
        stop = asyncio.Event()

        async def act(action: object) -> None:
            if isinstance(action, NeedsTurnCheck) and self.vad.turn_end is not None:
                probability = await asyncio.to_thread(self.vad.turn_end.probability,
                                                      action.audio)
                for follow_up in detector.judged(probability):
                    await act(follow_up)
            elif isinstance(action, TurnEnd):
                if action.speculative:
                    guesses[action.speech_end] = self.transcribe(action)
                else:
                    finals.put_nowait((action, time.time_ns()))

        async def microphone() -> None:
            buffer = np.zeros(0, np.float32)
            t0, k = time.monotonic(), 0
            while not stop.is_set():
                while buffer.size < WINDOW and pending:
                    buffer = np.concatenate([buffer, pending.popleft()])
                window, buffer = buffer[:WINDOW], buffer[WINDOW:]
                if window.size < WINDOW:
                    window = np.concatenate([window, np.zeros(WINDOW - window.size, np.float32)])
                k += 1  # a window is handed over once all of its audio is captured
                await asyncio.sleep(max(0.0, t0 + k * WINDOW_S - time.monotonic()))
                captured[detector.pos + WINDOW] = time.time_ns()
                for action in detector.push(window):
                    await act(action)

        mic = asyncio.create_task(microphone())
        history: list[ChatMessage] = []
        rows: list[dict[str, Any]] = []
        error = ""
        try:
            for i, wav in enumerate(wavs):
                pending.append(clip16k(wav))
                get = asyncio.ensure_future(finals.get())
                await asyncio.wait({get, mic}, timeout=TURN_TIMEOUT_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    if mic.done():
                        mic.result()  # raises what broke the microphone loop
                    raise TimeoutError(f"no turn end for {wav.name}")
                end, decided_ns = get.result()
                row = await self.answer(end, decided_ns, captured[end.speech_end], guesses,
                                        history)
                row.update(turn=i, wav=wav.stem)
                rows.append(row)
                guesses.clear()
                while not finals.empty():  # a WAV heard as two turns: only the first counts
                    extra, _ = finals.get_nowait()
                    row["extra_turns"] = row.get("extra_turns", 0) + 1
                    print(f"    (an extra turn ended by {extra.rule} was ignored)", flush=True)
                pending.append(np.zeros(RATE, np.float32))  # a second before the next turn
        except Exception as exc:  # a failed session is reported, not fatal
            error = f"{type(exc).__name__}: {exc}"
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await mic
        return {"error": error, "turns": rows}

    async def answer(self, end: TurnEnd, decided_ns: int, speech_end_ns: int,
                     guesses: dict[int, asyncio.Future[AsrResult]],
                     history: list[ChatMessage]) -> dict[str, Any]:
        llm = self.config.llm
        guess = guesses.pop(end.speech_end, None)
        result = await (guess if guess is not None else self.transcribe(end))
        transcript_ns = time.time_ns()
        first_audio: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        slots = asyncio.Semaphore(self.config.worker.concurrency)  # the TTS worker's jobs
        synth: list[asyncio.Task[None]] = []
        spoken: list[str] = []
        first_text_ns: int | None = None
        ttft_ms: float | None = None

        def chunk(text: str) -> None:
            nonlocal first_text_ns
            first_text_ns = first_text_ns or time.time_ns()
            synth.append(asyncio.create_task(self.speak(text, len(spoken), first_audio, slots)))
            spoken.append(text)

        if result.text.strip():
            messages: list[ChatMessage] = [{"role": "system", "content": llm.system_prompt},
                                           *history, {"role": "user", "content": result.text}]
            chunker = Chunker(llm.chunking, first_words_min=llm.word_chunk_min,
                              first_words_max=llm.word_chunk_max)
            started = time.perf_counter()
            async for delta in self.chat.stream(messages, max_tokens=llm.max_tokens,
                                                temperature=llm.temperature):
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000
                for text in chunker.push(delta):
                    chunk(text)
            for text in chunker.flush():
                chunk(text)
            history += [{"role": "user", "content": result.text},
                        {"role": "assistant", "content": " ".join(spoken)}]
        else:
            chunk(SAY_AGAIN)
        first_audio_ns = await first_audio
        await asyncio.gather(*synth)
        assert first_text_ns is not None
        latency = {"turn_detect": (decided_ns - speech_end_ns) / 1e6,
                   "asr": (transcript_ns - decided_ns) / 1e6,
                   "llm_ttft": ttft_ms,
                   "llm_first_text": (first_text_ns - transcript_ns) / 1e6,
                   "tts_first_chunk": (first_audio_ns - first_text_ns) / 1e6,
                   E2E: (first_audio_ns - speech_end_ns) / 1e6}
        return {"transcript": result.text, "reply": " ".join(spoken), "rule": end.rule,
                "speculative_asr_used": guess is not None, "answered": True,
                "latency_ms": turn_row({k: None if v is None else round(v, 1)
                                        for k, v in latency.items()})}

    async def speak(self, text: str, seq: int, first_audio: asyncio.Future[int],
                    slots: asyncio.Semaphore) -> None:
        async with slots:
            parts = self.tts.speak(text, asyncio.Event(), ChunkMetrics(seq))
            async with contextlib.aclosing(parts):
                async for pcm, _final in parts:
                    if pcm and seq == 0 and not first_audio.done():
                        first_audio.set_result(time.time_ns())
        if seq == 0 and not first_audio.done():  # no audio at all: say when it gave up
            first_audio.set_result(time.time_ns())


# -- 1 + 2 + 3: the runs with the whole pipeline up ---------------------------------
def describe(path: str, row: dict[str, Any]) -> str:
    lat = row["latency_ms"]
    parts = " ".join(f"{k.replace('end_of_speech_to_first_audio', 'e2e')} "
                     f"{lat[k]:.0f}" for k in (E2E, *ADDITIVE, "llm_ttft") if k in lat)
    return (f"  {path:8} {row['wav'][:18]:18} {row['rule'] or '-':19} {parts}  "
            f"| {row['transcript'][:40]!r}")


async def pipeline_runs(gateway_url: str, secret: bytes, inproc: InProcess, wavs: list[Path],
                        runs: int, concurrency: list[int], concurrency_runs: int,
                        rng: random.Random) -> dict[str, Any]:
    bus_load, inproc_load = Load(), Load()
    bus_sessions: list[dict[str, Any]] = []
    inproc_sessions: list[dict[str, Any]] = []

    async def one(run: int, label: str, load: Any, play: Any, into: list[dict[str, Any]]) -> None:
        with load.measure():
            session = await play  # a coroutine: it starts running here
        session["run"] = run
        into.append(session)
        for row in session["turns"]:
            print(describe(label, row), flush=True)
        if session["error"]:
            print(f"  {label} session failed: {session['error']}", flush=True)

    for run in range(runs):
        print(f"run {run + 1}/{runs}", flush=True)
        await one(run, "bus", bus_load,
                  bus_session(gateway_url, secret, wavs, tag=f"r{run}-"), bus_sessions)
        await one(run, "in-proc", inproc_load, inproc.session(wavs), inproc_sessions)
    for sessions in (bus_sessions, inproc_sessions):
        if sessions and sessions[0]["turns"]:
            sessions[0]["turns"][0]["warmup"] = True

    rounds: list[dict[str, Any]] = []
    for n in concurrency:
        if n == 1:  # one session at a time is exactly what the bus runs did
            rounds.append({"sessions": 1, "round": 0, "from": "bus runs",
                           "results": bus_sessions})
            continue
        for r in range(concurrency_runs):
            print(f"concurrency: {n} sessions, round {r + 1}/{concurrency_runs}", flush=True)
            load = Load()
            with load.measure():
                results = await asyncio.gather(*(
                    bus_session(gateway_url, secret, wavs, rng.uniform(0.0, 1.0), f"c{n}-")
                    for _ in range(n)))
            rounds.append({"sessions": n, "round": r, "busy_cores": load.cores,
                           "results": list(results)})
            e2e = [t["latency_ms"][E2E] for s in results for t in s["turns"]
                   if E2E in t["latency_ms"]]
            print(f"  {len(e2e)} turns answered, e2e p50 {percentile(e2e, 50) or 0:.0f} "
                  f"p95 {percentile(e2e, 95) or 0:.0f} ms; errors: "
                  f"{[s['error'] for s in results if s['error']] or 'none'}", flush=True)
    return {"bus": bus_sessions, "in_process": inproc_sessions, "concurrency_rounds": rounds,
            "busy_cores": {"bus_runs": bus_load.cores, "in_process_runs": inproc_load.cores}}


def stage_values(sessions: list[dict[str, Any]], stage: str,
                 warmup: bool = False) -> list[float]:
    return [t["latency_ms"][stage] for s in sessions for t in s["turns"]
            if bool(t.get("warmup")) == warmup and stage in t["latency_ms"]]


def concurrency_summary(rounds: list[dict[str, Any]],
                        reference: dict[int, str]) -> list[dict[str, Any]]:
    """Per N: every non-warm-up turn of every session; replies compared with N=1's."""
    out = []
    for n in sorted({r["sessions"] for r in rounds}):
        mine = [r for r in rounds if r["sessions"] == n]
        sessions = [s for r in mine for s in r["results"]]
        turns = [t for s in sessions for t in s["turns"] if not t.get("warmup")]
        e2e = [t["latency_ms"][E2E] for t in turns if E2E in t["latency_ms"]]
        same = sum(1 for s in sessions for t in s["turns"]
                   if reference.get(t["turn"]) == t["reply"])
        # llama.cpp's server ends a streaming reply when another request comes in
        # (llama-cpp-python's interrupt_requests): a reply cut short is a prefix of the
        # one a session alone gets.
        cut = sum(1 for s in sessions for t in s["turns"]
                  if t["reply"] and t["reply"] != reference.get(t["turn"], t["reply"])
                  and reference.get(t["turn"], "").startswith(t["reply"]))
        empty = sum(1 for s in sessions for t in s["turns"] if not t["reply"].strip())
        row = {"sessions": n, "rounds": len(mine), "turns": len(turns),
               "answered": sum(1 for t in turns if t["answered"]),
               "failed_sessions": sum(1 for s in sessions if s["error"]),
               "errors": [s["error"] for s in sessions if s["error"]],
               "e2e_ms": summary(e2e),
               "stage_p50_ms": {k: percentile([t["latency_ms"][k] for t in turns
                                               if k in t["latency_ms"]], 50)
                                for k in (*ADDITIVE, "llm_ttft", "delivery")},
               "replies_as_one_session": f"{same}/{sum(len(s['turns']) for s in sessions)}",
               "replies_cut_short": cut, "replies_empty": empty,
               "from": mine[0].get("from", "concurrent sessions")}
        busy = [r["busy_cores"] for r in mine if r.get("busy_cores") is not None]
        row["busy_cores"] = round(sum(busy) / len(busy), 2) if busy else None
        row["ok"] = (bool(e2e) and not row["failed_sessions"] and row["answered"] == len(turns)
                     and row["e2e_ms"]["p95"] < P95_LIMIT_MS)
        out.append(row)
    return out


# -- 4. the VAD path alone ----------------------------------------------------------
@dataclass
class TimedBus(Bus):
    """A ``Bus`` that remembers each audio frame's ``created_ns`` (when it was sent)."""

    frames: dict[str, list[int]] = field(default_factory=dict)

    async def publish(self, stream: str, event: Event) -> str:
        entry = await super().publish(stream, event)
        if isinstance(event, AudioFrame):
            self.frames.setdefault(event.session_id, []).append(event.created_ns)
        return entry


async def vad_round(url: str, prefix: str, n: int, reps: int, clips: list[np.ndarray],
                    rng: random.Random, pids: dict[str, int | None]) -> dict[str, Any]:
    client = connect(url)
    bus = TimedBus(client, Keys(prefix))
    tag = secrets.token_hex(3)
    mics: list[Microphone] = []
    lengths: list[int] = []
    cycle = sum(clip.size + 2 * RATE for clip in clips)
    for i in range(n):
        mic = Microphone(bus, f"vad{n}-{tag}-{i:03d}")
        # 1 s of warm-up silence, then a random part of one cycle through the WAVs, so
        # the sessions' turn ends spread out as independent users' would. In whole
        # windows: every session's audio lines up with the VAD's windows the same way,
        # so the rules and Smart Turn's answers are the same at every N.
        lead = RATE + round(rng.uniform(0, cycle) / WINDOW) * WINDOW
        mic.say(np.zeros(lead, np.float32))
        total = lead
        for _ in range(reps):
            for clip in clips:
                mic.say(clip)
                mic.say(np.zeros(2 * RATE, np.float32))
                total += clip.size + 2 * RATE
        mics.append(mic)
        lengths.append(total)

    async def play(mic: Microphone, samples: int) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mic.run(stop))
        while mic.sent < samples + RATE // 2 and not task.done():
            await asyncio.wait({task}, timeout=0.1)
        stop.set()
        await task

    found: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def collect() -> None:
        last = {bus.keys.out(m.session_id): "0-0" for m in mics}
        while not done.is_set():
            for stream, entries in await read(client, last, 200, 100):
                for entry_id, fields in entries:
                    last[stream] = entry_id
                    event = decode(fields[FIELD])
                    if isinstance(event, TurnEnded):
                        found.append({"sid": event.session_id, "created_ns": event.created_ns,
                                      "arrived_ns": time.time_ns(), "rule": event.rule,
                                      "speech_end_ms": event.speech_end_ms,
                                      "decided_ms": event.decided_ms})

    b0, t0 = machine_cpu()
    cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
    self0, wall0 = sum(os.times()[:2]), time.monotonic()
    reader = asyncio.create_task(collect())
    await asyncio.gather(*(play(m, s) for m, s in zip(mics, lengths, strict=True)))
    wall = time.monotonic() - wall0  # CPU while the sessions streamed, not the drain
    b1, t1 = machine_cpu()
    cpu = {k: None if (p := proc_cpu_s(pid)) is None or cpu0[k] is None
           else round((p - cpu0[k]) / wall, 2) for k, pid in pids.items()}
    rss_at_end = rss_mb(pids["vad_worker"])  # every session still live
    cpu["publisher"] = round((sum(os.times()[:2]) - self0) / wall, 2)
    cpu["machine"] = round((b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1), 2)
    cpu["other"] = round(max(0.0, cpu["machine"] - sum(
        v or 0.0 for k, v in cpu.items() if k != "machine")), 2)
    # Drain: a worker that fell behind still owes decisions, and the next round must
    # not share the machine with its backlog. It releases (acks) a session once it has
    # handled its SessionEnded, which comes after all of the session's frames.
    drain0 = time.monotonic()
    for _ in range(int(VAD_DRAIN_LIMIT_S / 0.2)):
        if not (await client.xpending(bus.keys.sessions(), "vad"))["pending"]:
            break
        await asyncio.sleep(0.2)
    drain_s = time.monotonic() - drain0
    await asyncio.sleep(0.5)  # the last TurnEnded reads
    done.set()
    await reader
    await client.aclose()

    started = {m.session_id: m.started_ns for m in mics}
    decision, processing = [], []
    for t in found:
        frames = bus.frames[t["sid"]]
        end_seq, decided_seq = t["speech_end_ms"] // FRAME_MS - 1, t["decided_ms"] // FRAME_MS - 1
        t["decision_lag_ms"] = round((t["created_ns"] - frames[end_seq]) / 1e6, 1)
        t["processing_lag_ms"] = round((t["created_ns"] - frames[decided_seq]) / 1e6, 1)
        decision.append(t["decision_lag_ms"])
        processing.append(t["processing_lag_ms"])
    publisher = [(ns - started[sid] - (seq + 1) * FRAME_MS * 1_000_000) / 1e6
                 for sid, sent in bus.frames.items() for seq, ns in enumerate(sent)]
    by_rule: dict[str, list[float]] = {}
    for t in found:
        by_rule.setdefault(t["rule"], []).append(t["decision_lag_ms"])
    return {"sessions": n, "reps": reps, "turns": len(found),
            "rules": dict(Counter(t["rule"] for t in found)),
            "lag_by_rule_ms": {k: summary(v) for k, v in sorted(by_rule.items())},
            "decision_lag_ms": summary(decision), "processing_lag_ms": summary(processing),
            "publisher_lag_ms": summary(publisher), "cpu_cores": cpu,
            "vad_rss_mb": rss_at_end, "vad_rss_peak_mb": peak_rss_mb(pids["vad_worker"]),
            "frames_sent": sum(len(v) for v in bus.frames.values()),
            "drain_s": round(drain_s, 1), "turn_list": found}


def wait_for_quiet(limit_s: float = 20.0) -> float:
    """Wait (at most ``limit_s``) until the whole machine is idle; its busy cores then."""
    deadline = time.monotonic() + limit_s
    while True:
        b0, t0 = machine_cpu()
        time.sleep(1.0)
        b1, t1 = machine_cpu()
        busy = (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)
        if busy <= QUIET or time.monotonic() > deadline:
            return busy


def vad_path(counts: list[int], reps: int, out: Path, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    clips = [clip16k(w) for w in default_wavs()]
    prefix = f"bench{secrets.token_hex(3)}"
    log = out.with_suffix(".vad_worker.log")
    with EmbeddedRedis() as server:
        env = {**os.environ, "REDIS_URL": server.url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
               "VOICEBUS_TRACING__LOCAL_PATH": str(out.with_suffix(".spans.jsonl")),
               "PYTHONUNBUFFERED": "1"}
        worker = start_worker("vad", env, log, timeout_s=120)
        try:
            pids = {"vad_worker": worker.pid,
                    "redis": server._proc.pid if server._proc is not None else None}
            rounds = []
            for n in counts:
                # The baseline gets twice the turns: every other round is measured against it.
                n_reps = 2 * reps if n == 1 else reps
                busy = wait_for_quiet()
                print(f"VAD path: {n} session(s) x {n_reps} rep(s) ..."
                      + (f" (the machine is busy: {busy:.2f} cores)" if busy > QUIET else ""),
                      flush=True)
                result = asyncio.run(vad_round(server.url, prefix, n, n_reps, clips, rng, pids))
                result["busy_cores_before"] = round(busy, 2)
                d, p = result["decision_lag_ms"], result["processing_lag_ms"]
                print(f"  {result['turns']} turns; decision lag p50 {d['p50']} p95 {d['p95']} "
                      f"max {d['max']} ms; behind real time at the decision p95 {p['p95']} "
                      f"max {p['max']} ms; cpu {result['cpu_cores']}; caught up "
                      f"{result['drain_s']} s after the last frame; worker RSS "
                      f"{result['vad_rss_mb']} MiB (peak so far {result['vad_rss_peak_mb']})",
                      flush=True)
                rounds.append(result)
        finally:
            processes.stop(worker, grace_s=30)
    return rounds


def vad_verdict(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest N (with every smaller N) whose decision-lag p95 stays within
    ``VAD_SLACK_MS`` of the 1-session round's, rule by rule, with no turn lost.

    Rule by rule because the lag includes the rule's own wait, decided in audio time and
    so the same at every N (0.2 s of silence + Smart Turn, or the 1.5 s silence timeout):
    one p95 over a mix of both, from a handful of turns, would compare sample quantiles
    of that mix rather than how late the worker is."""
    base = next((r for r in rounds if r["sessions"] == 1), None)
    if base is None or not base["turns"]:
        return {"baseline_p95_ms": None, "largest_ok": None}
    largest, failed = 0, False
    for r in sorted(rounds, key=lambda r: r["sessions"]):
        r["expected_turns"] = round(base["turns"] / base["reps"] * r["reps"] * r["sessions"])
        excess = [r["lag_by_rule_ms"][rule]["p95"] - base["lag_by_rule_ms"][rule]["p95"]
                  for rule in base["lag_by_rule_ms"] if rule in r["lag_by_rule_ms"]]
        r["worst_p95_excess_ms"] = round(max(excess), 1) if excess else None
        r["ok"] = (r["turns"] >= r["expected_turns"] and bool(excess)
                   and max(excess) <= VAD_SLACK_MS)
        failed = failed or not r["ok"]
        if not failed:
            largest = r["sessions"]
    return {"baseline_p95_ms": base["decision_lag_ms"]["p95"],
            "baseline_p95_by_rule_ms": {k: v["p95"] for k, v in base["lag_by_rule_ms"].items()},
            "largest_ok": largest}


# -- report ---------------------------------------------------------------------------
def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def paired(bus: list[dict[str, Any]], inproc: list[dict[str, Any]], stage: str) -> list[float]:
    """Bus minus in process for the same turn (same run, same WAV), warm-up left out."""
    diffs = []
    for sb, si in zip(bus, inproc, strict=False):
        for tb, ti in zip(sb["turns"], si["turns"], strict=False):
            if tb.get("warmup") or ti.get("warmup") or tb["wav"] != ti["wav"]:
                continue
            if stage in tb["latency_ms"] and stage in ti["latency_ms"]:
                diffs.append(tb["latency_ms"][stage] - ti["latency_ms"][stage])
    return diffs


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b < 1 else round(a / b, 2)


def breakdown(bus: list[dict[str, Any]], inproc: list[dict[str, Any]]) -> dict[str, Any]:
    table = {}
    for stage in (*STAGES, "delivery"):
        b, i = summary(stage_values(bus, stage)), summary(stage_values(inproc, stage))
        table[stage] = {"bus": b, "in_process": i, "ratio_p50": ratio(b["p50"], i["p50"]),
                        "ratio_mean": ratio(b["mean"], i["mean"]),
                        "paired_diff_ms": summary(paired(bus, inproc, stage))}
    warm = {"bus": (stage_values(bus, E2E, True) or [None])[0],
            "in_process": (stage_values(inproc, E2E, True) or [None])[0]}
    return {"stages": table, "warmup_e2e_ms": warm}


def print_breakdown(result: dict[str, Any]) -> None:
    t = result["stages"]
    head = (f"{'stage (ms)':30}{'bus p50':>8}{'p95':>6}{'p99':>6}{'n':>3} |"
            f"{'in-proc p50':>12}{'p95':>6}{'p99':>6}{'n':>3} |{'ratio p50':>10}"
            f"{'mean':>6} |{'paired diff p50':>16}{'mean':>6}")
    print(head)
    print("-" * len(head))
    for stage, row in t.items():
        b, i, d = row["bus"], row["in_process"], row["paired_diff_ms"]
        print(f"{stage:30}{fmt(b['p50']):>8}{fmt(b['p95']):>6}{fmt(b['p99']):>6}{b['n']:>3} |"
              f"{fmt(i['p50']):>12}{fmt(i['p95']):>6}{fmt(i['p99']):>6}{i['n']:>3} |"
              f"{fmt(row['ratio_p50'], '.2f'):>10}{fmt(row['ratio_mean'], '.2f'):>6} |"
              f"{fmt(d['p50'], '+.0f'):>16}{fmt(d['mean'], '+.0f'):>6}")
    print("ratio: bus / in process (of the p50s, of the means); paired diff: bus - in process "
          "for the same turn (same run and WAV), its median and mean")
    e2e = t[E2E]
    b, i, d = e2e["bus"], e2e["in_process"], e2e["paired_diff_ms"]
    if b["p50"] is not None and i["p50"] is not None and d["n"]:
        print(f"\nbus overhead, end of speech -> first audio: x{e2e['ratio_mean']:.2f} "
              f"(means {b['mean']:.0f} / {i['mean']:.0f} ms); same turn: median "
              f"{d['p50']:+.0f} ms, mean {d['mean']:+.0f} ms (n={d['n']}); p50s "
              f"{b['p50']:.0f} / {i['p50']:.0f} ms = x{e2e['ratio_p50']:.2f}")
        print("  (the total is bimodal: smart_turn turns ~1.5-2 s, silence_timeout ones "
              "~2.5 s; over a few turns its p50 can fall in the gap between them and jump, "
              "so the ratio of means and the paired difference are the steadier measures)")
    w = result["warmup_e2e_ms"]
    print(f"warm-up turn (first turn of the first run, not counted above): bus "
          f"{fmt(w['bus'])} ms, in process {fmt(w['in_process'])} ms")


def draw_chart(result: dict[str, Any], path: Path, title: str) -> bool:
    """Two stacked bars (bus, in process): mean ms per stage, the p50 total marked."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        print("PNG skipped: Pillow is not installed (it comes with pipecat-ai)")
        return False
    t = result["stages"]
    parts = (*ADDITIVE, "delivery")
    colours = {"turn_detect": (76, 114, 176), "asr": (221, 132, 82),
               "llm_first_text": (85, 168, 104), "tts_first_chunk": (196, 78, 82),
               "delivery": (129, 114, 179)}
    bars = [(name, {p: t[p][key]["mean"] or 0.0 for p in parts}, t[E2E][key])
            for name, key in (("bus", "bus"), ("in process", "in_process"))]
    biggest = max([sum(v.values()) for _, v, _ in bars]
                  + [s["p95"] or 0.0 for _, _, s in bars] + [1.0])
    step = next(s for s in (100, 250, 500, 1000, 2000, 5000, 10_000) if biggest / s <= 8)
    top = (int(biggest / step) + 1) * step
    width, height, left, right = 1000, 330, 120, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)

    def x(ms: float) -> float:
        return left + (width - left - right) * ms / top

    draw.text((left, 10), title, fill="black", font=font)
    axis_y = 210
    for tick in range(0, top + 1, step):
        draw.line([(x(tick), 45), (x(tick), axis_y)], fill=(225, 225, 225))
        draw.text((x(tick) - 12, axis_y + 4), f"{tick}", fill="black", font=small)
    draw.text((width - right - 20, axis_y + 18), "ms", fill="black", font=small)
    for row, (name, means, total) in enumerate(bars):
        y0 = 55 + row * 75
        draw.text((10, y0 + 18), name, fill="black", font=font)
        at = 0.0
        for p in parts:
            if means[p] > 0:
                draw.rectangle([x(at), y0, x(at + means[p]), y0 + 50], fill=colours[p])
                if x(at + means[p]) - x(at) > 38:
                    draw.text((x(at) + 3, y0 + 18), f"{means[p]:.0f}", fill="white",
                              font=small)
            at += max(0.0, means[p])
        for q, shade in (("p50", (0, 0, 0)), ("p95", (120, 120, 120))):
            if total[q] is not None:
                draw.line([(x(total[q]), y0 - 5), (x(total[q]), y0 + 55)], fill=shade, width=3)
                draw.text((x(total[q]) + 4, y0 - 8), f"{q} {total[q]:.0f}", fill=shade,
                          font=small)
    lx = left
    for p in parts:
        draw.rectangle([lx, 262, lx + 14, 276], fill=colours[p])
        draw.text((lx + 18, 262), p, fill="black", font=small)
        lx += 30 + int(draw.textlength(p, font=small))
    draw.text((left, 290), "bars: mean ms per stage (they add up to the mean total); lines: "
              "end of speech -> first audio p50 / p95", fill=(90, 90, 90), font=small)
    image.save(path)
    return True


def agreement(bus: list[dict[str, Any]], inproc: list[dict[str, Any]]) -> dict[str, Any]:
    """Did both paths hear and answer the same (temperature 0, same prompts)?"""
    pairs = [(b, i) for sb, si in zip(bus, inproc, strict=False)
             for b, i in zip(sb["turns"], si["turns"], strict=False)]
    return {"pairs": len(pairs),
            "same_transcript": sum(b["transcript"] == i["transcript"] for b, i in pairs),
            "same_reply": sum(b["reply"] == i["reply"] for b, i in pairs),
            "rules_bus": dict(Counter(t["rule"] for s in bus for t in s["turns"])),
            "rules_in_process": dict(Counter(t["rule"] for s in inproc for t in s["turns"])),
            "in_process_speculative_asr_used": sum(
                1 for s in inproc for t in s["turns"] if t.get("speculative_asr_used"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="bus / in-process sessions")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--concurrency-runs", type=int, default=2,
                        help="rounds per concurrency level (N=1 reuses the bus runs)")
    parser.add_argument("--no-concurrency", action="store_true")
    parser.add_argument("--vad-sessions", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--vad-reps", type=int, default=2)
    parser.add_argument("--no-vad", action="store_true", help="skip the VAD-path rounds")
    parser.add_argument("--vad-only", action="store_true",
                        help="only the VAD-path rounds (its lag, CPU and memory per N)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 run, concurrency 1 2 (1 round), VAD 10 50 (1 rep)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/pipeline_latency.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.concurrency, args.concurrency_runs = 1, [1, 2], 1
        args.vad_sessions, args.vad_reps = [10, 50], 1
    if args.vad_only:
        rounds = vad_path(sorted({1, *args.vad_sessions}), args.vad_reps, args.out, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "pipeline_latency", "vad_path": {
            "rounds": rounds, **vad_verdict(rounds)}}, indent=1, default=str) + "\n")
        return 0
    concurrency = [] if args.no_concurrency else sorted(set(args.concurrency))
    vad_counts = [] if args.no_vad else sorted({1, *args.vad_sessions})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    idle_busy = busy_cores_before_start()

    from voicebus.supervisor import Supervisor

    wavs = default_wavs()
    secret = secrets.token_urlsafe(24)[:32]
    bench_env = {"VOICEBUS_GATEWAY__PORT": "0", "VOICEBUS_GATEWAY__SECRET": secret,
                 "VOICEBUS_LLM__TEMPERATURE": "0",
                 "VOICEBUS_TRACING__LOCAL_PATH": str(args.out.with_suffix(".spans.jsonl"))}
    config = load_config(env={**os.environ, **bench_env})  # what the workers will see
    report: dict[str, Any] = {
        "benchmark": "pipeline_latency", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(), "busy_cores_before_start": idle_busy},
        "params": {"runs": args.runs, "concurrency": concurrency,
                   "concurrency_runs": args.concurrency_runs, "vad_sessions": vad_counts,
                   "vad_reps": args.vad_reps, "seed": args.seed, "wavs": [w.name for w in wavs],
                   "p95_limit_ms": P95_LIMIT_MS, "vad_slack_ms": VAD_SLACK_MS},
        "config": {"vad": config.vad.type, "speculative_asr": config.vad.speculative_asr,
                   "asr": config.asr.model, "llm": config.llm.model,
                   "llm_chunking": config.llm.chunking, "temperature": config.llm.temperature,
                   "tts": config.tts.backend},
    }
    log_path = args.out.with_suffix(".supervisor.log")
    print(f"starting the pipeline (log: {log_path}) ...", flush=True)
    with open(log_path, "w") as log_stream:
        supervisor = Supervisor(None, llm=config.llm, env=bench_env, log_stream=log_stream)
        supervisor.start()
        try:
            llm_url = supervisor.llm_url or config.llm.base_url
            assert llm_url and supervisor.gateway_url, "no LLM URL or no gateway"
            print(f"gateway {supervisor.gateway_url}, LLM {llm_url}; loading the in-process "
                  "models ...", flush=True)
            inproc = InProcess.load(config, llm_url)
            runs = asyncio.run(pipeline_runs(supervisor.gateway_url, secret.encode(), inproc,
                                             wavs, args.runs, concurrency,
                                             args.concurrency_runs, rng))
            inproc.asr_pool.shutdown()
        finally:
            supervisor.stop()
    report.update(runs)
    report["breakdown"] = breakdown(runs["bus"], runs["in_process"])

    # temperature 0: one session alone gets these replies (the first bus run's)
    reference = {t["turn"]: t["reply"] for t in runs["bus"][0]["turns"]} if runs["bus"] else {}
    report["agreement"] = agreement(runs["bus"], runs["in_process"])
    conc = concurrency_summary(runs["concurrency_rounds"], reference) if concurrency else []
    largest_conc = 0
    for row in conc:
        if not row["ok"]:
            break
        largest_conc = row["sessions"]
    report["concurrency"] = {"levels": conc, "largest_ok": largest_conc if conc else None}

    vad_rounds = vad_path(vad_counts, args.vad_reps, args.out, args.seed) if vad_counts else []
    verdict = vad_verdict(vad_rounds) if vad_rounds else {}
    report["vad_path"] = {"rounds": vad_rounds, **verdict}

    # -- print ---------------------------------------------------------------------
    print(f"\nend of speech -> first audio and its stages, ms ({args.runs} run(s) x "
          f"{len(wavs)} WAVs; the first turn of the first run is warm-up)")
    print("bus: the gateway's turn_done marks; in-proc: the same marks, same models and "
          "code, one process, no Redis (speculative ASR mirrored)")
    print_breakdown(report["breakdown"])
    a = report["agreement"]
    print(f"same transcript {a['same_transcript']}/{a['pairs']}, same reply "
          f"{a['same_reply']}/{a['pairs']}; rules bus {a['rules_bus']}, in process "
          f"{a['rules_in_process']}; in-process turns that used the speculative ASR: "
          f"{a['in_process_speculative_asr_used']}")
    bc = runs["busy_cores"]
    print(f"busy cores (whole machine) during the bus runs {fmt(bc['bus_runs'], '.2f')}, "
          f"in-process runs {fmt(bc['in_process_runs'], '.2f')}")
    if conc:
        print(f"\nconcurrent sessions through the gateway (p95 limit {P95_LIMIT_MS:.0f} ms):")
        head = (f"{'N':>3}{'turns':>7}{'answered':>10}{'fails':>6}{'e2e p50':>9}{'p95':>7}"
                f"{'p99':>7}{'max':>7} {'detect':>7}{'asr':>6}{'llm txt':>8}{'ttft':>6}"
                f"{'tts':>6}{'deliv':>6}{'cores':>6}  replies: as 1 session / cut short / empty")
        print(head)
        print("-" * len(head))
        for row in conc:
            e, s = row["e2e_ms"], row["stage_p50_ms"]
            print(f"{row['sessions']:>3}{row['turns']:>7}{row['answered']:>10}"
                  f"{row['failed_sessions']:>6}{fmt(e['p50']):>9}{fmt(e['p95']):>7}"
                  f"{fmt(e['p99']):>7}{fmt(e['max']):>7} {fmt(s['turn_detect']):>7}"
                  f"{fmt(s['asr']):>6}{fmt(s['llm_first_text']):>8}{fmt(s['llm_ttft']):>6}"
                  f"{fmt(s['tts_first_chunk']):>6}{fmt(s['delivery']):>6}"
                  f"{fmt(row['busy_cores'], '.2f'):>6}  {row['replies_as_one_session']} / "
                  f"{row['replies_cut_short']} / {row['replies_empty']}"
                  f"{'' if row['ok'] else '  (over the limit)'}")
        print("stage columns are p50s; N=1 is the bus runs above (warm-up excluded); "
              "answered: turns with audio")
        if any(r["replies_cut_short"] or r["replies_empty"] for r in conc):
            print("replies cut short or empty: llama-cpp-python's server ends a streaming "
                  "reply when another request arrives (interrupt_requests, on by default); "
                  "an empty reply is a turn the user hears nothing for")
        print(f"largest N with e2e p95 < {P95_LIMIT_MS:.0f} ms (and every smaller N): "
              f"{largest_conc}")
    if vad_rounds:
        print("\nVAD path alone: one vad worker, N real-time sessions straight onto the bus "
              f"(1 session: {2 * args.vad_reps} reps, the others {args.vad_reps})")
        rules = sorted({k for r in vad_rounds for k in r["lag_by_rule_ms"]})
        head = (f"{'N':>4}{'turns':>10}{'lag p50':>9}{'p95':>7}{'max':>7}"
                + "".join(f"{(k[:13] + ' p95'):>18}" for k in rules)
                + f"{'worst +':>8}{'behind p95':>11}{'max':>7}{'pub p99':>8}{'worker':>7}"
                  f"{'redis':>6}{'pub':>6}{'other':>6}{'drain s':>8}")
        print(head)
        print("-" * len(head))
        for r in vad_rounds:
            d, p, c = r["decision_lag_ms"], r["processing_lag_ms"], r["cpu_cores"]
            turns = f"{r['turns']}/{r.get('expected_turns', '?')}"
            print(f"{r['sessions']:>4}{turns:>10}{fmt(d['p50']):>9}{fmt(d['p95']):>7}"
                  f"{fmt(d['max']):>7}"
                  + "".join(f"{fmt(r['lag_by_rule_ms'].get(k, {}).get('p95')):>18}"
                            for k in rules)
                  + f"{fmt(r.get('worst_p95_excess_ms'), '+.0f'):>8}"
                  f"{fmt(p['p95']):>11}{fmt(p['max']):>7}"
                  f"{fmt(r['publisher_lag_ms']['p99'], '.1f'):>8}"
                  f"{fmt(c.get('vad_worker'), '.2f'):>7}{fmt(c.get('redis'), '.2f'):>6}"
                  f"{fmt(c.get('publisher'), '.2f'):>6}{fmt(c.get('other'), '.2f'):>6}"
                  f"{fmt(r['drain_s'], '.1f'):>8}{'' if r.get('ok') else '  (over)'}")
        print("lag: end of speech (the frame holding it, as sent) -> TurnEnded created, the "
              "rule's own wait included (by rule: p95 per rule; worst +: the largest rise of a "
              "rule's p95 over 1 session); behind: TurnEnded created - the frame of the "
              "deciding audio; pub p99: how late the publisher (this process) sent frames "
              "against the real-time schedule; cpu columns in cores while the sessions streamed "
              "(other: everything else on the machine: noise); "
              "drain: how long after the last frame the worker had handled everything")
        print(f"largest N with every rule's decision-lag p95 within +{VAD_SLACK_MS:.0f} ms "
              f"of 1 session's ({verdict.get('baseline_p95_by_rule_ms')}) and no turn lost: "
              f"{verdict.get('largest_ok')}")

    chart = args.out.with_suffix(".png")
    title = (f"end of speech -> first audio, bus vs in process ({os.cpu_count()} cores, "
             f"{args.runs} runs x {len(wavs)} turns)")
    if draw_chart(report["breakdown"], chart, title):
        report["chart"] = str(chart)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out}" + (f" and {chart}" if report.get("chart") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

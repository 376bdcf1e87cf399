"""The chaos harness: the real product under faults, and a checker of what devices saw.

Shared by ``bench/chaos.py`` (the long run and its table) and ``tests/chaos`` (what CI
runs). It runs the system as an operator would: two OS processes per worker stage
(``python -m voicebus worker STAGE``) and one gateway against one Redis, a scripted
OpenAI-compatible LLM (``tests/support/openai_server.py``: multi-sentence replies,
a per-token delay so a fault can land after partial output), and devices that speak
real recordings in real time through the gateway (``edge.client.talk_wavs``).

The harness plays the supervisor: a killed process is replaced by a new one at once,
so each stage keeps two. Faults are aimed at the process doing the turn's work (the
holder of the pending entry, the owner of the session) at a seeded random moment, and
each fault records whether it really landed inside the turn (a fault that missed
proves nothing, and the CI test fails on it).

The checker speaks Jepsen's queue-checker language, per utterance a device spoke:

* **completed**: the device got an answer (final transcript, reply text, audio and a
  ``turn_done`` that was not cut off);
* **lost**: an utterance never answered;
* **duplicated**: a second answer to one utterance, a reply ``(turn, seq)`` shown
  twice, or more audio than the turn's distinct ``(seq, part)`` audio chunks on the
  bus hold (the device cannot see part numbers; the bus can).

**Recovery delay** of a turn hit by a fault: its *answer time* minus the median answer
time of the run's fault-free turns. Answer time is end of speech -> ``turn_done`` (the
whole reply sent), not -> first audio: a fault after partial output or partial audio
delays the rest of the reply, not its first byte. End of speech is placed on the
device's clock as (arrival of the ``audio`` message) - (the gateway's
``end_of_speech_to_first_audio``): one machine, one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from edge.audio_io import VirtualSpeaker
from edge.auth import mint
from edge.client import TurnResult, talk_wavs
from edge.errors import ClientError
from schemas import AudioChunk, DeadLetter, SchemaError, decode
from voicebus.processes import die_with_parent
from voicebus.supervisor import STARTED
from workers.runtime.bus import FIELD, as_str
from workers.runtime.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "voicebus" / "samples"
UTTERANCES = ("cmu_goforward", "cmu_arctic_slt_a0009", "librivox_sense_sensibility_0880")
STAGES = ("vad", "asr", "llm", "tts")
PER_STAGE = 2
JOB_QUEUES = ("asr", "llm", "tts")
READY = {"gateway": "gateway listening on "}  # else the runtime's "started (group" line
# Three sentences streamed word by word: TTS gets three jobs and a kill can land
# between the first and the last. The last is long: its synthesis takes long enough
# for a kill after the first audio to find it still under way.
REPLY = ("Sure, I can help with that. Let me think about it for a moment. "
         "Here is what I would do next, one step after the other, starting with the "
         "first thing on the list and ending with the last one.")
TOKEN_DELAY_S = 0.06
ANSWER_TIMEOUT_S = 30.0  # an unanswered utterance costs this; the slowest answer here ~15 s
# A rolling restart (8 processes, ~5-10 s each here) outlasts a short conversation.
ROLLING_MIN_TURNS = 6
SETTLE_S = 15.0  # after the sessions end: teardowns run, TTLs are set
POISON = b"\xc1 not msgpack \xff"
T = TypeVar("T")


def reply_pieces() -> list[str]:
    words = REPLY.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def product_env(redis_url: str, prefix: str, llm_url: str, secret: str,
                claim_idle_ms: int = 3000, liveness_ms: int | None = None) -> dict[str, str]:
    """The environment every process gets: short timings so faults resolve quickly;
    ``liveness_ms`` None: the product's default heartbeat."""
    env = {"REDIS_URL": redis_url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
           "VOICEBUS_GATEWAY__PORT": "0", "VOICEBUS_GATEWAY__SECRET": secret,
           "VOICEBUS_LLM__BASE_URL": llm_url, "VOICEBUS_LLM__TEMPERATURE": "0",
           "VOICEBUS_REDIS__CLAIM_IDLE_MS": str(claim_idle_ms),
           "VOICEBUS_REDIS__BLOCK_MS": "200", "PYTHONUNBUFFERED": "1",
           # The audit reads each session's whole out stream after the run: keep it all.
           "VOICEBUS_REDIS__OUT_KEEP_S": "0"}
    if liveness_ms is not None:
        env["VOICEBUS_WORKER__LIVENESS_MS"] = str(liveness_ms)
    return env


# -- processes: the harness plays the supervisor ----------------------------------------
class Spawner:
    """Runs process starts on one long-lived thread. ``die_with_parent`` (Linux's
    PDEATHSIG) signals a child when the *thread* that started it ends, not the process,
    and fault injectors run in short-lived threads: their replacements would be
    SIGTERMed as soon as the injector's thread finished."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-spawner")
        self._thread.start()

    def call(self, start: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return start()
        done: Future[T] = Future()
        self._jobs.put((start, done))
        return done.result()

    def _run(self) -> None:
        while True:
            start, done = self._jobs.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)


SPAWNER = Spawner()


@dataclass
class Proc:
    role: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def ready(self) -> bool:
        marker = READY.get(self.role, ": started (group").encode()
        return marker in self.log.read_bytes()


class Fleet:
    """Two processes per stage and one gateway; killed ones are replaced at once."""

    def __init__(self, env: dict[str, str], logs: Path, *, supervised: bool = False) -> None:
        self.env, self.logs = env, logs
        # As `voicebus up` does: a killed worker's heartbeat key is deleted at once, so
        # peers take its work at their next look, not when the key expires.
        self.supervised = supervised
        self.procs: list[Proc] = []  # every process ever started, the dead ones too
        self.replaced: set[int] = set()  # pids we killed or stopped on purpose
        self._lock = threading.Lock()

    def start(self, timeout: float = 240.0) -> None:
        self.spawn("gateway")
        for stage in STAGES:
            for _ in range(PER_STAGE):
                self.spawn(stage)
        self.wait_ready(timeout)

    def spawn(self, role: str) -> Proc:
        return SPAWNER.call(lambda: self._spawn(role))

    def _spawn(self, role: str) -> Proc:
        command = ["gateway"] if role == "gateway" else ["worker", role]
        with self._lock:
            log = self.logs / f"{role}-{len(self.procs)}.log"
            popen = subprocess.Popen(
                [sys.executable, "-m", "voicebus", *command], cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, preexec_fn=die_with_parent)
            proc = Proc(role, popen, log)
            self.procs.append(proc)
        return proc

    def live(self, role: str | None = None) -> list[Proc]:
        with self._lock:
            return [p for p in self.procs if p.alive() and role in (None, p.role)]

    def by_pid(self, pid: int) -> Proc | None:
        return next((p for p in self.live() if p.pid == pid), None)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(p.ready() for p in self.live()):
            if time.monotonic() > deadline:
                late = [p.log.name for p in self.live() if not p.ready()]
                raise RuntimeError(f"not ready within {timeout:.0f} s: {late}")
            time.sleep(0.1)

    def gateway_url(self) -> str:
        [gateway] = self.live("gateway")
        text = gateway.log.read_text(errors="replace")
        return text.split(READY["gateway"], 1)[1].split()[0]

    def kill_and_replace(self, proc: Proc) -> None:
        """kill -9, then start a new one as a supervisor would (not waiting for it)."""
        self.replaced.add(proc.pid)
        proc.popen.kill()
        proc.popen.wait()
        if self.supervised:
            self._declare_dead(proc)
        self.spawn(proc.role)

    def _declare_dead(self, proc: Proc) -> None:
        started = STARTED.search(proc.log.read_text(errors="replace"))
        if started is None:
            return
        with redis.Redis.from_url(self.env["REDIS_URL"]) as client:
            client.delete(Keys(started["prefix"]).alive(started["consumer"]))

    def restart_gracefully(self, proc: Proc, timeout: float = 120.0) -> None:
        """SIGTERM (the worker hands its work back), then a new one, ready."""
        self.replaced.add(proc.pid)
        proc.popen.terminate()
        try:
            proc.popen.wait(30)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        new = self.spawn(proc.role)
        deadline = time.monotonic() + timeout
        while not new.ready():
            if not new.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"replacement {new.log.name} did not start")
            time.sleep(0.1)

    def crashed(self) -> list[str]:
        """Processes that died without the harness killing them."""
        with self._lock:
            return [f"{p.log.name} (exit {p.popen.returncode})" for p in self.procs
                    if not p.alive() and p.pid not in self.replaced]

    def stop(self) -> None:
        for proc in self.live():
            proc.popen.terminate()
        for proc in list(self.procs):
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


# -- what Redis says: who holds what, poison, leftover keys -----------------------------
def _pid_of(consumer: str) -> int | None:
    """Consumer names are ``stage-host-pid-random`` (``workers.runtime.bus``)."""
    parts = consumer.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class Probe:
    """Synchronous Redis reads and writes the fault injectors and the checker need."""

    def __init__(self, url: str, prefix: str) -> None:
        # Retried: the bench kills and pauses this Redis between the probe's calls.
        self.redis = redis.Redis.from_url(
            url, socket_timeout=5, retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 8),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def pending(self, stream: str) -> list[tuple[str, int]]:
        """(entry id, holder pid) of every pending entry of every group of ``stream``."""
        out: list[tuple[str, int]] = []
        with contextlib.suppress(redis.ResponseError):  # no such stream yet
            groups: Any = self.redis.xinfo_groups(stream)  # redis-py's types are loose
            for group in groups:
                items: Any = self.redis.xpending_range(stream, group["name"], "-", "+", 100)
                for item in items:
                    pid = _pid_of(as_str(item["consumer"]))
                    if pid is not None:
                        out.append((as_str(item["message_id"]), pid))
        return out

    def events(self, stream: str, start: str = "-", end: str = "+") -> list[bytes]:
        """The encoded events of a stream's entries."""
        entries: Any = self.redis.xrange(stream, start, end)
        return [fields.get(FIELD, b"") for _, fields in entries]

    def decoded(self, stream: str) -> Iterator[object]:
        for data in self.events(stream):
            with contextlib.suppress(SchemaError):
                yield decode(data)

    def job_holder(self, stage: str) -> int | None:
        held = self.pending(self.key("q", stage))
        return held[0][1] if held else None

    def still_holds(self, stream: str, pid: int) -> bool:
        return any(holder == pid for _, holder in self.pending(stream))

    def session_owner(self, session_id: str) -> int | None:
        """The VAD process that owns the session (holds its announcement pending)."""
        stream = self.key("sessions")
        for entry_id, pid in self.pending(stream):
            if any(session_id.encode() in data for data in self.events(stream, entry_id,
                                                                         entry_id)):
                return pid
        return None

    def poison_every_stream(self, session_id: str) -> dict[str, str]:
        """Undecodable entries on every stream; those a consumer group reads must end up
        dead-lettered (the out stream and the control lane have no group)."""
        streams = [self.key("sessions"), self.key("control"),
                   *(self.key("q", s) for s in JOB_QUEUES),
                   Keys(self.prefix).audio(session_id), Keys(self.prefix).out(session_id)]
        return {s: as_str(self.redis.xadd(s, {FIELD: POISON})) for s in streams}

    def dead_lettered(self) -> set[tuple[str, str]]:
        return {(e.stream, e.entry_id) for e in self.decoded(self.key("dead"))
                if isinstance(e, DeadLetter)}

    def audio_parts(self, session_id: str) -> dict[str, int]:
        """Per turn: bytes of its distinct audio parts on the out stream (the longest of
        two versions of one part, as a redone TTS job may write)."""
        longest: dict[tuple[str, int, int], int] = {}
        stream = Keys(self.prefix).out(session_id)
        for event in self.decoded(stream):
            if isinstance(event, AudioChunk):
                key = (event.turn_id, event.seq, event.part)
                longest[key] = max(longest.get(key, 0), len(event.pcm))
        per_turn: dict[str, int] = {}
        for (turn_id, _, _), size in longest.items():
            per_turn[turn_id] = per_turn.get(turn_id, 0) + size
        return per_turn

    def keys_without_ttl(self) -> list[str]:
        """Keys that would live forever, less the permanent infrastructure."""
        allowed = self.permanent_keys()
        return sorted(k.decode() for k in self.redis.scan_iter(f"{self.prefix}:*", count=1000)
                      if k.decode() not in allowed and self.redis.ttl(k) == -1)

    def permanent_keys(self) -> set[str]:
        p = self.prefix
        return {
            f"{p}:sessions",  # session announcements: the VAD group's work stream
            f"{p}:control",  # the cancel lane every worker tails
            f"{p}:dead",  # dead letters: kept for an operator, capped by MAXLEN
            *(f"{p}:q:{s}" for s in JOB_QUEUES),  # the job stages' work queues
            f"{p}:metrics:turns",  # recent turn latencies for `voicebus status`, capped
        }  # every stream is capped by MAXLEN and trimmed by the janitor

    def wait_until_expiring(self, timeout: float = SETTLE_S) -> list[str]:
        """After the sessions end, teardowns set TTLs: wait for them, then what is left."""
        deadline = time.monotonic() + timeout
        while (left := self.keys_without_ttl()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


# -- one device session, everything it saw recorded ------------------------------------
def instant_speaker() -> VirtualSpeaker:
    """A speaker whose clock runs 1000x fast: the client waits for each answer, not for
    its playback in real time (which would triple each turn and test nothing more)."""
    return VirtualSpeaker(clock=lambda: time.monotonic() * 1000)


@dataclass
class DeviceLog:
    """Every control message the device received, with its arrival time."""

    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    results: list[TurnResult] = field(default_factory=list)
    error: str = ""
    session_id: str = ""
    utterances: int = 0

    def record(self, message: dict[str, Any]) -> None:
        self.messages.append((time.monotonic(), message))
        if message.get("type") == "ready":
            self.session_id = str(message.get("session_id", ""))

    def seen(self, kind: str) -> bool:
        return any(m.get("type") == kind for _, m in self.messages)

    def first(self, kind: str, turn_id: str) -> float | None:
        return next((t for t, m in self.messages
                     if m.get("type") == kind and m.get("turn_id") == turn_id), None)


Hook = Callable[[dict[str, Any], DeviceLog], None]


async def speak(url: str, token: str, wavs: list[Path], hook: Hook | None = None) -> DeviceLog:
    """One device session speaking ``wavs`` (each answered before the next)."""
    log = DeviceLog(utterances=len(wavs))

    def on_message(message: dict[str, Any]) -> None:
        log.record(message)
        if hook is not None:
            hook(message, log)

    try:
        log.results = await talk_wavs(url, token, wavs, on_message=on_message,
                                      speaker=instant_speaker(),
                                      answer_timeout_s=ANSWER_TIMEOUT_S)
    except ClientError as exc:
        log.error, log.results = str(exc), exc.turns or []
    return log


# -- faults ------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str
    target: str = ""
    landed: bool = False  # it happened while the turn was under way, to its worker
    note: str = ""
    entries: dict[str, str] = field(default_factory=dict)  # poison: stream -> entry id


@dataclass
class Verdict:
    """One scenario, judged: Jepsen queue-checker counts and what went wrong."""

    scenario: str
    turns: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    faults: list[Fault] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)  # of the turns hit by a fault
    keys_without_ttl: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # crashes, poison kept, abuse let in
    errors: list[str] = field(default_factory=list)  # what the client said when it gave up

    def recovery_ms(self, baseline_ms: float | None) -> tuple[float | None, float | None]:
        if baseline_ms is None or not self.answer_ms:
            return None, None
        delays = sorted(ms - baseline_ms for ms in self.answer_ms)
        return _percentile(delays, 50), _percentile(delays, 95)

    def row(self, baseline_ms: float | None) -> dict[str, Any]:
        p50, p95 = self.recovery_ms(baseline_ms)
        return {"scenario": self.scenario, "faults": len(self.faults),
                "faults_landed": sum(f.landed for f in self.faults), "turns": self.turns,
                "completed": self.completed, "lost": self.lost, "duplicated": self.duplicated,
                "recovery_p50_ms": p50, "recovery_p95_ms": p95,
                "keys_without_ttl": self.keys_without_ttl, "violations": self.violations,
                "errors": self.errors, "answer_ms": self.answer_ms,
                "fault_log": [vars(f) for f in self.faults]}


def _percentile(values: list[float], q: float) -> float:
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return round(sorted(values)[index], 1)


def answered_turns(log: DeviceLog) -> list[TurnResult]:
    """Turns the device got a whole answer for."""
    done = {m.get("turn_id"): m for _, m in log.messages if m.get("type") == "turn_done"}
    return [r for r in log.results
            if r.turn_id in done and not done[r.turn_id].get("interrupted")
            and not r.continued and r.transcript and r.reply and r.audio]


def duplicates_seen(log: DeviceLog, bus_audio: dict[str, int]) -> list[str]:
    """What the device got twice: reply ``(turn, seq)``s, audio beyond the bus's parts."""
    found, seen = [], set()
    for _, message in log.messages:
        if message.get("type") == "reply":
            key = (message.get("turn_id"), message.get("seq"))
            if key in seen:
                found.append(f"reply {key} twice")
            seen.add(key)
    for result in log.results:
        if len(result.audio) > bus_audio.get(result.turn_id, 0):
            found.append(f"turn {result.turn_id}: {len(result.audio)} bytes of audio, the "
                         f"bus's distinct parts hold {bus_audio.get(result.turn_id, 0)}")
    return found


def answer_time_ms(log: DeviceLog, result: TurnResult) -> float | None:
    """End of speech -> turn_done, on the device's clock (see the module's docstring)."""
    first_audio = log.first("audio", result.turn_id)
    done = log.first("turn_done", result.turn_id)
    e2e = result.latency_ms.get("end_of_speech_to_first_audio")
    if first_audio is None or done is None or e2e is None:
        return None
    return round((done - (first_audio - e2e / 1000)) * 1000, 1)


def judge(verdict: Verdict, log: DeviceLog, probe: Probe, *, hit: bool) -> None:
    """Add one device session's utterances to the verdict."""
    answers = answered_turns(log)
    verdict.turns += log.utterances
    verdict.completed += min(len(answers), log.utterances)
    verdict.lost += max(0, log.utterances - len(answers))
    dups = duplicates_seen(log, probe.audio_parts(log.session_id) if log.session_id else {})
    verdict.duplicated += max(0, len(answers) - log.utterances) + len(dups)
    verdict.violations += dups
    if log.error:
        verdict.errors.append(log.error)
    if hit:
        verdict.answer_ms += [ms for r in answers if (ms := answer_time_ms(log, r)) is not None]


def median_answer_ms(logs: list[DeviceLog]) -> float | None:
    times = [ms for log in logs for r in answered_turns(log)
             if (ms := answer_time_ms(log, r)) is not None]
    return round(statistics.median(times), 1) if times else None


# -- the system, started -----------------------------------------------------------------
@dataclass
class Chaos:
    """The running system and what a scenario needs to hurt it."""

    fleet: Fleet
    probe: Probe
    secret: str
    rng: random.Random
    redis_server: Any = None  # an EmbeddedRedis the harness may kill (the bench only)

    @property
    def url(self) -> str:
        return self.fleet.gateway_url()

    def token(self, user: str) -> str:
        return mint(self.secret.encode(), user, 3600)

    def wav(self, n: int) -> Path:
        return SAMPLES / f"{UTTERANCES[n % len(UTTERANCES)]}.wav"


@contextlib.contextmanager
def scripted_llm() -> Iterator[str]:
    """The scripted OpenAI-compatible server; its URL (imported here: tests/ is not a
    dependency of the product, only of the harness)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.openai_server import Script, ScriptedOpenAI

    with ScriptedOpenAI([Script.reply(reply_pieces(), delay=TOKEN_DELAY_S)]) as server:
        yield server.url



def wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    return poll(predicate, timeout, interval) is not None


def poll(probe: Callable[[], T | None], timeout: float, interval: float = 0.01) -> T | None:
    """The first truthy value ``probe`` returns within ``timeout`` s, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -- fault actions: each runs in a thread, armed by a message the device received -------
Action = Callable[[Chaos, DeviceLog], Fault]


def turn_under_way(log: DeviceLog) -> bool:
    return not log.seen("turn_done")


def kill_vad_mid_utterance(chaos: Chaos, log: DeviceLog) -> Fault:
    """Armed by ``speech_started``: kill the session's owner while the user speaks (the
    recordings hold 1.9-2.7 s of speech)."""
    delay = chaos.rng.uniform(0.2, 1.2)
    time.sleep(delay)
    pid = chaos.probe.session_owner(log.session_id)
    proc = chaos.fleet.by_pid(pid) if pid is not None else None
    if proc is None:
        return Fault("kill -9 vad", note=f"no owner found {delay:.2f} s into speech")
    landed = not log.seen("transcript")  # the turn was not decided yet
    chaos.fleet.kill_and_replace(proc)
    return Fault("kill -9 vad", proc.log.name, landed, f"{delay:.2f} s after speech_started")


def hurt_job_holder(stage: str, max_delay_s: float, hurt: Callable[[Chaos, Proc], str],
                    kind: str) -> Action:
    """An action on the process holding one of the stage's jobs at a random moment
    (``0..max_delay_s`` after the trigger, then the first moment a job is under way).
    The holder is frozen (SIGSTOP) the instant it is seen, so it can neither finish nor
    ack while we check that it still holds the job; then ``hurt`` (a kill -9 of a
    frozen process is a kill -9 at the moment it froze). Some jobs (a TTS sentence) take
    tens of milliseconds: without the freeze most kills would strike just after them."""

    def action(chaos: Chaos, log: DeviceLog) -> Fault:
        delay = chaos.rng.uniform(0, max_delay_s)
        time.sleep(delay)
        pid = poll(lambda: chaos.probe.job_holder(stage), 20, 0.005)
        proc = chaos.fleet.by_pid(pid) if pid is not None else None
        if proc is None:
            return Fault(kind, note=f"no {stage} job of ours seen (holder {pid})")
        send_signal(proc.pid, signal.SIGSTOP)
        landed = chaos.probe.still_holds(chaos.probe.key("q", stage), proc.pid) \
            and turn_under_way(log)
        note = hurt(chaos, proc)
        return Fault(kind, proc.log.name, landed, f"{delay:.2f} s after the trigger{note}")

    return action


def kill9(chaos: Chaos, proc: Proc) -> str:
    chaos.fleet.kill_and_replace(proc)
    return ""


def freeze_past_idle(claim_idle_ms: int) -> Callable[[Chaos, Proc], str]:
    def freeze(chaos: Chaos, proc: Proc) -> str:
        stopped = claim_idle_ms / 1000 + 1.0
        send_signal(proc.pid, signal.SIGSTOP)
        time.sleep(stopped)
        send_signal(proc.pid, signal.SIGCONT)
        return f"; stopped {stopped:.1f} s"

    return freeze


def redis_fault(kind: str, pause_s: float = 0.0) -> Action:
    """kill -9 of Redis and a restart on its port (AOF everysec), or SIGSTOP for
    ``pause_s`` (clients see a server that does not answer)."""

    def action(chaos: Chaos, log: DeviceLog) -> Fault:
        server = chaos.redis_server
        if server is None or server.pid is None:
            return Fault(kind, note="no Redis of ours to hurt")
        delay = chaos.rng.uniform(0.3, 1.5)
        time.sleep(delay)
        landed = turn_under_way(log)
        if pause_s:
            send_signal(server.pid, signal.SIGSTOP)
            time.sleep(pause_s)
            send_signal(server.pid, signal.SIGCONT)
        else:
            server.kill()
            SPAWNER.call(server.start)  # on its port, from its AOF
        return Fault(kind, "redis-server", landed, f"{delay:.2f} s after speech_started")

    return action


def poison(chaos: Chaos, log: DeviceLog) -> Fault:
    """Undecodable entries on every stream, mid-turn; checked by ``poison_kept``."""
    time.sleep(chaos.rng.uniform(0.2, 1.0))
    landed = turn_under_way(log)
    ids = chaos.probe.poison_every_stream(log.session_id)
    return Fault("poison", "every stream", landed, entries=ids)


def poison_kept(chaos: Chaos, faults: list[Fault]) -> list[str]:
    """Poison on a stream a group reads that did not reach the dead letters."""
    expected: set[tuple[str, str]] = set()
    for fault in faults:
        expected |= {(s, i) for s, i in fault.entries.items()
                     if not s.endswith((":out", ":control"))}  # no group reads those
    missing: set[tuple[str, str]] = set()

    def all_dead() -> bool:
        missing.clear()
        missing.update(expected - chaos.probe.dead_lettered())
        return not missing

    wait(all_dead, 20, 0.5)
    return [f"poison entry {i} on {s} was not dead-lettered" for s, i in sorted(missing)]


# -- gateway abuse, while another device talks -------------------------------------------
async def _refused_with(url: str, headers: dict[str, str]) -> str:
    """``401`` when the handshake is refused so, else what happened."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    try:
        async with connect(url, additional_headers=headers, open_timeout=10):
            return "accepted"
    except InvalidStatus as exc:
        return str(exc.response.status_code)


async def _closed_with(url: str, token: str, messages: list[str | bytes]) -> str:
    """The close code after sending ``messages`` on an authenticated connection."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                       open_timeout=10, max_size=None) as ws:
        try:
            for message in messages:
                await ws.send(message)
            async with asyncio.timeout(15):
                while True:
                    await ws.recv()
        except ConnectionClosed:
            pass
        except TimeoutError:
            return "still open"
        return str(ws.close_code)


async def abuse_gateway(url: str, secret: str, user: str) -> list[str]:
    """Bad tokens and protocol abuse; what did not end as the protocol says."""
    good = mint(secret.encode(), user, 600)
    tampered = good[:-2] + ("AA" if good[-2:] != "AA" else "BB")  # the signature's end
    start = '{"type": "start", "sample_rate": 16000}'
    refusals = {
        "no token": {},
        "garbage token": {"Authorization": "Bearer abc.def"},
        "expired token": {"Authorization": "Bearer "
                          + mint(secret.encode(), user, 1, now=time.time() - 100)},
        "tampered token": {"Authorization": f"Bearer {tampered}"},
        "other secret": {"Authorization": "Bearer " + mint(b"another-secret-0123456789", user, 60)},
    }
    outcomes = {name: await _refused_with(url, headers) for name, headers in refusals.items()}
    outcomes["non-ASCII token"] = await _refused_with(f"{url}?token=t%C3%B6k%C3%A9n.x", {})
    expect = dict.fromkeys(outcomes, "401")
    closes: dict[str, tuple[list[str | bytes], str]] = {
        "audio before start": ([b"\x00\x00"], "1008"),
        "not JSON": (["{nope"], "1008"),
        "odd-length frame": ([start, b"\x00" * 321], "1008"),
        "start twice": ([start, start], "1008"),
        "oversized frame": ([start, b"\x00" * 70_000], "1009"),
        "frame flood": ([start, *[b"\x00" * 64] * 400], "4008"),
    }
    for name, (messages, code) in closes.items():
        outcomes[name], expect[name] = await _closed_with(url, good, messages), code
    return [f"{name}: got {outcomes[name]}, expected {expect[name]}"
            for name in outcomes if outcomes[name] != expect[name]]


def abuse(chaos: Chaos, log: DeviceLog) -> Fault:
    landed = turn_under_way(log)
    failures = asyncio.run(abuse_gateway(chaos.url, chaos.secret, "abuser"))
    return Fault("gateway abuse", "gateway", landed and not failures,
                 "; ".join(failures) or "every attempt closed as the protocol says")


# -- scenarios -------------------------------------------------------------------------
def _arm(chaos: Chaos, trigger: str, action: Action,
         tasks: list[asyncio.Task[Fault]]) -> Hook:
    """A hook that starts ``action`` (in a thread) on the first ``trigger`` message."""

    def hook(message: dict[str, Any], log: DeviceLog) -> None:
        if message.get("type") == trigger and not tasks:
            tasks.append(asyncio.create_task(asyncio.to_thread(action, chaos, log)))

    return hook


async def _turn_with_fault(chaos: Chaos, user: str, n: int, trigger: str,
                           action: Action) -> tuple[DeviceLog, list[Fault]]:
    tasks: list[asyncio.Task[Fault]] = []
    log = await speak(chaos.url, chaos.token(user), [chaos.wav(n)],
                      _arm(chaos, trigger, action, tasks))
    return log, [await task for task in tasks]


def faulty_turns(chaos: Chaos, name: str, turns: int, trigger: str, action: Action,
                 check: Callable[[Chaos, list[Fault]], list[str]] | None = None,
                 retries: int = 0) -> Verdict:
    """``turns`` utterances, one session each, each hit by ``action`` once. A fault can
    miss (the work was done before it struck): up to ``retries`` more turns are spoken
    until ``turns`` faults have landed (the CI test must prove something each run)."""
    verdict, crashed = Verdict(name), set(chaos.fleet.crashed())
    for n in range(turns + retries):
        if n >= turns and sum(f.landed for f in verdict.faults) >= turns:
            break
        chaos.fleet.wait_ready()  # the replacements of the last turn's victims
        log, faults = asyncio.run(_turn_with_fault(chaos, f"{name}-user", n, trigger, action))
        verdict.faults += faults or [Fault(name, note=f"never armed: no {trigger} message")]
        judge(verdict, log, chaos.probe, hit=True)
    if check is not None:
        verdict.violations += check(chaos, verdict.faults)
    finish(chaos, verdict, crashed)
    return verdict


def fault_free_turns(chaos: Chaos, turns: int) -> tuple[Verdict, list[DeviceLog]]:
    verdict, crashed, logs = Verdict("none (baseline)"), set(chaos.fleet.crashed()), []
    for n in range(turns):
        log = asyncio.run(speak(chaos.url, chaos.token("baseline-user"), [chaos.wav(n)]))
        judge(verdict, log, chaos.probe, hit=False)
        logs.append(log)
    finish(chaos, verdict, crashed)
    return verdict, logs


def disconnects(chaos: Chaos, turns: int) -> Verdict:
    """Per turn: a device that hangs up at a random moment of its turn, then the same
    user in a new session, who must be answered."""
    verdict, crashed = Verdict("client disconnects"), set(chaos.fleet.crashed())
    for n in range(turns):
        verdict.faults.append(asyncio.run(_hang_up(chaos, n)))
        log = asyncio.run(speak(chaos.url, chaos.token("leaving-user"), [chaos.wav(n + 1)]))
        judge(verdict, log, chaos.probe, hit=False)
    finish(chaos, verdict, crashed)
    return verdict


async def _hang_up(chaos: Chaos, n: int) -> Fault:
    delay = chaos.rng.uniform(0.3, 4.0)  # mid-utterance, mid-pipeline or mid-reply
    state: dict[str, bool] = {}

    def hook(message: dict[str, Any], log: DeviceLog) -> None:
        if message.get("type") == "speech_started" and "armed" not in state:
            state["armed"] = True
            asyncio.get_running_loop().call_later(delay, hang_up, log)

    def hang_up(log: DeviceLog) -> None:
        state["landed"] = turn_under_way(log)
        task.cancel()

    task = asyncio.create_task(speak(chaos.url, chaos.token("leaving-user"),
                                     [chaos.wav(n)], hook))
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Fault("disconnect", "device", state.get("landed", False),
                 f"{delay:.2f} s after speech_started")


def rolling_restart(chaos: Chaos, turns: int) -> Verdict:
    """One conversation of ``turns`` utterances while every worker is restarted
    (SIGTERM, then a new one, ready, before its stage's other one), stages in parallel."""
    verdict, crashed = Verdict("rolling restart"), set(chaos.fleet.crashed())
    talking = threading.Event()
    utterances = max(turns, ROLLING_MIN_TURNS)

    def restart_stage(stage: str) -> list[Fault]:
        talking.wait(60)
        done = []
        for proc in chaos.fleet.live(stage):
            chaos.fleet.restart_gracefully(proc)
            done.append(Fault("rolling restart", proc.log.name, talking.is_set()))
        return done

    def hook(message: dict[str, Any], log: DeviceLog) -> None:
        if message.get("type") == "speech_started":
            talking.set()

    async def converse() -> tuple[DeviceLog, list[list[Fault]]]:
        restarts = [asyncio.create_task(asyncio.to_thread(restart_stage, s)) for s in STAGES]
        log = await speak(chaos.url, chaos.token("rolling-user"),
                          [chaos.wav(n) for n in range(utterances)], hook)
        talking.clear()  # restarts from here on did not happen during the conversation
        return log, [await task for task in restarts]

    log, faults = asyncio.run(converse())
    verdict.faults = [f for stage in faults for f in stage]
    judge(verdict, log, chaos.probe, hit=True)
    finish(chaos, verdict, crashed)
    return verdict


def finish(chaos: Chaos, verdict: Verdict, crashed_before: set[str]) -> None:
    """After the scenario's sessions: processes that died on their own, keys without
    a TTL, and faults that missed their turn."""
    chaos.fleet.wait_ready()
    verdict.violations += [f"crashed: {c}" for c in chaos.fleet.crashed()
                           if c not in crashed_before]
    verdict.keys_without_ttl = chaos.probe.wait_until_expiring()


# name -> (what arms it, what it does); the rest have their own runners.
def fault_scenarios(claim_idle_ms: int) -> dict[str, tuple[str, Action, Any]]:
    return {
        "kill-vad": ("speech_started", kill_vad_mid_utterance, None),
        "kill-asr": ("speech_started", hurt_job_holder("asr", 1.0, kill9, "kill -9 asr"), None),
        "kill-llm": ("reply", hurt_job_holder("llm", 0.3, kill9, "kill -9 llm"), None),
        "kill-tts": ("audio", hurt_job_holder("tts", 0.3, kill9, "kill -9 tts"), None),
        "sigstop-llm": ("reply", hurt_job_holder("llm", 0.2, freeze_past_idle(claim_idle_ms),
                                                 "SIGSTOP llm"), None),
        "poison": ("speech_started", poison, poison_kept),
        "gateway-abuse": ("speech_started", abuse, None),
        "redis-kill": ("speech_started", redis_fault("kill -9 redis"), None),
        "redis-down-3s": ("speech_started", redis_fault("redis SIGSTOP 3 s", 3.0), None),
        "redis-down-10s": ("speech_started", redis_fault("redis SIGSTOP 10 s", 10.0), None),
    }


SCENARIOS = ("kill-vad", "kill-asr", "kill-llm", "kill-tts", "sigstop-llm", "poison",
             "gateway-abuse", "disconnects", "rolling-restart", "redis-kill",
             "redis-down-3s", "redis-down-10s")


def run_scenario(chaos: Chaos, name: str, turns: int, claim_idle_ms: int,
                 retries: int = 0) -> Verdict:
    """One scenario; ``retries``: extra turns allowed for faults that missed."""
    if name == "disconnects":
        return disconnects(chaos, turns)
    if name == "rolling-restart":
        return rolling_restart(chaos, turns)
    trigger, action, check = fault_scenarios(claim_idle_ms)[name]
    return faulty_turns(chaos, name, turns, trigger, action, check, retries)

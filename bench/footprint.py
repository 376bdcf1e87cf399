"""What a live session costs: memory of every process, Redis bytes per session and per
user, network per session, CPU per turn and per session-second.

    python -m bench.footprint [--sessions 3] [--turns 8] [--out bench/results/footprint.json]

Starts what ``voicebus demo`` starts (``Supervisor``: embedded Redis, the local LLM
server, one worker per stage, the gateway), then runs ``--sessions`` devices at once,
each a different user saying ``--turns`` turns of real speech from the benchmark corpus
(``bench/speech_corpus.py``, the same mix as ``bench/conversation.py``, a different
pick per session), in real time, each once the previous answer has played
(``edge.client.talk_wavs``).
Every 0.5 s it reads each process's resident memory (/proc) and, in Redis, the bytes of
every session's keys (``{prefix}:{session}:*``, ``MEMORY USAGE`` with all samples) and
every user's (memory, learned pauses). The figures feed ``deploy/SCALING.md`` and the
memory requests of ``deploy/k8s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis

from bench.conversation import pick
from bench.measure import busy_cores_before_start, proc_cpu_s, rss_mb
from bench.speech_corpus import export, load_corpus
from edge.auth import mint
from edge.client import ClientError, TurnResult, talk_wavs
from workers.config_load import load_config

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY_S = 0.5
SESSION_KEY = re.compile(r"^[^:]+:\{s\d+\}:([^:]+):")  # vb:{s7}:session:audio -> session
USER_KEY = re.compile(r"^[^:]+:user:\{([^}]+)\}:")  # vb:user:{user}:messages -> user


def key_bytes(r: redis.Redis) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Bytes of every session's keys, every user's, and the sessions' by kind of key
    (``audio``, ``out``, ...)."""
    sessions: dict[str, int] = defaultdict(int)
    users: dict[str, int] = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    for key in r.scan_iter(count=500):
        name = key.decode()
        if match := SESSION_KEY.match(name):
            size = int(r.memory_usage(name, samples=0) or 0)
            sessions[match.group(1)] += size
            kinds[name[match.end():].split(":")[0]] += size
        elif match := USER_KEY.match(name):
            users[match.group(1)] += int(r.memory_usage(name, samples=0) or 0)
    return dict(sessions), dict(users), dict(kinds)


# What the sampler itself asks of Redis: left out of Redis's CPU per session.
PROBE_COMMANDS = ("cmdstat_scan", "cmdstat_memory|usage", "cmdstat_info")


def redis_busy_s(r: redis.Redis) -> tuple[float, float]:
    """Redis's time in commands (s): the product's, and this benchmark's probes'."""
    stats = r.info("commandstats")
    probes = sum(v["usec"] for k, v in stats.items() if k in PROBE_COMMANDS)
    total = sum(v["usec"] for v in stats.values())
    return (total - probes) / 1e6, probes / 1e6


class Sampler(threading.Thread):
    """Peaks of the processes' memory and of Redis bytes per session and per user."""

    def __init__(self, pids: dict[str, int], redis_url: str) -> None:
        super().__init__(daemon=True, name="footprint-sampler")
        self.pids = pids
        self.r = redis.Redis.from_url(redis_url)
        self.stop = threading.Event()
        self.rss_peak: dict[str, float] = {}
        self.session_peak: dict[str, int] = {}
        self.user_peak: dict[str, int] = {}
        self.kinds_at_peak: dict[str, int] = {}
        self.used_memory_peak = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            for name, pid in self.pids.items():
                mb = rss_mb(pid)
                if mb is not None:
                    self.rss_peak[name] = max(self.rss_peak.get(name, 0.0), mb)
            try:
                sessions, users, kinds = key_bytes(self.r)
                for sid, n in sessions.items():
                    self.session_peak[sid] = max(self.session_peak.get(sid, 0), n)
                for uid, n in users.items():
                    self.user_peak[uid] = max(self.user_peak.get(uid, 0), n)
                if sum(kinds.values()) > sum(self.kinds_at_peak.values()):
                    self.kinds_at_peak = {k: n // max(1, len(sessions))
                                          for k, n in kinds.items()}
                used = int(self.r.info("memory")["used_memory"])
                self.used_memory_peak = max(self.used_memory_peak, used)
            except redis.RedisError:
                continue
            self.samples += 1


async def run_sessions(url: str, secret: str, wavs: list[list[Path]]
                       ) -> list[tuple[float, list[TurnResult], str]]:
    """Every session at once, a user each; per session: wall time, turns, error."""
    async def one(i: int) -> tuple[float, list[TurnResult], str]:
        await asyncio.sleep(i * 1.7)  # not all in lockstep: real users start apart
        token = mint(secret.encode(), f"footprint-{i}-{secrets.token_hex(3)}", 3600)
        started = time.monotonic()
        try:
            turns = await talk_wavs(url, token, wavs[i], answer_timeout_s=120)
            error = ""
        except ClientError as exc:
            turns, error = exc.turns, str(exc)
        return time.monotonic() - started, turns, error
    return list(await asyncio.gather(*(one(i) for i in range(len(wavs)))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=8, help="turns per session")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/footprint.json")
    args = parser.parse_args()
    if args.sessions < 1 or args.turns < 1:
        parser.error("--sessions and --turns must be >= 1")

    from voicebus.supervisor import Supervisor

    busy_before = busy_cores_before_start()
    secret = secrets.token_urlsafe(24)[:32]
    env = {"VOICEBUS_GATEWAY__PORT": "0", "VOICEBUS_GATEWAY__SECRET": secret}
    config = load_config(env={**os.environ, **env})
    corpus, manifest = load_corpus()
    folder = Path(tempfile.mkdtemp(prefix="voicebus-footprint-"))
    wavs = [export(pick(corpus, args.turns, args.seed + i), folder / str(i))
            for i in range(args.sessions)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".supervisor.log")
    print(f"{args.sessions} sessions x {args.turns} turns; starting the "
          f"product (log: {log_path}) ...", flush=True)
    with open(log_path, "w") as log_stream:
        supervisor = Supervisor(None, llm=config.llm, env=env, log_stream=log_stream)
        redis_url = supervisor.start()
        try:
            pids = supervisor.pids()
            idle_rss = {name: rss_mb(pid) for name, pid in pids.items()}
            idle_used = int(redis.Redis.from_url(redis_url).info("memory")["used_memory"])
            cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
            busy0 = redis_busy_s(redis.Redis.from_url(redis_url))
            sampler = Sampler(pids, redis_url)
            sampler.start()
            started = time.monotonic()
            results = asyncio.run(run_sessions(supervisor.gateway_url, secret, wavs))
            wall = time.monotonic() - started
            sampler.stop.set()
            sampler.join()
            cpu = {name: round((proc_cpu_s(pid) or 0.0) - (cpu0[name] or 0.0), 1)
                   for name, pid in pids.items()}
            busy1 = redis_busy_s(redis.Redis.from_url(redis_url))
        finally:
            supervisor.stop()

    turns = sum(len([t for t in r if not t.continued]) for _, r, _ in results)
    answered = sum(1 for _, r, _ in results for t in r if not t.continued and t.audio)
    session_s = sum(s for s, _, _ in results)
    spoken_s = sum(len(t.audio) / 2 / t.sample_rate for _, r, _ in results for t in r)
    down_bytes = sum(len(t.audio) for _, r, _ in results for t in r)
    errors = [e for _, _, e in results if e]
    per_session = sorted(sampler.session_peak.values())
    per_user = sorted(sampler.user_peak.values())
    report: dict[str, Any] = {
        "benchmark": "footprint", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(), "busy_cores_before": round(busy_before, 2)},
        "params": {"sessions": args.sessions, "turns": args.turns, "seed": args.seed,
                   "corpus": manifest.get("fingerprint")},
        "config": {"asr": config.asr.model, "llm": config.llm.model, "tts": config.tts.backend,
                   "vad": config.vad.type},
        "wall_s": round(wall, 1), "turns": turns, "answered": answered, "errors": errors,
        "session_s": round(session_s, 1), "turns_per_session_minute":
            round(turns / (session_s / 60), 2) if session_s else None,
        "rss_mb": {"idle": idle_rss, "peak": sampler.rss_peak},
        "redis": {"idle_used_memory": idle_used, "peak_used_memory": sampler.used_memory_peak,
                  "session_bytes_peak": per_session, "user_bytes_peak": per_user,
                  "session_bytes_by_kind": sampler.kinds_at_peak, "samples": sampler.samples,
                  # Time in commands: the product's, and the sampler's own scans
                  # (left out of the cores per session). Process CPU includes both.
                  "commands_s": round(busy1[0] - busy0[0], 2),
                  "probe_commands_s": round(busy1[1] - busy0[1], 2),
                  "commands_cores_per_session_s":
                      round((busy1[0] - busy0[0]) / session_s, 4) if session_s else None},
        "network": {
            # The device streams its microphone all session long (silence included).
            "up_bytes_per_session_s": 16_000 * 2,
            "down_bytes": down_bytes,
            "down_bytes_per_session_s": round(down_bytes / session_s) if session_s else None,
            "agent_speech_s": round(spoken_s, 1)},
        "cpu_s": cpu,
        "cpu_s_per_turn": {k: round(v / max(1, turns), 2) for k, v in cpu.items()},
        "cpu_per_session_s": {k: round(v / session_s, 3) if session_s else None
                              for k, v in cpu.items()},
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{'process':<16}{'RSS idle MiB':>14}{'RSS peak MiB':>14}{'CPU s/turn':>12}"
          f"{'cores/session':>15}")
    for name in sorted(pids):
        print(f"{name:<16}{idle_rss.get(name) or 0:>14.0f}{sampler.rss_peak.get(name, 0):>14.0f}"
              f"{report['cpu_s_per_turn'][name]:>12.2f}"
              f"{report['cpu_per_session_s'][name] or 0:>15.3f}")
    if per_session:
        print(f"\nRedis bytes per live session: median {per_session[len(per_session) // 2]:,}, "
              f"max {per_session[-1]:,} ({len(per_session)} sessions)")
    if per_user:
        print(f"Redis bytes per user (memory, pauses): median {per_user[len(per_user) // 2]:,}, "
              f"max {per_user[-1]:,}")
    print(f"  by kind at the peak, per session: {sampler.kinds_at_peak}")
    print(f"Redis used_memory: idle {idle_used:,}, peak {sampler.used_memory_peak:,}; time in "
          f"the product's commands {report['redis']['commands_s']} s (the sampler's "
          f"{report['redis']['probe_commands_s']} s)")
    print(f"network per session: up {report['network']['up_bytes_per_session_s']:,} B/s, "
          f"down {report['network']['down_bytes_per_session_s']:,} B/s on average")
    print(f"{answered}/{turns} turns answered in {wall:.0f} s, "
          f"{report['turns_per_session_minute']} turns per session-minute; wrote {args.out}")
    for error in errors:
        print(f"ERROR: {error}")
    return 0 if not errors and answered == turns else 1


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Bus latency: XADD -> handler start, through one session-affine worker process.

    python -m bench.bus_latency [--sessions 1 10 100] [--seconds 10]
                                [--out bench/results/bus_latency.json]

Starts a private redis-server (``voicebus.redis_server.EmbeddedRedis``) unless
``REDIS_URL`` is set (then a unique key prefix is used and its keys are deleted
afterwards), and ONE worker process running the real runtime
(``SessionWorker(SessionStage("vad", ...))``) with a handler that only records,
per frame, ``time.time_ns() - event.created_ns`` and yields nothing.

For each session count N: announce N sessions, then send one 32 ms frame of
16 kHz PCM16 (512 samples, 1024 bytes) per session every 32 ms, in real time,
with the sessions staggered evenly across the 32 ms period, for ``--seconds``;
then end the sessions and wait until the worker has released them all. The
first second of each round is warm-up and is not counted.

The worker writes its samples to a file when it stops (SIGTERM at the end), so
it is re-invoked as ``python -m bench.bus_latency --worker URL PREFIX SAMPLES_PATH [POOL_MAX
[PROFILE]]``.

Diagnostics (not part of the measurement): ``--pool-max K`` raises the worker's
redis-py connection-pool limit (default 100 in redis-py 8) to show what the
runtime would do without pool exhaustion; ``--profile PATH`` writes a cProfile
of the worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.measure import busy_cores_before_start, machine_cpu, proc_cpu_s
from schemas import AudioFrame, Event, SessionEnded, SessionStarted, encode
from workers.observability.metrics import percentile as interpolated
from workers.runtime.bus import FIELD
from workers.runtime.keys import Keys

ROOT = Path(__file__).resolve().parent.parent

STAGE = "vad"
SAMPLE_RATE = 16_000
FRAME_SAMPLES = 512  # 32 ms at 16 kHz
PERIOD_S = FRAME_SAMPLES / SAMPLE_RATE
WARMUP_S = 1.0


# ----------------------------------------------------------------------------
# The worker process
# ----------------------------------------------------------------------------
class RecordingSession:
    """A session handler that does nothing but note when each frame reached it."""

    def __init__(self, rows: list[tuple[int, int, int]]) -> None:
        self.rows = rows

    async def handle(self, event: Event, ctx: Any) -> AsyncIterator[Any]:
        now = time.time_ns()
        if isinstance(event, AudioFrame):
            self.rows.append((event.seq, event.created_ns, now))
        if False:  # an async generator that yields nothing
            yield

    async def close(self) -> None:
        pass


PROBE_S = 0.020


async def probe(worker: Any, rows: list[tuple[int, int, int, int]]) -> None:
    """Every 20 ms: event-loop lag, connections in use in the worker's main pool, and
    the worker's running count of Redis errors (to tell the rounds apart later)."""
    pool = worker.redis.connection_pool
    loop = asyncio.get_running_loop()
    expected = loop.time() + PROBE_S
    while True:
        await asyncio.sleep(max(0.0, expected - loop.time()))
        now = loop.time()
        in_use = len(getattr(pool, "_in_use_connections", ()))
        rows.append((time.time_ns(), int((now - expected) * 1e9), in_use,
                     worker.stats["redis_errors"]))
        expected = max(expected + PROBE_S, now)


def run_worker(url: str, prefix: str, samples_path: str, pool_max: int | None,
               profile: str | None) -> None:
    from workers.config import RedisConfig
    from workers.observability.logs import setup_logging
    from workers.runtime import RuntimeSettings
    from workers.runtime.sessions import SessionStage, SessionWorker

    setup_logging("INFO", "text", component="bench-vad")
    samples: dict[str, list[tuple[int, int, int]]] = {}
    probes: list[tuple[int, int, int, int]] = []

    def open_session(started: SessionStarted) -> RecordingSession:
        return RecordingSession(samples.setdefault(started.session_id, []))

    worker = SessionWorker(SessionStage(STAGE, open_session),
                           RuntimeSettings(url, RedisConfig(key_prefix=prefix)))
    if pool_max:  # experiment only: not what the runtime does by itself
        for client in (worker.redis, worker.reader, worker._control_reader):
            client.connection_pool.max_connections = pool_max

    async def main() -> None:
        task = asyncio.create_task(probe(worker, probes))
        try:
            await worker.run(install_signals=True)
        finally:
            task.cancel()

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    print(f"READY {worker.consumer}", flush=True)
    try:
        asyncio.run(main())
    finally:
        if profiler is not None and profile:
            profiler.disable()
            profiler.dump_stats(profile)
        tmp = samples_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"stats": dict(worker.stats), "samples": samples, "probes": probes}, f)
        os.replace(tmp, samples_path)


# ----------------------------------------------------------------------------
# Measuring helpers
# ----------------------------------------------------------------------------




def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in percent."""
    return interpolated(sorted_values, q / 100) if sorted_values else float("nan")


def summary_ms(values_ns: list[int]) -> dict[str, float]:
    ms = sorted(v / 1e6 for v in values_ns)
    if not ms:
        return {}
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "max": ms[-1], "mean": sum(ms) / len(ms)}


class CpuWindow:
    """CPU seconds used by some processes (and the whole machine) over a wall window."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.t0 = time.monotonic()
        self.cpu0 = {k: proc_cpu_s(p) for k, p in self.pids.items()}
        self.self0 = sum(os.times()[:2])
        self.machine0 = machine_cpu()

    def stop(self) -> dict[str, float | None]:
        wall = time.monotonic() - self.t0
        out: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            now, before = proc_cpu_s(pid), self.cpu0[name]
            out[name] = None if now is None or before is None else (now - before) / wall
        out["publisher"] = (sum(os.times()[:2]) - self.self0) / wall
        busy, total = machine_cpu()
        machine = (busy - self.machine0[0]) / max(1, total - self.machine0[1])
        # Cores busy with anything else on the machine: noise for this benchmark.
        ours = sum(v or 0.0 for v in out.values())
        out["machine_busy_frac"] = machine
        out["other"] = max(0.0, machine * (os.cpu_count() or 1) - ours)
        out["wall_s"] = wall
        return out


# ----------------------------------------------------------------------------
# The publisher (this process)
# ----------------------------------------------------------------------------
async def wait_until(check: Any, limit_s: float, what: str, interval: float = 0.02) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > limit_s:
            raise TimeoutError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - start


async def pending_announcements(r: Any, keys: Keys) -> int:
    try:
        return int((await r.xpending(keys.sessions(), STAGE))["pending"])
    except Exception:  # the group does not exist yet
        return 0


async def run_round(r: Any, keys: Keys, n: int, seconds: float, pids: dict[str, int | None],
                    pcm: bytes) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    sids = [f"bench-n{n}-{tag}-s{i:04d}" for i in range(n)]
    streams = [keys.audio(s) for s in sids]

    # Announce, and wait until the worker has adopted every session (it creates the
    # consumer group on each audio stream, reading from "0": nothing is lost even if
    # frames came first, but adoption time would otherwise count as latency).
    pipe = r.pipeline(transaction=False)
    for sid in sids:
        pipe.xadd(keys.sessions(), {FIELD: encode(SessionStarted(
            session_id=sid, user_id=f"user-{sid}", sample_rate=SAMPLE_RATE))})
    await pipe.execute()

    async def adopted() -> bool:
        pipe = r.pipeline(transaction=False)
        for stream in streams:
            pipe.exists(stream)
        return all(await pipe.execute()) and await pending_announcements(r, keys) >= n

    adopt_s = await wait_until(adopted, 30, f"the worker to adopt {n} sessions")
    await asyncio.sleep(0.1)  # let the read loop re-enter XREADGROUP with the new streams

    frames_per_session = round(seconds / PERIOD_S)
    total = n * frames_per_session
    step = PERIOD_S / n  # global frame k*n + i is session i's frame k
    lags_ns: list[int] = []
    rtts_ns: list[int] = []
    batches = 0
    t0 = time.monotonic() + 0.05
    wall_t0_ns = time.time_ns() + 50_000_000
    warm_at = t0 + WARMUP_S
    cpu: CpuWindow | None = None
    idx = 0
    while idx < total:
        due = t0 + idx * step
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.monotonic()
        if cpu is None and now >= warm_at:
            cpu = CpuWindow(pids)
        end = idx + 1
        while end < total and t0 + end * step <= now:
            end += 1
        sent_at = time.monotonic()
        if end - idx == 1:
            i = idx % n
            frame = AudioFrame(session_id=sids[i], seq=idx // n, sample_rate=SAMPLE_RATE,
                               pcm=pcm)
            await r.xadd(streams[i], {FIELD: encode(frame)})
        else:
            pipe = r.pipeline(transaction=False)
            for g in range(idx, end):
                i = g % n
                frame = AudioFrame(session_id=sids[i], seq=g // n, sample_rate=SAMPLE_RATE,
                                   pcm=pcm)
                pipe.xadd(streams[i], {FIELD: encode(frame)})
            await pipe.execute()
        done_at = time.monotonic()
        batches += 1
        rtts_ns.append(int((done_at - sent_at) * 1e9))
        lags_ns.extend(int((sent_at - (t0 + g * step)) * 1e9) for g in range(idx, end))
        idx = end
    send_end = time.monotonic()
    wall_send_end_ns = time.time_ns()
    behind_at_end_s = send_end - (t0 + (total - 1) * step)

    pipe = r.pipeline(transaction=False)
    for sid, stream in zip(sids, streams, strict=True):
        pipe.xadd(stream, {FIELD: encode(SessionEnded(session_id=sid, seq=frames_per_session,
                                                      reason="bench"))})
    await pipe.execute()
    drain_s = await wait_until(lambda: _no_pending(r, keys), 120,
                               f"the worker to release {n} sessions")
    assert cpu is not None
    usage = cpu.stop()

    lag = summary_ms(lags_ns)
    return {
        "sessions": n, "tag": tag, "sids": sids, "frames_per_session": frames_per_session,
        "frames_sent": total, "adopt_s": adopt_s, "drain_s": drain_s,
        "send_window_s": send_end - t0, "planned_window_s": (total - 1) * step,
        "wall_t0_ns": wall_t0_ns, "wall_send_end_ns": wall_send_end_ns,
        "publisher": {
            "lag_ms": lag, "late_over_5ms": sum(1 for v in lags_ns if v > 5_000_000),
            "behind_at_end_ms": behind_at_end_s * 1000, "batches": batches,
            "mean_frames_per_batch": total / batches, "xadd_rtt_ms": summary_ms(rtts_ns),
        },
        "cpu": usage,
    }


async def _no_pending(r: Any, keys: Keys) -> bool:
    return await pending_announcements(r, keys) == 0


def analyse(round_: dict[str, Any], samples: dict[str, list[list[int]]],
            probes: list[list[int]]) -> dict[str, Any]:
    warm_ns = round_["wall_t0_ns"] + int(WARMUP_S * 1e9)
    end_ns = round_["wall_send_end_ns"]
    latencies: list[int] = []
    by_second: dict[int, list[int]] = {}
    handled = in_window = order_violations = duplicates = 0
    for sid in round_["sids"]:
        rows = samples.get(sid, [])
        handled += len(rows)
        seqs = [row[0] for row in rows]
        duplicates += len(seqs) - len(set(seqs))
        order_violations += sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
        for _seq, created, started in rows:
            if created >= warm_ns:
                latencies.append(started - created)
                by_second.setdefault((created - warm_ns) // 1_000_000_000, []).append(
                    started - created)
            if warm_ns <= started <= end_ns:
                in_window += 1
    window_s = (end_ns - warm_ns) / 1e9
    in_round = [p for p in probes if warm_ns <= p[0] <= end_ns]
    before = [p for p in probes if p[0] < warm_ns]
    errors_before = before[-1][3] if before else 0
    out = {k: v for k, v in round_.items() if k not in ("sids", "wall_t0_ns", "wall_send_end_ns")}
    out.update({
        "frames_handled": handled, "frames_measured": len(latencies),
        "offered_events_per_s": round_["sessions"] / PERIOD_S,
        "handled_events_per_s": in_window / window_s if window_s > 0 else float("nan"),
        "latency_ms": summary_ms(latencies),
        "over_32ms": sum(1 for v in latencies if v > 32_000_000),
        "order_violations": order_violations, "duplicates": duplicates,
        # p50 / p99 / max latency (ms) of the frames created in each second after warm-up
        "latency_ms_by_second": [
            [round(v, 2) for v in (s["p50"], s["p99"], s["max"])]
            for s in (summary_ms(by_second[k]) for k in sorted(by_second))],
        "worker_loop_lag_ms": summary_ms([p[1] for p in in_round]),
        "worker_pool_in_use_max": max((p[2] for p in in_round), default=None),
        "worker_redis_errors": (in_round[-1][3] - errors_before) if in_round else None,
    })
    return out


# ----------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------
def start_worker(url: str, prefix: str, samples_path: Path, log_path: Path,
                 pool_max: int | None, profile: Path | None) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # lives as long as the worker
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bus_latency", "--worker", url, prefix,
         str(samples_path), str(pool_max or 0), str(profile or "")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 30
    while b"started (group" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def publish_all(url: str, prefix: str, counts: list[int], seconds: float,
                      pids: dict[str, int | None]) -> tuple[list[dict[str, Any]], str]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url, decode_responses=False)
    keys = Keys(prefix)
    pcm = os.urandom(FRAME_SAMPLES * 2)
    rounds = []
    try:
        version = (await r.info("server"))["redis_version"]
        for n in counts:
            print(f"N={n}: {n} session(s), {seconds:g} s ...", flush=True)
            result = await run_round(r, keys, n, seconds, pids, pcm)
            pub = result["publisher"]
            print(f"  sent {result['frames_sent']} frames in {result['send_window_s']:.2f} s "
                  f"(planned {result['planned_window_s']:.2f} s); publisher lag "
                  f"p50 {pub['lag_ms']['p50']:.2f} / p99 {pub['lag_ms']['p99']:.2f} / "
                  f"max {pub['lag_ms']['max']:.2f} ms, behind at end "
                  f"{pub['behind_at_end_ms']:.2f} ms; drained {result['drain_s']:.2f} s "
                  "after the last frame", flush=True)
            rounds.append(result)
    finally:
        await r.aclose()
    return rounds, str(version)


def cleanup_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    head = (f"{'N':>4} {'sent':>6} {'handled':>7} {'ev/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
            f"{'p99 ms':>7} {'max ms':>7} {'>32ms':>6} {'wrk cpu':>7} {'redis':>6} "
            f"{'pub':>6} {'other':>6} {'loop lag p99':>12} {'conns':>5} {'errs':>4} "
            f"{'pub lag p99/max':>15}")
    print(head)
    print("-" * len(head))
    for res in results:
        lat, cpu, pub = res["latency_ms"], res["cpu"], res["publisher"]["lag_ms"]
        print(f"{res['sessions']:>4} {res['frames_sent']:>6} {res['frames_handled']:>7} "
              f"{res['handled_events_per_s']:>7.0f} {lat['p50']:>7.2f} {lat['p95']:>7.2f} "
              f"{lat['p99']:>7.2f} {lat['max']:>7.2f} {res['over_32ms']:>6} "
              f"{fmt(cpu.get('worker')):>7} {fmt(cpu.get('redis')):>6} "
              f"{fmt(cpu.get('publisher')):>6} {cpu['other']:>6.2f} "
              f"{fmt(res['worker_loop_lag_ms'].get('p99')):>12} "
              f"{res['worker_pool_in_use_max'] or 0:>5} {res['worker_redis_errors'] or 0:>4} "
              f"{pub['p99']:>7.2f}/{pub['max']:<7.2f}")
    print("latency: XADD -> handler start, frames created after the 1 s warm-up; "
          ">32ms: frames later than one frame period")
    print("wrk/redis/pub/other: CPU-seconds per wall-second after warm-up (1.00 = one core "
          f"busy; this machine has {os.cpu_count()}); other: every process outside the "
          "benchmark (noise)")
    print("loop lag p99: worker event-loop lag (ms, 20 ms probe); conns: most connections "
          "in use in the worker's pool at a probe; errs: worker's redis_errors in the window; "
          "pub lag: publisher send time - schedule (ms)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, prefix, samples_path, pool_max, profile = [*sys.argv[2:], "0", ""][:5]
        run_worker(url, prefix, samples_path, int(pool_max) or None, profile or None)
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/bus_latency.json")
    parser.add_argument("--pool-max", type=int, default=None,
                        help="diagnostic: raise the worker's redis-py pool limit to this")
    parser.add_argument("--profile", type=Path, default=None,
                        help="diagnostic: write a cProfile of the worker process here")
    args = parser.parse_args()
    if args.seconds <= WARMUP_S:
        parser.error(f"--seconds must be more than the {WARMUP_S:g} s warm-up")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    from voicebus.redis_server import EmbeddedRedis

    idle_busy = busy_cores_before_start()

    configured = os.environ.get("REDIS_URL")
    server: EmbeddedRedis | None = None
    if configured:
        url = configured
    else:
        server = EmbeddedRedis()
        url = server.start()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    samples_path = args.out.with_suffix(".samples.json")
    log_path = args.out.with_suffix(".worker.log")
    samples_path.unlink(missing_ok=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_worker(url, prefix, samples_path, log_path, args.pool_max,
                            args.profile and args.profile.resolve())
        # Only a server we started is known to be a local process we may measure.
        redis_pid = server._proc.pid if server is not None and server._proc else None
        pids = {"worker": proc.pid, "redis": redis_pid}
        rounds, version = asyncio.run(publish_all(url, prefix, args.sessions, args.seconds,
                                                  pids))
        rc = stop_worker(proc)
        proc = None
        data = json.loads(samples_path.read_text())
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if configured:
            cleanup_prefix(url, prefix)
        if server is not None:
            server.stop()

    results = [analyse(r, data["samples"], data["probes"]) for r in rounds]
    print()
    print_table(results)
    warnings = [line for line in log_path.read_text().splitlines()
                if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    report = {
        "benchmark": "bus_latency",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                 "busy_cores_before_start": idle_busy,
                 "machine": platform.machine(), "redis_version": version,
                 "redis": "REDIS_URL" if configured else "embedded (AOF everysec)"},
        "params": {"seconds": args.seconds, "warmup_s": WARMUP_S, "frame_ms": PERIOD_S * 1000,
                   "frame_bytes": FRAME_SAMPLES * 2, "sample_rate": SAMPLE_RATE,
                   "stage": STAGE, "settings": "RuntimeSettings defaults",
                   "pool_max_override": args.pool_max},
        "worker": {"exit_code": rc, "stats": data["stats"], "log_warnings": warnings[:50],
                   "log": str(log_path)},
        "rounds": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    samples_path.unlink(missing_ok=True)
    print(f"worker exit {rc}; stats {data['stats']}")
    if warnings:
        print(f"{len(warnings)} warning/error line(s) in the worker log {log_path}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

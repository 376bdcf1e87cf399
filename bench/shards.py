#!/usr/bin/env python
"""A job stage on a local Redis Cluster with 1 vs N queue shards: per-hop latency and
throughput.

    python -m bench.shards [--shards 1 3] [--workers 2] [--rate 300] [--seconds 8]
                           [--burst 3000] [--out bench/results/shards.json]

Starts a 3-master Redis Cluster on loopback (``voicebus.redis_cluster``, no replicas:
they would only take CPU here) and, per shard count, ``--workers`` worker processes of
the real runtime (``JobWorker``, ``redis+cluster://``, ``redis.queue_shards``) whose
handler notes when each job reached it and writes one small output to the session's
out stream (so each job also goes through the fenced write and the ack). 64 sessions
spread the jobs over the shards as the product does (``Keys.job_queue``).

Two rounds per shard count:
* **paced**: ``--rate`` jobs/s for ``--seconds`` (the first second is warm-up):
  the hop's latency, XADD -> handler start, p50/p95/p99;
* **burst**: ``--burst`` jobs written at once (pipelined): jobs handled per second
  from the first write until the last output is there.

The workers write their samples when they stop, so the bench re-invokes itself as
``python -m bench.shards --worker URL PREFIX SHARDS SAMPLES_PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
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

import redis

from bench.measure import machine_cpu
from schemas import Event, Transcript, encode
from workers.observability.metrics import percentile
from workers.runtime.bus import FIELD
from workers.runtime.connection import connect, connect_sync
from workers.runtime.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
STAGE = "tts"
SESSIONS = [f"bench-s{i}" for i in range(64)]
WARMUP_S = 1.0


def run_worker(url: str, prefix: str, shards: int, samples_path: str) -> None:
    from workers.config import RedisConfig, WorkerConfig
    from workers.observability.logs import setup_logging
    from workers.runtime import Context, Emit, JobStage, RuntimeSettings
    from workers.runtime.jobs import JobWorker

    setup_logging("WARNING", "text", component="bench-shards")
    rows: list[tuple[str, int, int]] = []  # (turn id, created ns, handler start ns)

    async def record(event: Event, ctx: Context) -> AsyncIterator[Emit]:
        now = time.time_ns()
        if isinstance(event, Transcript):
            rows.append((event.turn_id, event.created_ns, now))
            yield Emit(ctx.keys.out(event.session_id), Transcript(
                session_id=event.session_id, turn_id=event.turn_id, text="ok"))

    settings = RuntimeSettings(url, RedisConfig(key_prefix=prefix, queue_shards=shards),
                               WorkerConfig(concurrency=8))
    worker = JobWorker(JobStage(STAGE, record), settings)
    try:
        asyncio.run(worker.run(install_signals=True))
    finally:
        with open(samples_path + ".tmp", "w") as f:
            json.dump({"rows": rows, "stats": dict(worker.stats)}, f)
        os.replace(samples_path + ".tmp", samples_path)


def start_workers(url: str, prefix: str, shards: int, count: int,
                  tmp: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    started = []
    for i in range(count):
        log_path, samples = tmp / f"worker-{shards}-{i}.log", tmp / f"samples-{shards}-{i}.json"
        log = open(log_path, "wb")  # lives as long as the worker
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.shards", "--worker", url, prefix, str(shards),
             str(samples)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started.append((proc, samples))
    client = connect_sync(url)
    queue = Keys(prefix, shards).queues(STAGE)[-1]  # the last shard's group: all joined
    deadline = time.monotonic() + 60
    while True:
        try:
            if len(client.xinfo_consumers(queue, STAGE)) >= count:
                break
        except redis.ResponseError:  # no group yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers did not start: see {tmp}")
        time.sleep(0.1)
    client.close()
    time.sleep(1.5)  # their heartbeats are up: they take jobs
    return started


async def outputs(r: Any, keys: Keys) -> int:
    pipe = r.pipeline(transaction=False)
    for sid in SESSIONS:
        pipe.xlen(keys.out(sid))
    return sum(await pipe.execute())


async def wait_outputs(r: Any, keys: Keys, total: int, limit_s: float = 120) -> float:
    deadline = time.monotonic() + limit_s
    while (done := await outputs(r, keys)) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {total} jobs answered")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def paced(r: Any, keys: Keys, rate: float, seconds: float) -> int:
    sent, start = 0, time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            sid = SESSIONS[sent % len(SESSIONS)]
            event = Transcript(session_id=sid, turn_id=f"paced-{sent}", text="x")
            await r.xadd(keys.job_queue(STAGE, sid), {FIELD: encode(event)})
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    return sent


async def burst(r: Any, keys: Keys, count: int, already: int) -> dict[str, float]:
    start = time.monotonic()
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        sid = SESSIONS[i % len(SESSIONS)]
        event = Transcript(session_id=sid, turn_id=f"burst-{i}", text="x")
        pipe.xadd(keys.job_queue(STAGE, sid), {FIELD: encode(event)})
    await pipe.execute()
    written = time.monotonic()
    done = await wait_outputs(r, keys, already + count)
    return {"write_s": written - start, "drain_s": done - start,
            "jobs_per_s": count / (done - start)}


async def measure(url: str, shards: int, workers: int, rate: float, seconds: float,
                  count: int, tmp: Path) -> dict[str, Any]:
    prefix = f"bs{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix, shards)
    procs = start_workers(url, prefix, shards, workers, tmp)
    r = connect(url)
    try:
        began_ns = time.time_ns()
        sent = await paced(r, keys, rate, seconds)
        await wait_outputs(r, keys, sent)
        throughput = await burst(r, keys, count, sent)
    finally:
        await r.aclose()
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            proc.wait(timeout=60)
    rows = [row for _, path in procs for row in json.loads(path.read_text())["rows"]]
    warm_ns = began_ns + int(WARMUP_S * 1e9)
    hop = sorted((start - created) / 1e6 for turn, created, start in rows
                 if turn.startswith("paced-") and created >= warm_ns)
    handled = sum(1 for turn, *_ in rows if turn.startswith("paced-"))
    return {"shards": shards, "workers": workers, "paced_sent": sent, "paced_handled": handled,
            "hop_ms": {q: round(percentile(hop, p), 2) for q, p in
                       (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))} | {"max": round(hop[-1], 2)},
            "burst": {"jobs": count} | {k: round(v, 3) for k, v in throughput.items()}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, prefix, shards, samples = sys.argv[2:6]
        run_worker(url, prefix, int(shards), samples)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/shards.json")
    args = parser.parse_args()

    import tempfile

    from voicebus.redis_cluster import LocalRedisCluster

    results = []
    with LocalRedisCluster(masters=3, replicas_per_master=0) as cluster, \
            tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for shards in args.shards:
            print(f"{shards} shard(s), {args.workers} workers ...", flush=True)
            results.append(asyncio.run(measure(cluster.url, shards, args.workers, args.rate,
                                               args.seconds, args.burst, Path(tmp))))
    print(f"\n{'shards':>6} {'paced':>7} {'hop p50':>8} {'p95':>7} {'p99':>7} {'max':>7} "
          f"{'burst jobs/s':>13}")
    for res in results:
        hop = res["hop_ms"]
        print(f"{res['shards']:>6} {res['paced_handled']:>7} {hop['p50']:>8.2f} "
              f"{hop['p95']:>7.2f} {hop['p99']:>7.2f} {hop['max']:>7.2f} "
              f"{res['burst']['jobs_per_s']:>13.0f}")
    print("hop: XADD -> handler start (ms), paced round after 1 s of warm-up; burst: "
          f"{args.burst} jobs written at once, handled per second until the last answer")
    cores, _ = machine_cpu()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bench": "shards", "date": time.strftime("%Y-%m-%d"), "machine": {
            "cores": cores, "python": platform.python_version()},
        "cluster": "3 masters, no replicas, loopback", "rate": args.rate,
        "seconds": args.seconds, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The chaos suite's long run: faults at random moments of real turns, and a table.

    python -m bench.chaos [--seed 13] [--turns-per-scenario 10] [--scenarios kill-vad ...]
                          [--out bench/results/chaos.json]

Starts an embedded Redis (AOF, ``appendfsync everysec``: it is killed and restarted on
its port), the scripted OpenAI-compatible LLM (three sentences, word by word), two
processes per worker stage and one gateway (``bench/chaos_harness.py``), then runs
fault-free turns (the baseline for recovery delays) and each scenario's turns: one
fault per turn, aimed at the process doing that turn's work. Per scenario: turns
completed / lost / duplicated (Jepsen's queue checker), recovery delay p50/p95 (end of
speech -> the whole answer sent, minus the baseline's median), and keys left without a
TTL once the sessions ended. Exit code 0 only when nothing was lost, duplicated, left
without a TTL or crashed, and every fault landed in its turn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.chaos_harness import (
    SCENARIOS,
    Chaos,
    Fleet,
    Probe,
    Verdict,
    fault_free_turns,
    median_answer_ms,
    product_env,
    run_scenario,
    scripted_llm,
)
from voicebus.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent

CLAIM_IDLE_MS = 3000
COLUMNS = ("scenario", "faults", "turns", "completed", "lost", "duplicated",
           "recovery p50/p95 ms", "keys without TTL")


def cells(row: dict[str, Any]) -> list[str]:
    p50, p95 = row["recovery_p50_ms"], row["recovery_p95_ms"]
    recovery = "-" if p50 is None else f"{p50:.0f} / {p95:.0f}"
    return [row["scenario"], f"{row['faults_landed']}/{row['faults']}", str(row["turns"]),
            str(row["completed"]), str(row["lost"]), str(row["duplicated"]), recovery,
            str(len(row["keys_without_ttl"]))]


def print_table(rows: list[dict[str, Any]]) -> None:
    table = [list(COLUMNS), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    print()
    for n, line in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\nfaults: landed in a turn / injected. Recovery: end of speech -> turn_done of a "
          "faulted turn minus the fault-free median.")
    for row in rows:
        for problem in [*row["violations"], *row["errors"], *row["keys_without_ttl"]]:
            print(f"  {row['scenario']}: {problem}")


def healthy(row: dict[str, Any]) -> bool:
    return (row["lost"] == row["duplicated"] == 0 and not row["keys_without_ttl"]
            and not row["violations"] and row["faults_landed"] == row["faults"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--turns-per-scenario", type=int, default=10)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/chaos.json")
    parser.add_argument("--baseline-turns", type=int, default=0, metavar="N",
                        help="fault-free turns for the baseline (default: --turns-per-scenario)")
    parser.add_argument("--liveness-ms", type=int, default=None,
                        help="worker.liveness_ms for every process (default: the product's)")
    parser.add_argument("--supervised", action="store_true",
                        help="delete a killed worker's heartbeat key at once, as `voicebus up` "
                             "does (default: peers wait for it to expire, as anywhere else)")
    args = parser.parse_args()
    if args.baseline_turns < 0:
        parser.error("--baseline-turns must be 0 (as many as --turns-per-scenario) or more")
    if args.turns_per_scenario < 1:
        parser.error("--turns-per-scenario must be >= 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="voicebus-chaos-"))
    prefix, secret = f"chaos{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(24)
    started = time.monotonic()
    redis_server = EmbeddedRedis()
    url = redis_server.start()
    verdicts: list[Verdict] = []
    baseline_ms: float | None = None
    print(f"Redis {url}, prefix {prefix}, process logs in {logs}", flush=True)
    try:
        with scripted_llm() as llm_url:
            env = product_env(url, prefix, llm_url, secret, CLAIM_IDLE_MS, args.liveness_ms)
            env["VOICEBUS_TRACING__LOCAL_PATH"] = str(logs / "spans.jsonl")
            fleet = Fleet(env, logs, supervised=args.supervised)
            fleet.start()
            chaos = Chaos(fleet, Probe(url, prefix), secret, random.Random(args.seed),
                          redis_server)
            try:
                baseline, baseline_logs = fault_free_turns(
                    chaos, args.baseline_turns or args.turns_per_scenario)
                baseline_ms = median_answer_ms(baseline_logs)
                verdicts.append(baseline)
                print(f"baseline: median answer {baseline_ms} ms", flush=True)
                for name in args.scenarios:
                    verdicts.append(run_scenario(chaos, name, args.turns_per_scenario,
                                                 CLAIM_IDLE_MS))
                    print(f"{name}: {cells(verdicts[-1].row(baseline_ms))}", flush=True)
            finally:
                fleet.stop()
    finally:
        redis_server.stop()
    rows = [v.row(baseline_ms) for v in verdicts]
    report = {"benchmark": "chaos", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()},
              "params": {"seed": args.seed, "turns_per_scenario": args.turns_per_scenario,
                         "scenarios": args.scenarios, "claim_idle_ms": CLAIM_IDLE_MS,
                         "liveness_ms": args.liveness_ms, "supervised": args.supervised},
              "baseline_answer_ms": baseline_ms, "logs": str(logs),
              "wall_s": round(time.monotonic() - started, 1), "scenarios": rows}
    args.out.write_text(json.dumps(report, indent=1))
    print_table(rows)
    print(f"\n{report['wall_s']} s; wrote {args.out}")
    return 0 if all(healthy(r) for r in rows[1:]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

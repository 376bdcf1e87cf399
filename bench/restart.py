"""How long `voicebus up` leaves a stage without a worker after one dies: kill -9 of each
stage's worker, time until its replacement has started taking work (its "started
(group" line), with a loaded standby (the default) and without (``--no-standby``).

    python -m bench.restart [--kills 3] [--out bench/results/restart.json]

Runs its own Redis; the LLM stage points at an address nothing listens on (no
reply is asked for: only the process's start is measured). Each kill waits until
the stage is settled (standby loaded; past the crash-loop window), so every kill
measures the first-death path, not the back-off.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import statistics
import time
from pathlib import Path

from bench.measure import busy_cores_before_start
from voicebus.supervisor import CRASH_LOOP_S, Supervisor

ROOT = Path(__file__).resolve().parent.parent

STAGES = ("vad", "asr", "llm", "tts")


class Log(io.StringIO):
    """The supervisor's combined log, kept in memory and searchable while it runs."""

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.getvalue()))


def wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.005)
    return value


def measure(standby: bool, kills: int) -> dict[str, list[float]]:
    log = Log()
    env = {"VOICEBUS_LLM__BASE_URL": "http://127.0.0.1:9/v1", "VOICEBUS_GATEWAY__PORT": "0"}
    up = Supervisor(None, stages=STAGES, env=env, standby=standby, log_stream=log)
    up.start(timeout=180)
    delays: dict[str, list[float]] = {stage: [] for stage in STAGES}
    try:
        for _ in range(kills):
            for stage in STAGES:
                if standby:  # the stage's newest standby has loaded
                    wait(lambda s=stage: up.pids().get(f"{s}-standby")
                         and log.count(rf"{s}: standby ready") == _standbys_spawned(log, s),
                         120, "standby loaded")
                else:
                    time.sleep(CRASH_LOOP_S)  # the first-death path, not the back-off
                old = up.pids()[stage]
                started = time.monotonic()
                os.kill(old, signal.SIGKILL)
                new = wait(lambda s=stage, o=old: (p := up.pids().get(s)) != o and p, 60,
                           "replacement")
                wait(lambda n=new: re.search(rf"-{n}-\w+: started \(group", log.getvalue()),
                     120, "replacement started")
                delays[stage].append(time.monotonic() - started)
                print(f"  {'standby' if standby else 'cold':>7} {stage:>4}: "
                      f"{delays[stage][-1] * 1000:.0f} ms", flush=True)
    finally:
        up.stop()
    return delays


def _standbys_spawned(log: Log, stage: str) -> int:
    """Standbys the supervisor started for a stage so far: the first, plus one per takeover."""
    return 1 + log.count(rf"{stage} \| exited with code -?\d+; its standby")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=3, help="kills per stage and mode")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "restart.json")
    args = p.parse_args()
    busy = busy_cores_before_start()
    results = {mode: measure(mode == "standby", args.kills) for mode in ("standby", "cold")}
    print(f"\n{'mode':>8} {'stage':>5} {'kills':>5} {'p50 ms':>7} {'max ms':>7}")
    for mode, by_stage in results.items():
        for stage, seconds in by_stage.items():
            print(f"{mode:>8} {stage:>5} {len(seconds):>5} "
                  f"{statistics.median(seconds) * 1000:>7.0f} {max(seconds) * 1000:>7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "kill -9 of a stage's worker -> its replacement's 'started (group' line",
        "busy_cores_before": round(busy, 2), "cpus": os.cpu_count(),
        "ms": {mode: {stage: [round(s * 1000) for s in seconds] for stage, seconds in by.items()}
               for mode, by in results.items()}}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

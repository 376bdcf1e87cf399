"""A real ``voicebus worker STAGE`` process for a benchmark, started and waited for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTED = b"started (group"  # the runtime's line once the worker has joined its group


def start_worker(stage: str, env: Mapping[str, str], log: Path, *, timeout_s: float = 180,
                 cpus: Sequence[int] | None = None) -> subprocess.Popen[bytes]:
    """``voicebus worker STAGE`` with ``env`` (the whole environment), its output in
    ``log``, pinned to ``cpus`` if given; returns once it is in its consumer group."""
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "voicebus", "worker", stage], cwd=ROOT, env=dict(env),
            stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    deadline = time.monotonic() + timeout_s
    while STARTED not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the {stage} worker did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc

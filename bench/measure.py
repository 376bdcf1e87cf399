"""What the benchmarks measure of the machine: CPU and memory per process, CPU over all
cores (from /proc), and whether the machine was idle before a run."""

from __future__ import annotations

import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET_CORES = 0.2  # more than this busy with other work before a run: noisy numbers


def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process, in seconds (None if it cannot be read)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process and its threads, MiB (None if gone)."""
    return _status_mb(pid, "VmRSS:")


def peak_rss_mb(pid: int | None) -> float | None:
    """The most resident memory a process has had since it started (VmHWM), MiB."""
    return _status_mb(pid, "VmHWM:")


def _status_mb(pid: int | None, field: str) -> float | None:
    """A kB field of /proc/PID/status, in MiB (None if the process is gone)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores_before_start(seconds: float = 1.0) -> float:
    """How many cores other work keeps busy, over ``seconds``; printed, with a warning
    when the machine is not idle."""
    b0, t0 = machine_cpu()
    time.sleep(seconds)
    b1, t1 = machine_cpu()
    busy = (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)
    print(f"before starting: {busy:.2f} cores busy with other work", flush=True)
    if busy > QUIET_CORES:
        print("WARNING: the machine is not idle; the numbers will be noisy", flush=True)
    return busy

"""Run the whole bus on one machine: Redis, the local LLM server, one process per stage.

Each worker is its own OS process (exactly what an operator would start on
separate machines), with its output folded into one readable log. A worker
that dies is replaced at once by its stage's standby (``standby=True``, as
``voicebus up`` runs: a process that has loaded the models and waits) and its
heartbeat key deleted, so its pending work is taken over within a reclaim poll;
without a standby it is restarted, with back-off when it keeps dying. Ctrl-C or
SIGTERM stops them all gracefully (each finishes its in-flight work first).

Unless an LLM endpoint is configured, one local LLM server (llama.cpp) is started
for all LLM workers; it loads while the other workers load their models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from redis.exceptions import RedisError

from voicebus import processes
from voicebus.local_llm import LocalLlmServer, needs_local_server
from voicebus.redis_server import EmbeddedRedis
from workers import stages
from workers.config import LlmConfig
from workers.runtime.connection import connect_sync
from workers.runtime.keys import Keys

log = logging.getLogger("voicebus.up")

STAGES = stages.PROCESSES
READY = {"gateway": "gateway listening on "}  # the log line that says a process is ready
# A worker's first line names its consumer, whose heartbeat key we delete when it dies.
STARTED = re.compile(r"(?P<consumer>[\w.:-]+): started \(group \S+, prefix (?P<prefix>[^)\s]+)\)")
CRASH_LOOP_S = 10.0  # a process that dies sooner than this after starting is restarted later
STANDBY_AFTER_S = 5.0  # a new standby loads once the takeover's work is done: 2 cores


class Supervisor(processes.ChildServer):
    def __init__(self, redis_url: str | None, *, stages: Sequence[str] = STAGES,
                 config_path: str | None = None, log_stream: IO[str] | None = None,
                 restart: bool = True, llm: LlmConfig | None = None,
                 env: dict[str, str] | None = None, standby: bool = False) -> None:
        self.configured_url = redis_url
        self.stages = list(stages)
        self.config_path = config_path
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.restart = restart
        # One worker per stage kept loaded and idle, to replace a dead one at once.
        self.standby = standby and restart
        self.llm = llm or LlmConfig()
        self.llm_url: str | None = None  # the local LLM server's, when we start one
        self.gateway_url = ""  # ws://host:port/v1/session, once the gateway listens
        self.env = dict(env or {})  # extra environment for every process
        self._llm_server: LocalLlmServer | None = None
        self.url = ""
        self._redis: EmbeddedRedis | None = None
        self._procs: dict[str, subprocess.Popen[str]] = {}  # the working process per stage
        self._standbys: dict[str, subprocess.Popen[str]] = {}
        self._since: dict[int, float] = {}  # pid -> when it started or was promoted
        self._consumers: dict[int, tuple[str, str]] = {}  # pid -> (key prefix, consumer)
        # Processes that exited, for the watcher (None: wake up, we are stopping).
        self._exits: queue.Queue[tuple[str, subprocess.Popen[str] | None]] = queue.Queue()
        self._started: dict[str, threading.Event] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------
    def start(self, timeout: float = 120.0) -> str:
        if self.configured_url:
            self.url = self.configured_url
        else:
            self._redis = EmbeddedRedis()
            self.url = self._redis.start()
            self._say("redis", f"private redis-server at {self.url} (set REDIS_URL to use yours)")
        try:
            for stage in self.stages:
                if stage != "llm":
                    self._spawn(stage)
            if "llm" in self.stages:
                if needs_local_server(self.llm):
                    self._say("llama", "loading the local LLM (set llm.base_url to use yours)")
                    self._llm_server = LocalLlmServer(self.llm)
                    self.llm_url = self._llm_server.start()
                    self._say("llama", f"local LLM server ready at {self.llm_url}")
                self._spawn("llm")
        except BaseException:
            self.stop()
            raise
        deadline = time.monotonic() + timeout
        for stage, ready in self._started.items():
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"the {stage} worker did not start within {timeout:.0f} s")
        if self.standby:  # loaded after the workers, so the first start is not slower
            for stage in self.stages:
                if stage != "gateway":
                    self._spawn(stage, standby=True)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self.url

    def stop(self, grace: float = 15.0) -> None:
        self._stopping.set()
        self._exits.put(("", None))  # wake the watcher
        with self._lock:
            procs = [*self._procs.items(), *self._standbys.items()]
        for _stage, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for stage, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(stage, "did not stop in time; killing it")
                proc.kill()
                proc.wait()
        if self._llm_server is not None:
            self._llm_server.stop()
            self._llm_server = None
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def pids(self) -> dict[str, int]:
        """Process ids by role (each stage, ``<stage>-standby``, ``llm-server``,
        ``redis``), for measuring."""
        with self._lock:
            out = {stage: proc.pid for stage, proc in self._procs.items()}
            out |= {f"{stage}-standby": proc.pid for stage, proc in self._standbys.items()}
        for name, owner in (("llm-server", self._llm_server), ("redis", self._redis)):
            pid = owner.pid if owner is not None else None
            if pid is not None:
                out[name] = pid
        return out

    def wait(self) -> None:
        """Block until Ctrl-C / SIGTERM."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()

    # -- processes -------------------------------------------------------
    def _spawn(self, stage: str, *, standby: bool = False) -> subprocess.Popen[str]:
        env = {**os.environ, **self.env, "REDIS_URL": self.url, "PYTHONUNBUFFERED": "1"}
        if self.llm_url:
            env["VOICEBUS_LLM__BASE_URL"] = self.llm_url
        if self.config_path:
            env["VOICEBUS_CONFIG"] = str(Path(self.config_path).resolve())
        command = ["gateway"] if stage == "gateway" else ["worker", stage]
        if standby:
            command.append("--standby")
        proc = subprocess.Popen(
            [sys.executable, "-m", "voicebus", *command],
            stdin=subprocess.PIPE if standby else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, start_new_session=True)  # Ctrl-C reaches us, not them
        ready = self._started.setdefault(stage, threading.Event())
        with self._lock:
            (self._standbys if standby else self._procs)[stage] = proc
            self._since[proc.pid] = time.monotonic()
        threading.Thread(target=self._pump, args=(stage, proc, ready), daemon=True).start()
        return proc

    def _pump(self, stage: str, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        marker = READY.get(stage, ": started (group")
        for line in proc.stdout:
            if marker in line:
                if stage == "gateway":
                    self.gateway_url = line.split(marker, 1)[1].split()[0]
                ready.set()
            if started := STARTED.search(line):
                self._consumers[proc.pid] = (started["prefix"], started["consumer"])
            self._say(stage, line.rstrip("\n"))
        proc.wait()  # its output ended: it exited (or closed stdout, and is about to)
        self._exits.put((stage, proc))

    def _watch(self) -> None:
        """Replace what dies: a dead worker by its stage's standby at once (or, without
        one, a new process), a dead standby by a new one; a process that keeps dying
        soon after it started is started again with a growing delay."""
        delays: dict[str, float] = {}
        due: list[tuple[float, str, bool]] = []  # (when, stage, standby)
        while not self._stopping.is_set():
            wait = min((when for when, _, _ in due), default=time.monotonic() + 1.0)
            try:
                stage, proc = self._exits.get(timeout=max(0.0, wait - time.monotonic()))
            except queue.Empty:
                now = time.monotonic()
                for item in [d for d in due if d[0] <= now]:
                    due.remove(item)
                    if not self._stopping.is_set():
                        self._spawn(item[1], standby=item[2])
                continue
            if proc is None or self._stopping.is_set() or not self.restart:
                continue
            with self._lock:
                was_standby = self._standbys.get(stage) is proc
                if not was_standby and self._procs.get(stage) is not proc:
                    continue  # already replaced
                (self._standbys if was_standby else self._procs).pop(stage)
                lived = time.monotonic() - self._since.pop(proc.pid, 0.0)
            key = f"{stage}-standby" if was_standby else stage
            delay = delays.get(key, 0.0) if lived < CRASH_LOOP_S else 0.0
            delays[key] = min(30.0, max(0.5, delay * 2))
            if was_standby:
                self._say(stage, f"standby exited with code {proc.returncode}; "
                                 f"a new one in {delay + STANDBY_AFTER_S:.1f} s")
                due.append((time.monotonic() + delay + STANDBY_AFTER_S, stage, True))
                continue
            self._declare_dead(proc.pid)
            # A standby is promoted whatever the dead one's age: a loop of deaths can go
            # no faster than standbys load (each is started STANDBY_AFTER_S later).
            standby = self._standbys.get(stage)
            if standby is not None and self._promote(stage, standby):
                self._say(stage, f"exited with code {proc.returncode}; its standby "
                                 f"(pid {standby.pid}) took over")
                due.append((time.monotonic() + STANDBY_AFTER_S, stage, True))
            else:
                self._say(stage, f"exited with code {proc.returncode}; restarting in {delay:.1f} s")
                due.append((time.monotonic() + delay, stage, False))

    def _promote(self, stage: str, standby: subprocess.Popen[str]) -> bool:
        """Tell the stage's standby to take work (it may still be loading: it goes as
        soon as it is ready); False when it is gone."""
        assert standby.stdin is not None
        try:
            standby.stdin.write("go\n")
            standby.stdin.flush()
        except OSError:
            return False
        with self._lock:
            self._standbys.pop(stage, None)
            self._procs[stage] = standby
            self._since[standby.pid] = time.monotonic()
        return True

    def _declare_dead(self, pid: int) -> None:
        """Delete a dead worker's heartbeat key: its peers (or its replacement) take its
        pending work at their next look (0.3 s), not when the key would expire (1.5 s).
        Best effort: the key expires anyway."""
        owner = self._consumers.pop(pid, None)
        if owner is None:
            return
        prefix, consumer = owner
        with contextlib.suppress(RedisError, OSError), connect_sync(self.url) as client:
            client.delete(Keys(prefix).alive(consumer))

    def _say(self, who: str, text: str) -> None:
        with self._lock:
            print(f"{who:>5} | {text}", file=self.log_stream, flush=True)


@contextlib.contextmanager
def running(redis_url: str | None, **kwargs: object) -> Iterator[Supervisor]:
    supervisor = Supervisor(redis_url, **kwargs)  # type: ignore[arg-type]
    supervisor.start()
    try:
        yield supervisor
    finally:
        supervisor.stop()

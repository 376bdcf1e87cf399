"""Run the whole bus on one machine: Redis, the local LLM server, one process per stage.

Each worker is its own OS process (exactly what an operator would start on
separate machines), with its output folded into one readable log. A worker
that dies is restarted with back-off; Ctrl-C or SIGTERM stops them all
gracefully (each finishes its in-flight work first).

Unless an LLM endpoint is configured, one local LLM server (llama.cpp) is started
for all LLM workers; it loads while the other workers load their models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from voicebus.local_llm import LocalLlmServer, needs_local_server
from voicebus.redis_server import EmbeddedRedis
from workers import stages
from workers.config import LlmConfig

log = logging.getLogger("voicebus.up")

STAGES = (*stages.NAMES, "gateway")  # the processes `up` runs
READY = {"gateway": "gateway listening on "}  # the log line that says a process is ready


class Supervisor:
    def __init__(self, redis_url: str | None, *, stages: Sequence[str] = STAGES,
                 config_path: str | None = None, log_stream: IO[str] | None = None,
                 restart: bool = True, llm: LlmConfig | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.configured_url = redis_url
        self.stages = list(stages)
        self.config_path = config_path
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.restart = restart
        self.llm = llm or LlmConfig()
        self.llm_url: str | None = None  # the local LLM server's, when we start one
        self.gateway_url = ""  # ws://host:port/v1/session, once the gateway listens
        self.env = dict(env or {})  # extra environment for every process
        self._llm_server: LocalLlmServer | None = None
        self.url = ""
        self._redis: EmbeddedRedis | None = None
        self._procs: dict[str, subprocess.Popen[str]] = {}
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
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self.url

    def stop(self, grace: float = 15.0) -> None:
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.items())
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
        """Process ids by role (each stage, ``llm-server``, ``redis``), for measuring."""
        with self._lock:
            out = {stage: proc.pid for stage, proc in self._procs.items()}
        for name, owner in (("llm-server", self._llm_server), ("redis", self._redis)):
            pid = owner.pid if owner is not None else None
            if pid is not None:
                out[name] = pid
        return out

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until Ctrl-C / SIGTERM."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()

    # -- processes -------------------------------------------------------
    def _spawn(self, stage: str) -> None:
        env = {**os.environ, **self.env, "REDIS_URL": self.url, "PYTHONUNBUFFERED": "1"}
        if self.llm_url:
            env["VOICEBUS_LLM__BASE_URL"] = self.llm_url
        if self.config_path:
            env["VOICEBUS_CONFIG"] = str(Path(self.config_path).resolve())
        command = ["gateway"] if stage == "gateway" else ["worker", stage]
        proc = subprocess.Popen(
            [sys.executable, "-m", "voicebus", *command],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, start_new_session=True)  # Ctrl-C reaches us, not them
        ready = self._started.setdefault(stage, threading.Event())
        with self._lock:
            self._procs[stage] = proc
        threading.Thread(target=self._pump, args=(stage, proc, ready), daemon=True).start()

    def _pump(self, stage: str, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        marker = READY.get(stage, ": started (group")
        for line in proc.stdout:
            if marker in line:
                if stage == "gateway":
                    self.gateway_url = line.split(marker, 1)[1].split()[0]
                ready.set()
            self._say(stage, line.rstrip("\n"))

    def _watch(self) -> None:
        delays: dict[str, float] = {}
        while not self._stopping.wait(0.5):
            with self._lock:
                dead = [(s, p) for s, p in self._procs.items() if p.poll() is not None]
            for stage, proc in dead:
                if self._stopping.is_set() or not self.restart:
                    continue
                delay = delays.get(stage, 0.5)
                self._say(stage, f"exited with code {proc.returncode}; restarting in {delay:.1f} s")
                if self._stopping.wait(delay):
                    return
                delays[stage] = min(30.0, delay * 2)
                self._spawn(stage)

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

"""Shared fixtures: a real Redis for every test, a unique key prefix per test.

Redis comes from, in order: ``VOICEBUS_TEST_REDIS_URL`` (an external server);
``VOICEBUS_TEST_REDIS=docker`` (testcontainers, only when a Docker engine
answers); otherwise a private redis-server started by voicebus's own launcher,
so the tests pass on a machine with no Redis running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from voicebus.redis_server import EmbeddedRedis
from workers.runtime.connection import connect_sync

ROOT = Path(__file__).resolve().parent.parent

# Three tiers (README, "Run the tests"), marked here from what a test uses:
#   handler/logic: in memory, real models, no Redis, no processes (tests/support/handlers.py)
#   bus: through a real redis-server (any test that uses the ``redis_url`` fixture)
#   product: worker processes, the CLI, the local LLM server, the whole product
# ``pytest -m "not slow"`` runs the first tier only (under a minute).
PRODUCT_FIXTURES = {"workers", "local_llm_url"}
BUS_FIXTURES = {"redis_url"}
# Modules whose tests start processes without those fixtures (the CLI as a user runs it).
PRODUCT_MODULES = {"test_cli", "test_edge_install", "test_product", "test_tracing"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if used & PRODUCT_FIXTURES or module in PRODUCT_MODULES \
                or item.get_closest_marker("product"):
            item.add_marker(pytest.mark.product)
            item.add_marker(pytest.mark.slow)
        elif used & BUS_FIXTURES or item.get_closest_marker("bus"):
            item.add_marker(pytest.mark.bus)
            item.add_marker(pytest.mark.slow)
# Spans of every process the tests start go here, not into the user's ~/.cache.
os.environ.setdefault("VOICEBUS_TRACING__LOCAL_PATH",
                      str(Path(tempfile.mkdtemp(prefix="voicebus-test-spans-")) / "spans.jsonl"))


def _docker_redis() -> Iterator[str]:
    try:
        import docker  # type: ignore[import-untyped]
        from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]
    except ImportError:
        pytest.exit("VOICEBUS_TEST_REDIS=docker needs the 'docker' extra (testcontainers)", 2)
    try:
        docker.from_env().ping()
    except Exception as exc:  # no engine answers
        pytest.exit(f"VOICEBUS_TEST_REDIS=docker but no Docker engine answers: {exc}", 2)
    with RedisContainer("redis:7-alpine") as container:
        host = container.get_container_host_ip()
        yield f"redis://{host}:{container.get_exposed_port(6379)}/0"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("VOICEBUS_TEST_REDIS_URL")
    if external:
        yield external
    elif os.environ.get("VOICEBUS_TEST_REDIS") == "docker":
        yield from _docker_redis()
    else:
        with EmbeddedRedis() as server:
            yield server.url


@pytest.fixture(scope="session")
def local_llm_url() -> Iterator[str]:
    """The real local LLM (llama.cpp serving the shipped Qwen2.5 GGUF), started once."""
    from voicebus.local_llm import LocalLlmServer
    from workers.config import LlmConfig

    with LocalLlmServer(LlmConfig()) as server:
        yield server.url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    value = f"t{uuid.uuid4().hex[:10]}"
    yield value
    client = connect_sync(redis_url)
    pipe = client.pipeline(transaction=False)  # on a cluster: a key's DEL to its master
    for key in client.scan_iter(f"{value}:*", count=1000):
        pipe.delete(key)
    pipe.execute()
    client.close()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = connect_sync(redis_url)
    yield client
    client.close()


class WorkerProcs:
    """Worker processes started by a test; all are killed at the end."""

    def __init__(self, url: str, prefix: str, tmp: Path) -> None:
        self.url, self.prefix, self.tmp = url, prefix, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, stage: str, **env: str) -> subprocess.Popen[bytes]:
        """A test stage (tests/support/stages.py) in its own process."""
        return self._spawn(stage, [sys.executable, "-m", "tests.support.run_stage", stage,
                                   self.url, self.prefix], env)

    def start_cli(self, stage: str, **env: str) -> subprocess.Popen[bytes]:
        """The real ``voicebus worker STAGE``, as an operator starts it."""
        settings = {"REDIS_URL": self.url, "VOICEBUS_REDIS__KEY_PREFIX": self.prefix,
                    "VOICEBUS_REDIS__CLAIM_IDLE_MS": "1000", "VOICEBUS_REDIS__BLOCK_MS": "200"}
        return self._spawn(stage, [sys.executable, "-m", "voicebus", "worker", stage],
                           {**settings, **env}, timeout=120)

    def _spawn(self, stage: str, argv: list[str], env: dict[str, str],
               timeout: float = 30) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{stage}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        path = Path(log.name)
        while b"started (group" not in path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {stage} did not start:\n{path.read_text()}")
            time.sleep(0.05)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def workers(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[WorkerProcs]:
    procs = WorkerProcs(redis_url, prefix, tmp_path)
    yield procs
    procs.stop_all()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = ""):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)

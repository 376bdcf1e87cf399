"""``voicebus probe ready|live STAGE``: Kubernetes readiness and liveness for a pod
(``deploy/k8s/README.md``). Exit code 0: healthy; 1: not.

ready (readiness and startup): Redis answers, and a consumer of this pod (named
``<stage>-<hostname>-<pid>-<random>``, the runtime's ``consumer_name``) is in the stage's
consumer group with its heartbeat key (``<prefix>:alive:<consumer>``) present, i.e. the
worker has joined its group and its liveness loop runs. The gateway: Redis answers and
its port accepts connections.

live (liveness): fails only when Redis answers and this pod has no live consumer in its
group: the process is up but its loops are stuck. Redis unreachable is not the pod's
fault (workers ride out an outage by themselves), so it passes.

Key and group names come from the code (``workers.runtime.keys.Keys``, group = stage
name), the Redis URL and prefix from the same configuration the worker loads.
"""

from __future__ import annotations

import socket
import sys

import redis

from workers.config import Config
from workers.runtime.connection import connect_sync
from workers.runtime.keys import Keys


def stream_of(keys: Keys, stage: str) -> str:
    """The stream whose consumer group ``stage`` a worker of that stage joins first."""
    return keys.sessions() if stage == "vad" else keys.queue(stage)


def live_consumers(client: redis.Redis, keys: Keys, stage: str, host: str) -> list[str]:
    """This host's consumers in the stage's group whose heartbeat key exists."""
    try:
        consumers = client.xinfo_consumers(stream_of(keys, stage), stage)
    except redis.ResponseError:  # no such stream or group yet
        return []
    names = [c["name"] for c in consumers]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    ours = [n for n in names if n.startswith(f"{stage}-{host}-")]
    return [n for n in ours if client.exists(keys.alive(n))]


def port_open(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def probe(mode: str, stage: str, config: Config) -> int:
    """``mode`` ready or live, ``stage`` a stage's name or gateway: 0 healthy, 1 not."""
    if not config.redis.url:
        print("probe: REDIS_URL is not set", file=sys.stderr)
        return 1
    client = connect_sync(config.redis.url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        return _check(client, mode, stage, config)
    finally:
        client.close()


def _check(client: redis.Redis, mode: str, stage: str, config: Config) -> int:
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        print(f"probe: Redis does not answer: {exc}", file=sys.stderr)
        return 0 if mode == "live" else 1
    if stage == "gateway":
        ok = port_open(config.gateway.port)
        if not ok:
            print(f"probe: nothing listens on port {config.gateway.port}", file=sys.stderr)
        return 0 if ok else 1
    keys = Keys.of(config.redis)
    found = live_consumers(client, keys, stage, socket.gethostname())
    if not found:
        print(f"probe: no live consumer of this pod in group {stage} of "
              f"{stream_of(keys, stage)}", file=sys.stderr)
        return 1
    return 0

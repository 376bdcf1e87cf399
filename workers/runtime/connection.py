"""Clients for Redis or a Redis Cluster: ``connect`` (asyncio, the runtime's) and
``connect_sync`` (probes, the supervisor, tests, benches), chosen by the URL's scheme."""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Connections one client opens at most. Commands beyond that wait for a free one
# (a session-affine worker acks hundreds of sessions at once) instead of failing,
# which would look like an outage.
MAX_CONNECTIONS = 32


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def connect(url: str, *, blocking_ms: int = 0) -> aioredis.Redis:
    """A client with no hidden retries: our loops retry with back-off themselves.

    A client used for blocking reads gets a socket timeout longer than the block.
    redis-py drops (never reuses) a connection whose command was cancelled, so a
    cancelled read cannot leave a stray reply for the next command.

    ``redis+cluster://host:port`` (any node) gives a Redis Cluster client. It follows
    MOVED/ASK and, after a master failover, re-reads the slot map. It has the same
    command methods, and a ``pool`` per node; it is typed as ``Redis`` here because
    the runtime uses only what both have (``is_cluster`` tells which one it is).
    """
    timeouts: dict[str, Any] = {"socket_timeout": 5.0 + blocking_ms / 1000,
                                "socket_connect_timeout": 2.0}
    if is_cluster_url(url):
        cluster = RedisCluster.from_url(
            url.replace("+cluster", "", 1), max_connections=MAX_CONNECTIONS,
            decode_responses=False, **timeouts)
        return cast(aioredis.Redis, cluster)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=30,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
        health_check_interval=0,
        **timeouts,
    )
    return aioredis.Redis.from_pool(pool)


def connect_sync(url: str, **options: Any) -> redis.Redis:
    """A blocking client (probes, the supervisor, tests, benches): a cluster one for
    ``redis+cluster://``, typed as ``Redis`` as in ``connect``."""
    if is_cluster_url(url):
        return cast(redis.Redis, redis.RedisCluster.from_url(
            url.replace("+cluster", "", 1), **options))
    return redis.Redis.from_url(url, **options)


def is_cluster(client: aioredis.Redis) -> bool:
    return isinstance(client, RedisCluster)

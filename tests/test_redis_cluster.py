"""A real local Redis Cluster (voicebus.redis_cluster), and what redis-py's *async*
cluster client can do on it that the bus relies on: scripts, blocking XREADGROUP,
transactions, SCAN over every master. The failover test runs last: it kills a master.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
import redis.asyncio.cluster as aiocluster
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from voicebus.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.bus


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3, replicas_per_master=1) as c:
        yield c


@pytest.fixture
async def aclient(cluster: LocalRedisCluster) -> AsyncIterator[aiocluster.RedisCluster]:
    client = aiocluster.RedisCluster.from_url(cluster.plain_url, decode_responses=True)
    await client.initialize()
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"t:{uuid.uuid4().hex[:8]}"


def _blocked_clients(port: int) -> int:
    with redis.Redis(port=port) as r:
        return int(r.info("clients")["blocked_clients"])


async def _until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _commands_run(port: int, name: str) -> int:
    with redis.Redis(port=port) as r:
        return int(r.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_cluster_formed(cluster: LocalRedisCluster) -> None:
    assert cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert cluster.plain_url.startswith("redis://127.0.0.1:")
    assert len(cluster.nodes) == 6
    replicas = [n for n in cluster.nodes if n.replica_of is not None]
    assert len(replicas) == 3
    assert {r.replica_of.port for r in replicas if r.replica_of} \
        == {n.port for n in cluster.nodes[:3]}
    assert all(n.pid and n.node_id for n in cluster.nodes)


def test_keys_spread_over_three_masters(cluster: LocalRedisCluster, prefix: str) -> None:
    keys = [f"{prefix}:{i}" for i in range(60)]
    owners = {cluster.master_for_key(k).port for k in keys}
    assert owners == {n.port for n in cluster.nodes[:3]}
    with RedisCluster.from_url(cluster.plain_url, decode_responses=True) as client:
        for k in keys:
            client.set(k, k)
        assert all(client.get(k) == k for k in keys)
        # Each key really lives on the master we computed: it is in that node's keyspace.
        for k in keys[:10]:
            with redis.Redis(port=cluster.master_for_key(k).port) as node:
                assert node.exists(k) == 1


async def test_async_get_primaries(cluster: LocalRedisCluster,
                                   aclient: aiocluster.RedisCluster) -> None:
    primaries = aclient.get_primaries()
    assert {p.port for p in primaries} == {n.port for n in cluster.nodes[:3]}


async def test_async_script_keys_in_one_slot(aclient: aiocluster.RedisCluster,
                                             prefix: str) -> None:
    script = aclient.register_script(
        "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]);"
        " return redis.call('GET', KEYS[2])")
    a, b = f"{{{prefix}}}:a", f"{{{prefix}}}:b"
    assert await script(keys=[a, b], args=["v1"]) == "v1"
    assert await script(keys=[a, b], args=["v2"]) == "v2"  # second call: EVALSHA
    assert await aclient.get(a) == "v2"
    # Keys in different slots are refused by the client before reaching Redis.
    c = next(f"{prefix}:{i}" for i in range(100)
             if key_slot(f"{prefix}:{i}".encode()) != key_slot(a.encode()))
    with pytest.raises(RedisClusterException, match="same key slot"):
        await script(keys=[a, c], args=["v3"])


async def test_async_blocking_xreadgroup_on_two_streams_in_one_slot(
        cluster: LocalRedisCluster, aclient: aiocluster.RedisCluster, prefix: str) -> None:
    s1, s2 = f"{{{prefix}}}:s1", f"{{{prefix}}}:s2"
    for s in (s1, s2):
        await aclient.xgroup_create(s, "g", id="$", mkstream=True)
    port = cluster.master_for_key(s1).port
    before = _blocked_clients(port)
    read = asyncio.create_task(
        aclient.xreadgroup("g", "c1", {s1: ">", s2: ">"}, count=10, block=10_000))
    await _until(lambda: _blocked_clients(port) > before, "XREADGROUP to block")
    t0 = time.monotonic()
    await aclient.xadd(s2, {"x": "1"})
    reply = await asyncio.wait_for(read, 5)
    woke_ms = (time.monotonic() - t0) * 1000
    print(f"blocking XREADGROUP woke {woke_ms:.1f} ms after XADD")
    assert len(reply) == 1
    stream, entries = reply[0]
    assert stream == s2 and entries[0][1] == {"x": "1"}
    # Nothing new: a short block times out with an empty reply, not an error.
    assert not await aclient.xreadgroup("g", "c1", {s1: ">", s2: ">"}, block=50)


async def test_async_transaction_pipeline_in_one_slot(
        cluster: LocalRedisCluster, aclient: aiocluster.RedisCluster, prefix: str) -> None:
    a, b = f"{{{prefix}}}:a", f"{{{prefix}}}:b"
    port = cluster.master_for_key(a).port
    execs = _commands_run(port, "exec")
    async with aclient.pipeline(transaction=True) as pipe:
        pipe.set(a, "1").incr(a).set(b, "x").get(a)
        assert await pipe.execute() == [True, 2, True, "2"]
    assert await aclient.get(b) == "x"
    assert _commands_run(port, "exec") == execs + 1  # really MULTI/EXEC on the owning master
    c = next(f"{prefix}:{i}" for i in range(100)
             if key_slot(f"{prefix}:{i}".encode()) != key_slot(a.encode()))
    with pytest.raises(RedisClusterException, match="same slot") as refused:
        async with aclient.pipeline(transaction=True) as pipe:
            pipe.set(a, "1").set(c, "1")
            await pipe.execute()
    print(f"cross-slot transaction: {type(refused.value).__name__}: {refused.value}")


async def test_async_scan_iter_covers_every_master(
        cluster: LocalRedisCluster, aclient: aiocluster.RedisCluster, prefix: str) -> None:
    keys = {f"{prefix}:scan:{i}" for i in range(90)}
    for k in keys:
        await aclient.set(k, "1")
    assert {cluster.master_for_key(k).port for k in keys} == \
        {n.port for n in cluster.nodes[:3]}
    found = [k async for k in aclient.scan_iter(match=f"{prefix}:scan:*", count=10)]
    assert sorted(found) == sorted(keys)  # every master, and no key twice (replicas skipped)


async def test_failover_keeps_acknowledged_writes(
        cluster: LocalRedisCluster, aclient: aiocluster.RedisCluster, prefix: str) -> None:
    key = f"{prefix}:failover"
    master = cluster.master_for_key(key)
    with redis.Redis(port=master.port, decode_responses=True) as node:
        pipe = node.pipeline(transaction=False)  # one connection: WAIT counts its writes
        pipe.set(key, "before").execute_command("WAIT", 1, 1000)
        assert pipe.execute()[1] == 1  # the replica acknowledged the write
    assert await aclient.get(key) == "before"  # the old client holds a link to the master
    t0 = time.monotonic()
    killed = cluster.kill_master_for_key(key)
    assert killed.port == master.port and killed.killed
    await asyncio.to_thread(cluster.wait_for_failover, key, 20)
    took = time.monotonic() - t0
    promoted = cluster.master_for_key(key)
    print(f"failover took {took:.2f} s (node timeout {cluster.node_timeout_ms} ms): "
          f"{master.port} -> {promoted.port}")
    assert promoted.replica_of is master
    with RedisCluster.from_url(cluster.plain_url, decode_responses=True) as client:
        assert client.get(key) == "before"
        client.set(key, "after")
        assert client.get(key) == "after"
    # An async client made before the kill finds the promoted master by itself.
    t1 = time.monotonic()
    assert await aclient.get(key) == "after"
    await aclient.set(key, "again")
    print(f"old async client recovered in {time.monotonic() - t1:.2f} s")

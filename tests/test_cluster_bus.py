"""The bus on a real Redis Cluster (3 masters, 3 replicas, ``LocalRedisCluster``):
the runtime's tests of ordering, kill -9 mid-job, reclaiming, dead letters, fencing,
the cancel lane and sharded queues, run again with ``redis+cluster://``; a product
conversation; ``voicebus status``. Failovers: ``tests/test_cluster_failover.py``.

On a cluster every multi-key command must stay in one slot: a session's keys share
its bucket's hash tag, a write's dedup hash is on its output's slot, and a worker
reads the streams of each slot in their own read (``workers.runtime.keys``,
``workers.runtime.bus``). A CROSSSLOT mistake fails these tests outright.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from tests.busutil import cluster_prefix
from tests.test_job_worker import (  # noqa: F401 (collected here again, on the cluster)
    test_a_frozen_worker_that_wakes_up_cannot_write_for_a_job_a_peer_took,
    test_a_sharded_queue_keeps_each_sessions_jobs_on_one_shard_and_all_get_done,
    test_cancel_stops_a_streaming_handler_between_chunks,
    test_handles_jobs_and_acks_them,
    test_killed_worker_mid_job_is_finished_by_a_peer_exactly_once,
    test_poison_goes_to_dead_letters_and_the_worker_carries_on,
)
from tests.test_session_worker import (  # noqa: F401
    test_200_sessions_through_3_workers_keep_order,
    test_bad_announcements_and_frames_are_dead_lettered,
    test_graceful_stop_hands_sessions_to_a_peer_at_once,
    test_owner_killed_mid_session_peer_continues_in_order_exactly_once,
)
from voicebus.redis_cluster import LocalRedisCluster
from voicebus.supervisor import Supervisor
from workers.config import LlmConfig
from workers.runtime.bus import FIELD
from workers.runtime.connection import connect_sync
from workers.runtime.keys import Keys


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3, replicas_per_master=1) as running:
        yield running


@pytest.fixture(scope="module")
def redis_url(cluster: LocalRedisCluster) -> str:
    return cluster.url


@pytest.fixture
def prefix(cluster: LocalRedisCluster) -> Iterator[str]:
    yield from cluster_prefix(cluster)


def test_a_sessions_keys_share_a_slot_and_sessions_spread_over_the_masters(
        cluster: LocalRedisCluster, prefix: str) -> None:
    keys = Keys(prefix)
    masters = set()
    for i in range(64):
        sid = f"s{i}"
        names = [keys.audio(sid), keys.out(sid), keys.cancelled(sid), keys.active_turn(sid),
                 keys.audible(sid), keys.asr_result(sid, "t1", 100)]
        slots = {key_slot(n.encode()) for n in names}
        assert len(slots) == 1, names
        masters.add(cluster.master_for_key(keys.audio(sid)).port)
    assert len(masters) == 3


def test_status_walks_every_master(cluster: LocalRedisCluster, prefix: str) -> None:
    """``voicebus status`` on a cluster lists the streams of all three masters."""
    keys = Keys(prefix, queue_shards=3)
    client = connect_sync(cluster.url)
    try:
        for queue in keys.queues("asr"):
            client.xgroup_create(queue, "asr", id="0", mkstream=True)
            client.xadd(queue, {FIELD: b"x"})
        sessions = [f"s{i}" for i in range(12)]
        for sid in sessions:
            client.xadd(keys.audio(sid), {FIELD: b"x"})
    finally:
        client.close()
    assert len({cluster.master_for_key(keys.audio(s)).port for s in sessions}) > 1
    env = {**os.environ, "REDIS_URL": cluster.url, "VOICEBUS_REDIS__KEY_PREFIX": prefix}
    result = subprocess.run([sys.executable, "-m", "voicebus", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    streams = {s["key"]: s for s in json.loads(result.stdout)["streams"]}
    assert set(keys.queues("asr")) <= set(streams)
    assert all(streams[q]["groups"][0]["name"] == "asr" for q in keys.queues("asr"))
    assert {keys.audio(s) for s in sessions} <= set(streams)


@pytest.mark.timeout(300)
def test_a_product_conversation_on_the_cluster(
        cluster: LocalRedisCluster, local_llm_url: str, tmp_path: Path) -> None:
    """Every worker and the gateway as ``voicebus up`` runs them, on the cluster: two
    turns of a conversation, answered with audio, and remembered."""
    from tests.test_product import SECRET, spoken, talk

    prefix = f"p{uuid.uuid4().hex[:8]}"
    env = {"VOICEBUS_REDIS__KEY_PREFIX": prefix, "VOICEBUS_GATEWAY__PORT": "0",
           "VOICEBUS_GATEWAY__SECRET": SECRET, "VOICEBUS_LLM__BASE_URL": local_llm_url,
           "VOICEBUS_LLM__TEMPERATURE": "0", "VOICEBUS_REDIS__QUEUE_SHARDS": "3"}
    supervisor = Supervisor(cluster.url, llm=LlmConfig(base_url=local_llm_url), env=env,
                            log_stream=open(tmp_path / "product.log", "w"))
    supervisor.start(timeout=180)
    try:
        wavs = [spoken("Hello! My name is Peter.", tmp_path / "1.wav"),
                spoken("What is my name?", tmp_path / "2.wav")]
        turns = talk((supervisor, prefix), "cluster-user", wavs, out_dir=tmp_path / "out")
    finally:
        supervisor.stop()
    assert len(turns) == 2 and not any(t.interrupted for t in turns)
    assert "name" in turns[1].transcript.lower()
    assert "peter" in turns[1].reply.lower(), turns[1].reply  # memory of turn one
    assert all(len(t.audio) / 2 / 24_000 > 0.5 for t in turns)
    client = connect_sync(cluster.url)
    try:  # the jobs went through the shards of the sessions' queues, on the cluster
        used = [q for stage in ("asr", "llm", "tts")
                for q in Keys(prefix, queue_shards=3).queues(stage) if client.exists(q)]
        assert {q.split(":q:")[1].split(":")[0] for q in used} == {"asr", "llm", "tts"}
    finally:
        client.close()

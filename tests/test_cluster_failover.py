"""Master failovers on a real Redis Cluster (``LocalRedisCluster``, 3 masters with a
replica each, 1 s node timeout), under a job stage and under a product conversation.
Each test kills a master, so each gets a cluster of its own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import Transcript
from tests.busutil import cluster_prefix, pending, publish, read_all
from tests.conftest import wait_for
from tests.test_job_worker import turn
from voicebus.redis_cluster import LocalRedisCluster
from voicebus.supervisor import Supervisor
from workers.config import LlmConfig
from workers.runtime.connection import connect_sync
from workers.runtime.keys import Keys


@pytest.fixture
def cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3, replicas_per_master=1) as running:
        yield running


@pytest.fixture
def redis_url(cluster: LocalRedisCluster) -> str:
    return cluster.url


@pytest.fixture
def prefix(cluster: LocalRedisCluster) -> Iterator[str]:
    yield from cluster_prefix(cluster)


@pytest.mark.timeout(300)
def test_a_conversation_rides_out_the_failover_of_its_sessions_master(
        cluster: LocalRedisCluster, local_llm_url: str, tmp_path: Path) -> None:
    """The product on the cluster; the moment turn 2's transcript reaches the device,
    the master holding that session's keys (its audio, out stream, cancels) is killed.
    Its replica takes over; the turn's reply comes late, not never, and turn 3 is
    normal. Prints what the failover cost the turn."""
    from edge.auth import mint
    from edge.client import talk_wavs
    from tests.test_product import SECRET, spoken

    prefix = f"p{uuid.uuid4().hex[:8]}"
    env = {"VOICEBUS_REDIS__KEY_PREFIX": prefix, "VOICEBUS_GATEWAY__PORT": "0",
           "VOICEBUS_GATEWAY__SECRET": SECRET, "VOICEBUS_LLM__BASE_URL": local_llm_url,
           "VOICEBUS_LLM__TEMPERATURE": "0"}
    supervisor = Supervisor(cluster.url, llm=LlmConfig(base_url=local_llm_url), env=env,
                            log_stream=open(tmp_path / "product.log", "w"))
    killed: list[int] = []
    transcripts: list[str] = []
    session: list[str] = []

    def on_message(message: dict[str, object]) -> None:
        if message["type"] == "ready":
            session.append(str(message["session_id"]))
        elif message["type"] == "transcript":
            transcripts.append(str(message["turn_id"]))
            if len(transcripts) == 2 and not killed:  # turn 2: its reply is under way
                killed.append(cluster.kill_master_for_key(Keys(prefix).out(session[0])).port)

    supervisor.start(timeout=180)
    try:
        wavs = [spoken(text, tmp_path / f"{i}.wav") for i, text in enumerate(
            ("Hello! My name is Peter.", "What is the capital of France?",
             "What is my name?"))]
        turns = asyncio.run(talk_wavs(supervisor.gateway_url, mint(SECRET.encode(), "fo", 300),
                                      wavs, on_message=on_message, answer_timeout_s=90))
    finally:
        supervisor.stop()
    assert killed, "the failover happened during the conversation"
    cluster.wait_for_failover(Keys(prefix).out(session[0]))
    assert len(turns) == 3 and all(t.reply and t.audio for t in turns), \
        [(t.transcript, t.reply) for t in turns]
    assert "peter" in turns[2].reply.lower(), turns[2].reply  # memory survived it too
    e2e = [t.latency_ms["end_of_speech_to_first_audio"] for t in turns]
    print(f"end of speech -> first audio, ms: {[round(x) for x in e2e]} "
          "(the master died during turn 2)")


def test_a_job_stage_rides_out_a_master_failover(
        cluster: LocalRedisCluster, workers, prefix: str) -> None:  # type: ignore[no-untyped-def]
    """The master of the queue's slot is killed while jobs flow: its replica takes over
    (~2 s with a 1 s node timeout), the worker waits it out, and every job is answered
    once. Jobs written with WAIT 1 are on the replica; what the turn loses is time."""
    keys = Keys(prefix)
    queue = keys.queue("asr")
    client = connect_sync(cluster.url)
    workers.start("slow-asr")
    sessions = [f"f{i}" for i in range(6)]
    for sid in sessions[:3]:
        publish(client, queue, turn(sid, "t1"))
    wait_for(lambda: all(read_all(client, keys.out(s)) for s in sessions[:3]),
             timeout=30, what="answers before the failover")
    client.wait(1, 1000)  # the replica has it all
    killed_at = time.monotonic()
    cluster.kill_master_for_key(queue)
    cluster.wait_for_failover(queue)
    failover_s = time.monotonic() - killed_at
    client.close()
    client = connect_sync(cluster.url)
    for sid in sessions[3:]:
        publish(client, queue, turn(sid, "t1"))
    wait_for(lambda: all(read_all(client, keys.out(s)) for s in sessions[3:]),
             timeout=30, what="answers after the failover")
    answered_s = time.monotonic() - killed_at
    print(f"failover {failover_s:.2f} s; first jobs after it answered {answered_s:.2f} s "
          "after the kill")
    for sid in sessions:
        out = read_all(client, keys.out(sid))
        assert len(out) == 1 and isinstance(out[0], Transcript), out
    wait_for(lambda: not pending(client, queue, "asr"), what="acks")
    client.close()

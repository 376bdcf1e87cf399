"""``voicebus up``'s supervisor: a dead worker is replaced by its stage's loaded standby,
its heartbeat key goes at once, and the turn it held is still answered, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from tests.busutil import publish
from tests.conftest import wait_for
from tests.test_asr import manifest, read_pcm
from tests.test_asr_worker import transcripts, turn_ended
from voicebus.supervisor import STANDBY_AFTER_S, Supervisor
from workers.runtime.keys import Keys

pytestmark = pytest.mark.timeout(240)


def test_a_killed_worker_is_replaced_by_its_standby_and_its_turn_is_answered(
        redis_url: str, sync_redis: redis.Redis, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    keys = Keys(prefix)
    log = tmp_path / "up.log"
    # A heartbeat that would outlive the test and a sweep that never comes: the job can
    # change hands only because the supervisor deletes the dead one's heartbeat.
    env = {"VOICEBUS_REDIS__KEY_PREFIX": prefix, "VOICEBUS_REDIS__BLOCK_MS": "200",
           "VOICEBUS_WORKER__LIVENESS_MS": "20000", "VOICEBUS_REDIS__CLAIM_IDLE_MS": "600000"}
    with Supervisor(redis_url, stages=["asr"], env=env, standby=True,
                    log_stream=log.open("w")) as up:
        wait_for(lambda: "standby ready" in log.read_text(), timeout=120, what="the standby")
        first, standby = up.pids()["asr"], up.pids()["asr-standby"]
        [consumer] = [c["name"].decode() for c in sync_redis.xinfo_consumers(
            keys.queue("asr"), "asr")] or [""]
        assert sync_redis.exists(keys.alive(consumer))

        name = next(iter(manifest()))
        publish(sync_redis, keys.queue("asr"), turn_ended("s1", "t1", read_pcm(name)))
        wait_for(lambda: sync_redis.xpending(keys.queue("asr"), "asr")["pending"] >= 1
                 or sync_redis.exists(keys.queue("llm")), what="the job taken")
        os.kill(first, signal.SIGKILL)  # mid-job, or just after it: either way, answered once

        wait_for(lambda: up.pids().get("asr") == standby, what="the standby promoted")
        assert f"its standby (pid {standby}) took over" in log.read_text()
        # Deleted before the promotion, not left to expire (20 s)
        assert not sync_redis.exists(keys.alive(consumer))
        said = transcripts(sync_redis, keys.queue("llm"), "s1", 1, timeout=90)
        assert len(said) == 1 and said[0].text.strip(), said
        # A new standby is loaded in the background, for the next death.
        replacement = wait_for(lambda: up.pids().get("asr-standby"), timeout=STANDBY_AFTER_S + 120,
                               what="a new standby")
        assert replacement not in (first, standby)


def test_up_only_one_stage_runs_just_that_worker_and_clears_a_dead_ones_heartbeat(
        redis_url: str, sync_redis: redis.Redis, tmp_path: Path) -> None:
    """One worker per pod (``deploy/k8s``): ``voicebus up --only tts --no-standby``. When
    the worker dies its heartbeat goes at once (peers in other pods take its work over
    then, not when it would lapse) and it is started again."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    keys = Keys(prefix)
    env = {**os.environ, "REDIS_URL": redis_url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
           "VOICEBUS_WORKER__LIVENESS_MS": "20000", "VOICEBUS_TRACING__ENABLED": "false"}
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "voicebus", "up", "--only", "tts",
                           "--no-standby"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def alive() -> list[str]:
            return sorted(k.decode() for k in sync_redis.scan_iter(keys.alive("*")))

        [first] = wait_for(alive, timeout=120, what="the tts worker's heartbeat")
        assert first.split(":alive:")[1].startswith("tts-")
        text = (tmp_path / "up.log").read_text()
        assert "voicebus is up: tts on REDIS_URL=" in text and "gateway listening" not in text
        pid = int(first.rsplit("-", 2)[1])  # consumer: tts-HOST-PID-RANDOM
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: first not in alive(), timeout=5,
                 what="the dead worker's heartbeat deleted (it would last 20 s)")
        [second] = wait_for(alive, timeout=120, what="the worker started again")
        assert second != first
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        log.close()

"""The ACL file in deploy/ lets each worker do its job and nothing else."""

from __future__ import annotations

import pytest
import redis

from schemas import TurnEnded
from tests.busutil import publish, read_all
from tests.conftest import ROOT, WorkerProcs, wait_for
from voicebus.redis_server import EmbeddedRedis
from workers.runtime.keys import Keys

ACL = ROOT / "deploy" / "redis-users.acl"


@pytest.mark.bus
def test_workers_run_as_least_privileged_users(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with EmbeddedRedis(extra_args=["--aclfile", str(ACL)]) as server:
        port = server.port
        gateway = redis.Redis(port=port, username="gateway", password="change-me-gateway")
        keys = Keys("vb")
        procs = WorkerProcs(f"redis://asr:change-me-asr@127.0.0.1:{port}/0", "vb", tmp_path)
        try:
            procs.start("slow-asr")
            publish(gateway, keys.queue("asr"), TurnEnded(
                session_id="s1", turn_id="t1", sample_rate=16000, audio=b"\0\0",
                speech_start_ms=0, speech_end_ms=1, decided_ms=1))
            out = wait_for(lambda: read_all(gateway, keys.out("s1")), what="job done as asr")
            assert out[0].turn_id == "t1"
            assert "NOPERM" not in procs.logs()
        finally:
            procs.stop_all()

        # The string keys each stage keeps: the VAD's live agent turn and learned pauses,
        # the ASR's speculative transcripts, the gateway's audible mark (and memory).
        for user, key in [("vad", keys.active_turn("s1")), ("vad", keys.user_pauses("u")),
                          ("asr", keys.asr_result("s1", "t1", 100)),
                          ("gateway", keys.audible("s1"))]:
            client = redis.Redis(port=port, username=user, password=f"change-me-{user}")
            if key.endswith(":pauses"):
                client.hset(key, "avg", "0.5")
            else:
                client.set(key, "x", ex=10)
                assert client.getdel(key) == b"x"
        vad = redis.Redis(port=port, username="vad", password="change-me-vad")
        assert vad.get(keys.audible("s1")) is None
        asr = redis.Redis(port=port, username="asr", password="change-me-asr")
        with pytest.raises(redis.exceptions.NoPermissionError):
            asr.set("other-app:key", "x")  # outside the prefix
        with pytest.raises(redis.exceptions.NoPermissionError):
            asr.flushall()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()  # the default user is off

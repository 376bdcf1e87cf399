"""The least-privileged users of ``deploy/redis-users.acl`` on a real Redis Cluster.

ACLs are per node on a cluster (a managed cluster's user groups, or the same ``aclfile``
on every node): here every node of a 3-master, 3-replica ``LocalRedisCluster`` loads the
deploy file. A cluster client needs more than a single-Redis one (it asks a node for the
slot map before anything else), so these tests catch a rule that works on one Redis and
refuses every command on a cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from schemas import TurnEnded
from tests.busutil import publish, read_all
from tests.conftest import ROOT, WorkerProcs, wait_for
from tests.test_session_worker import echoed, send_frames, start_sessions
from voicebus.redis_cluster import LocalRedisCluster
from voicebus.redis_server import find_redis_server
from workers.runtime.connection import connect_sync
from workers.runtime.keys import Keys

ACL = ROOT / "deploy" / "redis-users.acl"
K8S_CONFIG = ROOT / "deploy" / "k8s" / "base" / "config.yaml"


def redis_servers() -> list[str]:
    """The bundled redis-server (6.2) and, where one is installed, the system's (7.x:
    XINFO GROUPS' lag, which KEDA's lag triggers read, and stricter ACL parsing)."""
    bundled = find_redis_server()
    system = shutil.which("redis-server")
    same = system is None or os.path.realpath(system) == os.path.realpath(bundled)
    return [bundled] if same else [bundled, str(system)]


def version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return "redis-" + out.split("v=")[1].split()[0]


@pytest.fixture(scope="module", params=redis_servers(), ids=version)
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3, replicas_per_master=1, binary=request.param,
                           acl_file=ACL) as running:
        yield running


def as_user(cluster: LocalRedisCluster, user: str) -> str:
    return cluster.url_as(user, f"change-me-{user}")  # the file's placeholder passwords


def probe(mode: str, stage: str, url: str) -> subprocess.CompletedProcess[str]:
    """``voicebus probe``, as a pod runs it, with the k8s base's config file."""
    return subprocess.run(
        [sys.executable, "-m", "voicebus", "probe", mode, stage], capture_output=True,
        text=True, timeout=30, cwd=ROOT, env={**os.environ, "REDIS_URL": url,
                                              "VOICEBUS_CONFIG": str(K8S_CONFIG)})


@pytest.mark.bus
def test_each_stage_works_on_a_cluster_as_its_own_user(
        cluster: LocalRedisCluster, tmp_path: Path) -> None:
    keys = Keys("vb")  # the prefix the ACL's key patterns allow
    gateway = connect_sync(as_user(cluster, "gateway"))
    procs = WorkerProcs(as_user(cluster, "asr"), "vb", tmp_path)
    try:
        assert probe("ready", "asr", as_user(cluster, "asr")).returncode == 1
        procs.start("slow-asr")
        procs.url = as_user(cluster, "vad")
        procs.start("echo-session")
        publish(gateway, keys.queue("asr"), TurnEnded(
            session_id="s1", turn_id="t1", sample_rate=16000, audio=b"\0\0",
            speech_start_ms=0, speech_end_ms=1, decided_ms=1))
        out = wait_for(lambda: read_all(gateway, keys.out("s1")), what="a job done as asr")
        assert out[0].turn_id == "t1"
        sids = [f"acl{i}" for i in range(6)]  # over several masters
        start_sessions(gateway, keys, sids)
        send_frames(gateway, keys, sids, range(5), end=True)
        wait_for(lambda: all(gateway.xlen(keys.out(s)) == 5 for s in sids),
                 what="sessions handled as vad")
        assert all(echoed(gateway, keys, s) == list(range(5)) for s in sids)
        # The pods' readiness probe, as the stage's user, finds each worker in its group.
        assert probe("ready", "asr", as_user(cluster, "asr")).returncode == 0
        assert probe("ready", "vad", as_user(cluster, "vad")).returncode == 0
        assert "NOPERM" not in procs.logs()
    finally:
        procs.stop_all()
        gateway.close()


@pytest.mark.bus
def test_keda_reads_the_lag_and_pending_entries_as_the_operator(
        cluster: LocalRedisCluster) -> None:
    keys = Keys("vb")
    stream = keys.queue("tts")
    gateway = connect_sync(as_user(cluster, "gateway"))
    gateway.xgroup_create(stream, "tts", id="$", mkstream=True)
    for i in range(3):
        gateway.xadd(stream, {"n": str(i)})
    gateway.xreadgroup("tts", "c1", {stream: ">"}, count=1)
    # What KEDA's redis-cluster-streams scaler asks: the slot map, XPENDING's summary,
    # XINFO GROUPS (lag; Redis 7+ only, the bundled 6.2 omits the field).
    operator = connect_sync(as_user(cluster, "operator"), decode_responses=True)
    try:
        assert operator.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        assert operator.xpending(stream, "tts")["pending"] == 1
        group = next(g for g in operator.xinfo_groups(stream) if g["name"] == "tts")
        assert group["pending"] == 1
        if "lag" in group:
            assert group["lag"] == 2
        with pytest.raises(redis.exceptions.NoPermissionError):
            operator.set("vb:not-for-the-operator", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.set("other-app:key", "x")  # outside the prefix, on any node
    finally:
        operator.close()
        gateway.close()

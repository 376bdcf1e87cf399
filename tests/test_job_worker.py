"""The job-stage runtime through real worker processes and a real redis-server."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from schemas import DeadLetter, SessionEnded, Transcript, TurnEnded, encode
from tests.busutil import cancel_turn, dead_letters, pending, publish, read_all
from tests.conftest import wait_for
from workers.runtime.bus import FIELD
from workers.runtime.keys import Keys


def turn(session: str, turn_id: str, rule: str = "", size: int = 320) -> TurnEnded:
    return TurnEnded(session_id=session, turn_id=turn_id, sample_rate=16000,
                     audio=b"\0" * size, speech_start_ms=0, speech_end_ms=10, decided_ms=10,
                     rule=rule)


def test_handles_jobs_and_acks_them(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    proc = workers.start("slow-asr")
    # Registered at start, so an operator sees it before its first job.
    def registered() -> bool:
        try:
            consumers = sync_redis.xinfo_consumers(keys.queue("asr"), "asr")
        except redis.ResponseError:  # the group is not there yet
            return False
        return any(str(proc.pid) in c["name"].decode() for c in consumers)

    wait_for(registered, what="consumer registered")
    for i in range(10):
        publish(sync_redis, keys.queue("asr"), turn("s1", f"t{i}"))
    out = wait_for(lambda: (e := read_all(sync_redis, keys.out("s1"))) and len(e) == 10 and e,
                   what="10 transcripts")
    # Jobs run concurrently (load-balanced), so their outputs may interleave.
    assert sorted(e.turn_id for e in out) == sorted(f"t{i}" for i in range(10))
    assert all(isinstance(e, Transcript) and "320 bytes" in e.text for e in out)
    wait_for(lambda: not pending(sync_redis, keys.queue("asr"), "asr"), what="acks")
    # No gateway ever started session s1: its out stream must not stay forever.
    assert 3600 < sync_redis.ttl(keys.out("s1")) <= 7200
    assert sync_redis.ttl(keys.queue("asr")) == -1  # a queue outlives every session


def test_killed_worker_mid_job_is_finished_by_a_peer_exactly_once(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    queue = keys.queue("asr")
    env = {"TEST_STAGE_DELAY": "2.0", "TEST_CLAIM_IDLE_MS": "1000"}
    first = workers.start("slow-asr", **env)
    publish(sync_redis, queue, turn("s1", "t1"))
    held = wait_for(lambda: pending(sync_redis, queue, "asr"), what="the job to be taken")
    victim = held[0]["consumer"].decode()
    assert str(first.pid) in victim
    second = workers.start("slow-asr", **env)
    killed_at = time.monotonic()
    first.send_signal(signal.SIGKILL)
    first.wait()

    out = wait_for(lambda: read_all(sync_redis, keys.out("s1")), timeout=30, what="output")
    assert time.monotonic() - killed_at >= 1.0  # only after the claim idle time
    time.sleep(1.5)  # room for a duplicate to show up, if there were one
    out = read_all(sync_redis, keys.out("s1"))
    assert len(out) == 1
    assert str(second.pid) in out[0].text  # the peer did it
    assert not pending(sync_redis, queue, "asr")
    assert "reclaimed" in workers.logs()


def test_a_killed_workers_job_is_taken_over_when_its_heartbeat_stops(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """Death is seen by the heartbeat key's expiry (1.5 s), not the claim idle time (30 s
    here): the user waits about a second and a half for a dead worker, not the idle time."""
    keys = Keys(prefix)
    queue = keys.queue("asr")
    env = {"TEST_STAGE_DELAY": "2.0", "TEST_CLAIM_IDLE_MS": "30000"}
    first = workers.start("slow-asr", **env)
    publish(sync_redis, queue, turn("s1", "t1"))
    held = wait_for(lambda: pending(sync_redis, queue, "asr"), what="the job to be taken")
    assert str(first.pid) in held[0]["consumer"].decode()
    second = workers.start("slow-asr", **env)
    wait_for(lambda: len(sync_redis.keys(f"{prefix}:alive:*")) == 2, what="both alive")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    wait_for(lambda: any(str(second.pid) in p["consumer"].decode()
                         for p in pending(sync_redis, queue, "asr")),
             timeout=20, interval=0.02, what="the peer taking the job")
    assert time.monotonic() - killed_at < 10  # far sooner than the 30 s claim idle time
    out = wait_for(lambda: read_all(sync_redis, keys.out("s1")), timeout=20, what="output")
    assert len(out) == 1 and str(second.pid) in out[0].text
    assert "is gone (no heartbeat)" in workers.logs()
    # Its consumer leaves the group (and `voicebus status`) within seconds, not 600 s.
    wait_for(lambda: not any(str(first.pid) in c["name"].decode()
                             for c in sync_redis.xinfo_consumers(queue, "asr")),
             timeout=10, what="the dead consumer removed")


def test_poison_goes_to_dead_letters_and_the_worker_carries_on(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    queue = keys.queue("asr")
    proc = workers.start("slow-asr")
    valid = 0
    assert b"\xa1v\x01" in encode(turn("s1", "x"))
    bad_raw = [
        b"\xc1 not msgpack",
        encode(turn("s1", "x")).replace(b"\xa1v\x01", b"\xa1v\x09"),  # version 9
        b"\x82\xa4type\xabaudio_frame\xa1v",  # truncated mid-map
    ]
    for i in range(12):
        publish(sync_redis, queue, turn("s1", f"ok{i}"))
        valid += 1
        if i % 4 == 0 and bad_raw:
            sync_redis.xadd(queue, {FIELD: bad_raw.pop(0)})
    sync_redis.xadd(queue, {FIELD: b"\0" * (5 * 1024 * 1024)})  # oversized
    publish(sync_redis, queue, turn("s1", "poison", rule="poison"))  # the handler always raises
    sync_redis.xadd(queue, {b"unexpected": b"field"})  # no payload at all
    publish(sync_redis, queue, turn("s1", "last"))
    valid += 1

    out = wait_for(lambda: (e := read_all(sync_redis, keys.out("s1"))) and len(e) == valid and e,
                   what="every valid event")
    assert sorted(e.turn_id for e in out) == sorted([f"ok{i}" for i in range(12)] + ["last"])
    dead = wait_for(lambda: (d := dead_letters(sync_redis, keys)) and len(d) == 6 and d,
                    what="6 dead letters")
    assert all(isinstance(d, DeadLetter) and d.stream == queue and d.group == "asr"
               for d in dead)
    reasons = " | ".join(d.reason for d in dead)
    for expected in ("undecodable", "unsupported_version", "oversized",
                     "handler raised RuntimeError: this turn always fails (3 attempts)"):
        assert expected in reasons
    poisoned = next(d for d in dead if "handler raised" in d.reason)
    assert poisoned.session_id == "s1"
    wait_for(lambda: not pending(sync_redis, queue, "asr"), what="everything acked")
    assert proc.poll() is None  # still alive


def test_an_event_the_stage_does_not_handle_is_dead_lettered_with_the_reason(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    queue = keys.queue("asr")
    workers.start("slow-asr")
    stray = publish(sync_redis, queue, SessionEnded(session_id="s1", reason="gone"))
    publish(sync_redis, queue, turn("s1", "t1"))
    wait_for(lambda: read_all(sync_redis, keys.out("s1")), what="the turn after it answered")
    [dead] = wait_for(lambda: dead_letters(sync_redis, keys), what="the dead letter")
    assert dead.entry_id == stray
    assert dead.reason == ("the asr stage does not handle session_ended events "
                           "(it takes turn_ended)")
    wait_for(lambda: not pending(sync_redis, queue, "asr"), what="both acked")


def test_entry_delivered_too_often_is_dead_lettered(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """An entry whose earlier takers all died (delivery count over the limit)."""
    keys = Keys(prefix)
    queue = keys.queue("asr")
    sync_redis.xgroup_create(queue, "asr", id="0", mkstream=True)
    entry = publish(sync_redis, queue, turn("s1", "crasher"))
    sync_redis.xreadgroup("asr", "ghost", {queue: ">"})
    for _ in range(4):  # four more deliveries to consumers that "died"
        sync_redis.xclaim(queue, "asr", "ghost", 0, [entry])
    workers.start("slow-asr", TEST_MAX_DELIVERIES="5")
    dead = wait_for(lambda: dead_letters(sync_redis, keys), what="dead letter")
    assert dead[0].entry_id == entry and "delivered 6 times (limit 5)" in dead[0].reason
    assert read_all(sync_redis, keys.out("s1")) == []


def test_sigterm_finishes_in_flight_work_and_leaves_the_rest(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    queue = keys.queue("asr")
    proc = workers.start("slow-asr", TEST_STAGE_DELAY="1.0", TEST_CONCURRENCY="2")
    for i in range(6):
        publish(sync_redis, queue, turn("s1", f"t{i}"))
    wait_for(lambda: len(pending(sync_redis, queue, "asr")) == 2, what="two jobs in flight")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    done = read_all(sync_redis, keys.out("s1"))
    assert len(done) == 2  # the two in flight were finished, nothing new was started
    assert not pending(sync_redis, queue, "asr")  # ...and acked
    info = {g["name"].decode(): g for g in sync_redis.xinfo_groups(queue)}["asr"]
    assert info["consumers"] == 0  # it removed its own consumer

    workers.start("slow-asr")
    out = wait_for(lambda: (e := read_all(sync_redis, keys.out("s1"))) and len(e) == 6 and e,
                   what="the rest, by a new worker")
    assert sorted(e.turn_id for e in out) == [f"t{i}" for i in range(6)]


def test_a_draining_worker_keeps_its_leases(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM mid-job: the job outlives the claim idle time while draining, and no
    peer steals it, because leases are renewed until the very end."""
    keys = Keys(prefix)
    queue = keys.queue("asr")
    env = {"TEST_STAGE_DELAY": "2.5", "TEST_CLAIM_IDLE_MS": "500"}
    a = workers.start("slow-asr", **env)
    publish(sync_redis, queue, turn("s1", "t1"))
    wait_for(lambda: pending(sync_redis, queue, "asr"), what="taken by a")
    workers.start("slow-asr", **env)
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=10) == 0
    time.sleep(1.0)
    out = read_all(sync_redis, keys.out("s1"))
    assert len(out) == 1 and str(a.pid) in out[0].text
    assert "reclaimed" not in workers.logs()


def test_sigterm_past_the_grace_period_acks_nothing_unfinished(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    queue = keys.queue("asr")
    proc = workers.start("slow-asr", TEST_STAGE_DELAY="30", TEST_GRACE_S="0.5")
    publish(sync_redis, queue, turn("s1", "long"))
    wait_for(lambda: pending(sync_redis, queue, "asr"), what="job in flight")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert len(pending(sync_redis, queue, "asr")) == 1  # left for a peer
    assert read_all(sync_redis, keys.out("s1")) == []
    workers.start("slow-asr", TEST_CLAIM_IDLE_MS="500")
    out = wait_for(lambda: read_all(sync_redis, keys.out("s1")), what="peer finishing it")
    assert [e.turn_id for e in out] == ["long"]


def test_cancel_stops_a_streaming_handler_between_chunks(
        workers, prefix, sync_redis, redis_url) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start("chunker")
    publish(sync_redis, keys.queue("tts"), turn("s1", "t1"))
    wait_for(lambda: sync_redis.xlen(keys.out("s1")) >= 5, what="first chunks")

    cancel_turn(redis_url, keys, "s1", "t1", "barge-in")
    cancelled_at = sync_redis.xlen(keys.out("s1"))
    time.sleep(0.5)
    sent = sync_redis.xlen(keys.out("s1"))
    assert sent < 50 and sent - cancelled_at <= 2  # at most the chunk in hand
    wait_for(lambda: not pending(sync_redis, keys.queue("tts"), "tts"), what="ack")

    # A job of a turn that was cancelled before it was taken is skipped outright.
    publish(sync_redis, keys.queue("tts"), turn("s1", "t1"))
    publish(sync_redis, keys.queue("tts"), turn("s2", "t2"))
    wait_for(lambda: sync_redis.xlen(keys.out("s2")) == 50, what="the other turn")
    assert sync_redis.xlen(keys.out("s1")) == sent
    assert "skipping turn_ended of a cancelled turn" in workers.logs()


def test_a_long_call_is_abandoned_as_soon_as_its_turn_is_cancelled(
        workers, prefix, sync_redis, redis_url) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    workers.start("long-call")
    publish(sync_redis, keys.queue("llm"), turn("s1", "t1"))
    wait_for(lambda: pending(sync_redis, keys.queue("llm"), "llm"), what="call in flight")

    started = time.monotonic()
    cancel_turn(redis_url, keys, "s1", "t1", "barge-in")
    out = wait_for(lambda: read_all(sync_redis, keys.out("s1")), timeout=5, what="abandon")
    assert time.monotonic() - started < 2
    assert out[0].text == "abandoned"


@pytest.mark.bus
def test_worker_survives_a_redis_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import WorkerProcs
    from voicebus.redis_server import EmbeddedRedis

    server = EmbeddedRedis()
    server.start()
    procs = WorkerProcs(server.url, "rs", tmp_path)
    try:
        client = redis.Redis.from_url(server.url)
        keys = Keys("rs")
        proc = procs.start("slow-asr")
        publish(client, keys.queue("asr"), turn("s1", "before"))
        wait_for(lambda: client.xlen(keys.out("s1")) == 1, what="first job")

        server.stop(keep_data=True)
        time.sleep(3)  # the worker sees Redis gone for a few seconds
        server.start()
        client = redis.Redis.from_url(server.url)
        publish(client, keys.queue("asr"), turn("s1", "after"))
        out = wait_for(lambda: (e := read_all(client, keys.out("s1"))) and len(e) == 2 and e,
                       timeout=30, what="job after restart")
        assert [e.turn_id for e in out] == ["before", "after"]

        client.flushall()  # Redis lost everything: groups are recreated
        publish(client, keys.queue("asr"), turn("s1", "after-flush"))
        wait_for(lambda: read_all(client, keys.out("s1")), timeout=30, what="job after flush")
        assert proc.poll() is None
        logs = procs.logs()
        assert "Redis unreachable" in logs and "reachable again" in logs
        assert logs.count("Redis unreachable") <= 3  # logged once per outage, not per retry
    finally:
        procs.stop_all()
        server.stop()


def test_redis_down_during_a_handlers_own_call_costs_time_not_the_job(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A handler's own Redis call failing because Redis is away (an outage, a cluster
    failover) is not the handler's failure: it does not use up ``handler_attempts``
    (3, spent in ~0.3 s) and get the job dead-lettered; the job waits and is answered."""
    from tests.conftest import WorkerProcs
    from voicebus.redis_server import EmbeddedRedis

    server = EmbeddedRedis()
    server.start()
    procs = WorkerProcs(server.url, "ro", tmp_path)
    go = tmp_path / "go"
    try:
        client = redis.Redis.from_url(server.url)
        keys = Keys("ro")
        procs.start("slow-asr", TEST_GO_FILE=str(go))
        publish(client, keys.queue("asr"), turn("s1", "t1", rule="redis_on_go"))
        wait_for(lambda: pending(client, keys.queue("asr"), "asr"), what="the job taken")
        server.stop(keep_data=True)
        go.touch()  # the handler calls Redis now, and again, while it is down
        time.sleep(1.5)
        server.start()
        client = redis.Redis.from_url(server.url)
        out = wait_for(lambda: read_all(client, keys.out("s1")), timeout=30,
                       what="the answer after the outage")
        assert len(out) == 1 and isinstance(out[0], Transcript)
        assert not dead_letters(client, keys)
        assert int(client.get("ro:test:calls") or 0) == 1
        wait_for(lambda: not pending(client, keys.queue("asr"), "asr"), what="the ack")
    finally:
        procs.stop_all()
        server.stop()


def test_a_live_worker_keeps_its_long_job_and_a_frozen_one_loses_it(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """Leases: a slow but live worker is not robbed; a frozen one is, and gives up."""
    keys = Keys(prefix)
    queue = keys.queue("asr")
    env = {"TEST_STAGE_DELAY": "3.0", "TEST_CLAIM_IDLE_MS": "600"}
    a = workers.start("slow-asr", **env)
    b = workers.start("slow-asr", **env)
    publish(sync_redis, queue, turn("s1", "slow"))
    out = wait_for(lambda: read_all(sync_redis, keys.out("s1")), timeout=15, what="slow job")
    assert len(out) == 1  # 3 s of work against a 0.6 s idle time: never stolen
    assert "reclaimed" not in workers.logs()

    # The first worker to take it stays mid-job (on the test, not a timer: a freeze on a
    # busy machine may outlast any timer); the peer that takes it over answers.
    publish(sync_redis, queue, turn("s2", "frozen", rule="hold_first_delivery"))
    holder = wait_for(lambda: pending(sync_redis, queue, "asr"), what="taken")[0]
    frozen, peer = (a, b) if str(a.pid) in holder["consumer"].decode() else (b, a)
    frozen.send_signal(signal.SIGSTOP)  # alive but not running: its lease runs out
    try:
        wait_for(lambda: any(str(peer.pid) in p["consumer"].decode()
                             for p in pending(sync_redis, queue, "asr")),
                 timeout=15, what="the peer taking the job over")
    finally:
        frozen.send_signal(signal.SIGCONT)  # back mid-job: it must notice and give up
    wait_for(lambda: "lost the lease" in workers.logs(), timeout=10, what="frozen one noticing")
    out = wait_for(lambda: read_all(sync_redis, keys.out("s2")), timeout=15, what="peer")
    assert str(peer.pid) in out[0].text
    time.sleep(1.0)  # the abandoned job writes nothing, late or not
    assert len(read_all(sync_redis, keys.out("s2"))) == 1
    assert not pending(sync_redis, queue, "asr")


def test_a_frozen_worker_that_wakes_up_cannot_write_for_a_job_a_peer_took(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """Fencing: the write script checks the entry is still the writer's, so a worker
    frozen past its lease writes nothing when it wakes, whatever its lease loop does."""
    keys = Keys(prefix)
    queue = keys.queue("asr")
    env = {"TEST_CLAIM_IDLE_MS": "600"}
    a = workers.start("slow-asr", **env)
    b = workers.start("slow-asr", **env)
    publish(sync_redis, queue, turn("s3", "frozen", rule="answer_on_go"))
    holder = wait_for(lambda: pending(sync_redis, queue, "asr"), what="taken")[0]
    frozen, peer = (a, b) if str(a.pid) in holder["consumer"].decode() else (b, a)
    frozen.send_signal(signal.SIGSTOP)
    try:
        out = wait_for(lambda: read_all(sync_redis, keys.out("s3")), timeout=15,
                       what="the peer answering")
        assert str(peer.pid) in out[0].text
        wait_for(lambda: not pending(sync_redis, queue, "asr"), what="the peer's ack")
        sync_redis.set(f"{prefix}:test:go", 1)  # the frozen one will write at once
    finally:
        frozen.send_signal(signal.SIGCONT)
    wait_for(lambda: "lost" in workers.logs(), timeout=10, what="the frozen one giving up")
    time.sleep(0.5)
    out = read_all(sync_redis, keys.out("s3"))
    assert len(out) == 1 and "(late)" not in out[0].text, [e.text for e in out]
    assert not pending(sync_redis, queue, "asr")


def test_a_sharded_queue_keeps_each_sessions_jobs_on_one_shard_and_all_get_done(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """``redis.queue_shards``: a session's jobs always go to one shard, workers read
    every shard, a job on any shard is taken over from a killed worker, and a worker
    never runs more jobs at once than its concurrency however many shards it reads."""
    keys = Keys(prefix, queue_shards=3)
    sessions = [f"s{i}" for i in range(12)]
    shard_of = {s: keys.job_queue("asr", s) for s in sessions}
    # The same shard in every process and run (CRC-32, not the salted hash()): pinned.
    assert [Keys("vb", queue_shards=3).job_queue("asr", f"s{i}") for i in range(4)] == [
        "vb:q:asr:2", "vb:q:asr:1", "vb:q:asr", "vb:q:asr:1"]
    assert set(shard_of.values()) == set(keys.queues("asr"))  # 12 sessions reach all 3
    assert keys.queues("asr")[0] == keys.queue("asr")  # shard 0 keeps the unsharded name
    assert all(keys.kind(q) == "queue" for q in keys.queues("asr"))

    env = {"TEST_QUEUE_SHARDS": "3", "TEST_CONCURRENCY": "1", "TEST_STAGE_DELAY": "0.4"}
    first = workers.start("slow-asr", **env)
    started = time.monotonic()
    for s in sessions[:6]:
        publish(sync_redis, shard_of[s], turn(s, "t1"))
    wait_for(lambda: all(read_all(sync_redis, keys.out(s)) for s in sessions[:6]),
             timeout=30, what="6 jobs on 3 shards")
    # One at a time: 6 jobs x 0.4 s (three shard readers fetch, one slot handles).
    assert time.monotonic() - started >= 6 * 0.4 - 0.05
    first.send_signal(signal.SIGTERM)
    first.wait()

    # A worker killed mid-job on a shard other than 0: a peer finishes the job, once.
    session = next(s for s in sessions[6:] if shard_of[s] != keys.queue("asr"))
    queue = shard_of[session]
    slow = {**env, "TEST_STAGE_DELAY": "2.0"}
    victim = workers.start("slow-asr", **slow)
    publish(sync_redis, queue, turn(session, "t1"))
    holder = wait_for(lambda: pending(sync_redis, queue, "asr"), what="the job taken")[0]
    assert str(victim.pid) in holder["consumer"].decode()
    peer = workers.start("slow-asr", **slow)
    wait_for(lambda: any(str(peer.pid) in c["name"].decode()
                         for c in sync_redis.xinfo_consumers(queue, "asr")),
             what="the peer reading the shard")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out = wait_for(lambda: read_all(sync_redis, keys.out(session)), timeout=30,
                   what="the job done")
    assert str(peer.pid) in out[0].text
    time.sleep(0.5)  # room for a duplicate to show up, if there were one
    assert len(read_all(sync_redis, keys.out(session))) == 1
    for q in keys.queues("asr"):
        wait_for(lambda q=q: not pending(sync_redis, q, "asr"), what=f"acks on {q}")

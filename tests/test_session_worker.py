"""Session-affine consumption: per-session order with several worker processes."""

from __future__ import annotations

import signal
from collections import Counter

import redis

from schemas import AudioChunk, AudioFrame, SessionEnded, SessionStarted, encode
from tests.busutil import pending, publish, read_all
from tests.conftest import wait_for
from workers.runtime.bus import FIELD
from workers.runtime.keys import Keys


def frame(sid: str, seq: int) -> AudioFrame:
    return AudioFrame(session_id=sid, seq=seq, sample_rate=16000,
                      pcm=seq.to_bytes(4, "little") * 8)


def start_sessions(r: redis.Redis, keys: Keys, sids: list[str]) -> None:
    pipe = r.pipeline(transaction=False)
    for sid in sids:
        pipe.xadd(keys.sessions(), {FIELD: encode(SessionStarted(
            session_id=sid, user_id=f"user-{sid}", sample_rate=16000))})
    pipe.execute()


def send_frames(r: redis.Redis, keys: Keys, sids: list[str], seqs: range,
                end: bool = False) -> None:
    pipe = r.pipeline(transaction=False)
    for seq in seqs:  # interleaved across sessions, as live traffic is
        for sid in sids:
            pipe.xadd(keys.audio(sid), {FIELD: encode(frame(sid, seq))})
    if end:
        for sid in sids:
            pipe.xadd(keys.audio(sid), {FIELD: encode(SessionEnded(session_id=sid))})
    pipe.execute()


def echoed(r: redis.Redis, keys: Keys, sid: str) -> list[int]:
    out = read_all(r, keys.out(sid))
    assert all(isinstance(e, AudioChunk) for e in out)
    return [e.seq for e in out]


def owners(logs: str) -> Counter[str]:
    return Counter(line.split(": owns session")[0].split()[-1]
                   for line in logs.splitlines() if ": owns session" in line)


def test_200_sessions_through_3_workers_keep_order(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    for _ in range(3):
        workers.start("echo-session")
    sids = [f"s{i:03d}" for i in range(200)]
    start_sessions(sync_redis, keys, sids)
    send_frames(sync_redis, keys, sids, range(50), end=True)

    def all_done() -> bool:
        return all(sync_redis.xlen(keys.out(sid)) >= 50 for sid in sids)

    wait_for(all_done, timeout=120, interval=0.5, what="every session's 50 frames")
    for sid in sids:
        assert echoed(sync_redis, keys, sid) == list(range(50)), sid  # in order, once each
    # Every session ended: announcements acked, nothing pending anywhere.
    wait_for(lambda: not pending(sync_redis, keys.sessions(), "vad"), what="sessions released")
    assert all(not pending(sync_redis, keys.audio(sid), "vad") for sid in sids)
    served = owners(workers.logs())
    assert sum(served.values()) == 200 and len(served) >= 2, served


def test_owner_killed_mid_session_peer_continues_in_order_exactly_once(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    env = {"TEST_STAGE_DELAY": "0.01", "TEST_CLAIM_IDLE_MS": "1000"}
    a = workers.start("echo-session", **env)
    b = workers.start("echo-session", **env)
    sids = [f"k{i}" for i in range(6)]
    start_sessions(sync_redis, keys, sids)
    send_frames(sync_redis, keys, sids, range(60))
    # Kill whichever worker owns the first session once it is half-way through.
    wait_for(lambda: sync_redis.xlen(keys.out(sids[0])) >= 20, what="half-way")
    owner = pending(sync_redis, keys.sessions(), "vad")
    victim_name = next(p["consumer"].decode() for p in owner)
    victim = a if str(a.pid) in victim_name else b
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    send_frames(sync_redis, keys, sids, range(60, 100), end=True)

    wait_for(lambda: all(sync_redis.xlen(keys.out(s)) >= 100 for s in sids), timeout=60,
             what="all frames after the takeover")
    for sid in sids:
        assert echoed(sync_redis, keys, sid) == list(range(100)), sid
    assert "took over" in workers.logs()


def test_graceful_stop_hands_sessions_to_a_peer_at_once(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    # A long claim idle time: only the explicit hand-off can move sessions quickly.
    env = {"TEST_CLAIM_IDLE_MS": "60000"}
    first = workers.start("echo-session", **env)
    sids = [f"g{i}" for i in range(5)]
    start_sessions(sync_redis, keys, sids)
    send_frames(sync_redis, keys, sids, range(10))
    wait_for(lambda: all(sync_redis.xlen(keys.out(s)) == 10 for s in sids), what="first frames")
    workers.start("echo-session", **env)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0
    send_frames(sync_redis, keys, sids, range(10, 20), end=True)
    wait_for(lambda: all(sync_redis.xlen(keys.out(s)) == 20 for s in sids), timeout=10,
             what="frames after the hand-off")
    for sid in sids:
        assert echoed(sync_redis, keys, sid) == list(range(20))
    assert workers.logs().count("handed session") == 5


def test_bad_announcements_and_frames_are_dead_lettered(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(prefix)
    proc = workers.start("echo-session")
    sync_redis.xadd(keys.sessions(), {FIELD: b"\xc1"})
    publish(sync_redis, keys.sessions(), frame("wrong", 0))  # not an announcement
    start_sessions(sync_redis, keys, ["ok"])
    sync_redis.xadd(keys.audio("ok"), {FIELD: encode(frame("ok", 0))})
    sync_redis.xadd(keys.audio("ok"), {FIELD: b"garbage"})
    sync_redis.xadd(keys.audio("ok"), {FIELD: encode(frame("ok", 1))})
    wait_for(lambda: sync_redis.xlen(keys.out("ok")) == 2, what="valid frames")
    reasons = [d.reason for d in read_all(sync_redis, keys.dead_letter())]
    assert len(reasons) == 3
    assert any("expected session_started, got audio_frame" in r for r in reasons)
    assert proc.poll() is None


def test_a_session_handler_is_never_run_twice_on_one_event(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """A retry would feed its state the event again: the failing frame is dead-lettered
    once, and the frames after it see the state of one pass over it."""
    keys = Keys(prefix)
    workers.start("echo-session")
    start_sessions(sync_redis, keys, ["s"])
    publish(sync_redis, keys.audio("s"), frame("s", 0))
    publish(sync_redis, keys.audio("s"), AudioFrame(session_id="s", seq=1, sample_rate=16000,
                                                    pcm=b"boom"))
    publish(sync_redis, keys.audio("s"), frame("s", 2))
    out = wait_for(lambda: (e := read_all(sync_redis, keys.out("s"))) and len(e) == 2 and e,
                   what="the frames around the failing one")
    assert [(e.seq, e.turn_id) for e in out] == [(0, "echo-1"), (2, "echo-3")]
    [dead] = wait_for(lambda: read_all(sync_redis, keys.dead_letter()), what="dead letter")
    assert "this frame breaks the handler (1 attempts)" in dead.reason
    assert "handler raised" in workers.logs() and "attempt 1/" not in workers.logs()


def test_a_draining_owner_keeps_its_sessions_until_it_hands_them_back(
        workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM with a backlog that takes longer than the claim idle time to drain:
    heartbeats go on while draining, so no peer takes a session mid-way."""
    keys = Keys(prefix)
    env = {"TEST_STAGE_DELAY": "0.05", "TEST_CLAIM_IDLE_MS": "500", "TEST_GRACE_S": "10"}
    a = workers.start("echo-session", **env)
    sids = ["d1", "d2"]
    start_sessions(sync_redis, keys, sids)
    send_frames(sync_redis, keys, sids, range(40))
    wait_for(lambda: sync_redis.xlen(keys.out("d1")) >= 1, what="a first echo")
    workers.start("echo-session", **env)
    a.send_signal(signal.SIGTERM)  # ~2 s of backlog left per session
    assert a.wait(timeout=15) == 0
    send_frames(sync_redis, keys, sids, range(40, 50), end=True)
    wait_for(lambda: all(sync_redis.xlen(keys.out(s)) >= 50 for s in sids), timeout=30,
             what="everything")
    for sid in sids:
        assert echoed(sync_redis, keys, sid) == list(range(50))
    logs = workers.logs()
    assert "taken over by a peer" not in logs and "took over" not in logs
    assert logs.count("handed session") == 2


def test_sigterm_as_sessions_end_exits_promptly(workers, prefix, sync_redis) -> None:  # type: ignore[no-untyped-def]
    """Regression: a stop racing the last session's release used to hang the worker
    (a cancellation swallowed by asyncio.wait_for on Python 3.11)."""
    keys = Keys(prefix)
    for round_ in range(3):
        proc = workers.start("echo-session", TEST_STAGE_DELAY="0.005")
        sids = [f"r{round_}-{i}" for i in range(3)]
        start_sessions(sync_redis, keys, sids)
        send_frames(sync_redis, keys, sids, range(30), end=True)
        wait_for(lambda s=sids: sync_redis.xlen(keys.out(s[0])) >= 25, what="most frames")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "stopped;" in workers.logs()

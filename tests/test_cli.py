"""The voicebus command, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import redis

from schemas import TurnEnded, encode
from tests.busutil import publish
from tests.conftest import ROOT
from workers.runtime.bus import FIELD
from workers.runtime.keys import Keys


def voicebus(*args: str, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voicebus", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_lists_the_commands() -> None:
    out = voicebus("--help").stdout
    for command in ("worker", "status", "up", "demo", "redis", "config"):
        assert command in out


def test_demo_runs_the_bus_end_to_end_on_a_machine_without_redis_url(tmp_path: Path) -> None:
    """`voicebus demo --json` exactly as a user runs it: its own Redis, the local LLM,
    every worker and the gateway as processes, the sample WAVs through a device."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["VOICEBUS_GATEWAY__SECRET_FILE"] = str(tmp_path / "secret")
    samples = ROOT / "voicebus" / "samples"
    wavs = [samples / "cmu_goforward.wav", samples / "cmu_arctic_slt_a0009.wav"]
    out = tmp_path / "said"
    result = subprocess.run(
        [sys.executable, "-m", "voicebus", "demo", "--json", "--out", str(out),
         *map(str, wavs)],
        cwd=tmp_path, text=True, capture_output=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 2
    assert turns[0]["turn_id"] != turns[1]["turn_id"]
    heard = [" ".join(t["transcript"].lower().replace(",", "").replace(".", "").split())
             for t in turns]
    assert "go forward" in heard[0] and "meters" in heard[0]  # real ASR, real speech
    assert "turned sharply" in heard[1] and "table" in heard[1]
    for turn in turns:
        assert turn["answered"] and not turn["interrupted"]
        assert len(turn["reply"].split()) >= 2  # the local model answered
        with wave.open(turn["audio_path"]) as w:  # what the agent said, as heard
            assert w.getframerate() == 24000 and w.getnframes() / 24000 > 0.5
        assert turn["audio_path"].startswith(str(out))
        lat = turn["latency_ms"]
        assert {"end_of_speech_to_first_audio", "turn_detect", "asr", "llm_ttft",
                "tts_first_chunk"} <= set(lat)
        assert 0 < lat["turn_detect"] < lat["end_of_speech_to_first_audio"]  # (speed: bench/)
    # Every process started and stopped cleanly, in its own process.
    for stage in ("vad", "asr", "llm", "tts"):
        assert f"{stage}-worker" in result.stderr and "stopped;" in result.stderr
    assert "gateway listening on" in result.stderr and "gateway stopped" in result.stderr
    assert "private redis-server" in result.stderr
    assert "local LLM server ready" in result.stderr


def test_demo_refuses_a_bad_wav_before_starting(tmp_path: Path) -> None:
    import soundfile

    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF not really")
    # A 24-bit stereo WAV is read (the demo gets as far as comparing its rate).
    stereo = tmp_path / "stereo24.wav"
    soundfile.write(str(stereo), np.zeros((3200, 2)), 16000, subtype="PCM_24")
    narrow = tmp_path / "narrow.wav"
    soundfile.write(str(narrow), np.zeros(800), 8000, subtype="PCM_16")
    for paths, words in (([bad], f"{bad}: not an audio file"),
                         ([tmp_path / "missing.wav"], "missing.wav: no such file"),
                         ([stereo, narrow], "one sample rate (got [8000, 16000] Hz)")):
        result = voicebus("demo", *map(str, paths))
        assert result.returncode == 2, result.stderr
        assert words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_bad_config_value_stops_with_its_name() -> None:
    result = voicebus("config", env={"VOICEBUS_VAD__FALLBACK__SILENCE_TIMEOUT": "-1"})
    assert result.returncode == 2
    assert "vad.fallback.silence_timeout" in result.stderr
    assert "VOICEBUS_VAD__FALLBACK__SILENCE_TIMEOUT" in result.stderr
    result = voicebus("--config", "/nonexistent.yaml", "config")
    assert result.returncode == 2 and "/nonexistent.yaml" in result.stderr


def test_status_shows_streams_groups_pending_and_dead_letters(
        redis_url: str, prefix: str, sync_redis: redis.Redis) -> None:
    keys = Keys(prefix)
    queue = keys.queue("asr")
    sync_redis.xgroup_create(queue, "asr", id="0", mkstream=True)
    for i in range(90):
        publish(sync_redis, queue, TurnEnded(
            session_id="s1", turn_id=f"t{i}", sample_rate=16000, speech_start_ms=0,
            speech_end_ms=1, decided_ms=1))
    sync_redis.xreadgroup("asr", "worker-a", {queue: ">"}, count=3)
    shard = keys.queue("asr", 1)  # redis.queue_shards > 1: a row per shard, its own lag
    sync_redis.xgroup_create(shard, "asr", id="0", mkstream=True)
    for i in range(2):
        publish(sync_redis, shard, TurnEnded(
            session_id="s9", turn_id=f"t{i}", sample_rate=16000, speech_start_ms=0,
            speech_end_ms=1, decided_ms=1))
    sync_redis.xadd(keys.audio("s1"), {FIELD: b"x"})
    sync_redis.xadd(keys.audio("s2"), {FIELD: b"x"})
    sync_redis.xgroup_create(keys.sessions(), "vad", id="0", mkstream=True)
    from schemas import DeadLetter
    sync_redis.xadd(keys.dead_letter(), {FIELD: encode(DeadLetter(
        stream=queue, entry_id="1-0", group="asr", consumer="c", reason="bad bytes"))})
    env = {"REDIS_URL": redis_url, "VOICEBUS_REDIS__KEY_PREFIX": prefix,
           "VOICEBUS_REDIS__MAXLEN__QUEUE": "100"}

    text = voicebus("status", env=env).stdout
    queue_line = next(line for line in text.splitlines() if line.startswith(queue))
    assert "90" in queue_line and "90%!" in queue_line  # length, fill above the alert mark
    # Redis >= 7 tells a group's lag (entries not yet delivered); 6.2 cannot ("-").
    has_lag = int(str(sync_redis.info("server")["redis_version"]).split(".")[0]) >= 7
    lag, shard_lag = ("87", "2") if has_lag else ("-", "-")
    assert queue_line.split()[3:7] == ["asr", "1", lag, "3"]  # group, consumers, lag, pending
    shard_line = next(line for line in text.splitlines() if line.startswith(shard))
    assert shard_line.split()[3:6] == ["asr", "0", shard_lag]
    assert "(2 sessions)" in text  # per-session audio streams folded into one line
    assert "dead letters: 1" in text and "bad bytes" in text
    assert f"ALERT: above 80% of high-water mark: {queue}" in text

    data = json.loads(voicebus("status", "--json", env=env).stdout)
    stream = next(s for s in data["streams"] if s["key"] == queue)
    assert stream["alert"] and stream["length"] == 90 and stream["high_water"] == 100
    group = stream["groups"][0]
    assert group["pending"] == 3 and group["consumer_names"] == ["worker-a"]
    assert group["lag"] == (87 if has_lag else None)
    shard_group = next(s for s in data["streams"] if s["key"] == shard)["groups"][0]
    assert shard_group["lag"] == (2 if has_lag else None)
    assert group["oldest_pending_age_s"] >= 0
    assert data["dead_letters"] == 1


def test_status_without_a_bus_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = subprocess.run([sys.executable, "-m", "voicebus", "status"], cwd=ROOT, env=env,
                            text=True, capture_output=True, timeout=60)
    assert result.returncode == 2 and "REDIS_URL" in result.stderr
    result = voicebus("status", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1 and "cannot reach" in result.stderr

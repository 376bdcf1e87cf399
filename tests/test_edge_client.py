"""The edge client against a protocol peer: a real WebSocket server on a real port that
checks the token with ``edge.auth``, answers ``ready``, records the audio and reports it
receives (with their times), and plays a scripted turn. No Redis, no models: what is
tested is the device's side of ``edge.protocol`` and its real-time behaviour."""

from __future__ import annotations

import asyncio
import http
import json
import os
import socket
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import Request, Response, ServerConnection, serve

from edge import protocol
from edge.audio_io import VirtualSpeaker, read_wav
from edge.auth import TokenError, mint, verify
from edge.client import ClientError, talk_mic, talk_wavs
from tests.conftest import ROOT

SECRET = b"test-secret-0123456789abcdef"
IN_RATE, OUT_RATE = 16_000, 24_000


def tone(seconds: float, rate: int, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes()


def write_wav(path: Path, pcm: bytes, rate: int = IN_RATE) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm)
    return path


Script = Callable[["Peer", ServerConnection], Awaitable[None]]


@dataclass
class Peer:
    """The gateway's side of one session, scripted; records what the device sent."""

    script: Script
    start: dict[str, Any] = field(default_factory=dict)
    user: str = ""
    audio: bytearray = field(default_factory=bytearray)
    frames: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes so far)
    played: list[tuple[float, str, int]] = field(default_factory=list)
    sent_audio_at: dict[str, float] = field(default_factory=dict)
    flushed_at: dict[str, float] = field(default_factory=dict)
    stop_at: float | None = None
    onsets: list[float] = field(default_factory=list)  # when each WAV's audio began to arrive
    more_audio: asyncio.Event = field(default_factory=asyncio.Event)

    async def heard(self, seconds: float) -> None:
        """Wait until the device has sent ``seconds`` of audio."""
        while len(self.audio) < seconds * IN_RATE * 2:
            self.more_audio.clear()
            await self.more_audio.wait()

    async def say(self, ws: ServerConnection, turn_id: str, pcm: bytes,
                  chunk_s: float = 0.2) -> None:
        """Send a turn's audio at once (faster than real time, as the gateway does)."""
        await ws.send(protocol.dump(protocol.Audio(turn_id, OUT_RATE)))
        self.sent_audio_at[turn_id] = time.monotonic()
        step = int(chunk_s * OUT_RATE) * 2
        for offset in range(0, len(pcm), step):
            await ws.send(pcm[offset:offset + step])

    def reports(self, turn_id: str) -> list[tuple[float, int]]:
        return [(t, n) for t, tid, n in self.played if tid == turn_id]

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            self.user = verify(SECRET, token)
        except TokenError as exc:
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, f"token refused: {exc}\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        self.start = protocol.parse_device_message(await ws.recv())
        await ws.send(protocol.dump(protocol.Ready("s1", self.user, OUT_RATE, limits={})))
        script = asyncio.create_task(self.script(self, ws))
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self.audio += message
                    self.frames.append((time.monotonic(), len(self.audio)))
                    self.more_audio.set()
                    continue
                parsed = protocol.parse_device_message(message)
                if isinstance(parsed, protocol.Played):
                    self.played.append((time.monotonic(), parsed.turn_id, parsed.samples))
                elif isinstance(parsed, protocol.Stop):
                    self.stop_at = time.monotonic()
                    await ws.close(protocol.Close.NORMAL, "bye")
        finally:
            script.cancel()


async def send(ws: ServerConnection, **message: Any) -> None:
    """A message as a loose peer might write it (fields left out): the client copes."""
    await ws.send(json.dumps(message))


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[[Any], tuple[Peer, str]]]:
    """Start a peer with a script: returns (peer, url)."""
    servers = []

    async def start(script: Script) -> tuple[Peer, str]:
        peer = Peer(script)
        server = await serve(peer.handler, "127.0.0.1", 0, process_request=peer.process_request)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return peer, f"ws://127.0.0.1:{port}{protocol.PATH}"

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
        await server.wait_closed()


def token(user: str = "alice", secret: bytes = SECRET) -> str:
    return mint(secret, user, 60)


AGENT_SPEECH = tone(0.5, OUT_RATE, 300)
LATENCY = {"end_of_speech_to_first_audio": 980.0, "turn_detect": 370.0, "asr": 420.0}


async def one_answer(peer: Peer, ws: ServerConnection) -> None:
    await peer.heard(0.3)
    await send(ws, type="speech_started", turn_id="t1")
    await peer.heard(1.0)  # the whole WAV: the user stopped speaking
    await send(ws, type="transcript", turn_id="t1", text="what time is it", final=True)
    await send(ws, type="reply", turn_id="t1", seq=0, text="It is", last=False)
    await send(ws, type="reply", turn_id="t1", seq=1, text=" noon. ", last=True)
    await peer.say(ws, "t1", AGENT_SPEECH)
    await send(ws, type="turn_done", turn_id="t1", interrupted=False, trace_id="abc",
               latency_ms=LATENCY)


async def test_a_turn_is_streamed_in_real_time_played_reported_and_saved(
        gateway: Any, tmp_path: Path) -> None:
    peer, url = await gateway(one_answer)
    wav = write_wav(tmp_path / "q.wav", tone(1.0, IN_RATE))
    messages: list[dict[str, Any]] = []
    started = time.monotonic()
    turns = await talk_wavs(url, token(), [wav], out_dir=tmp_path / "out",
                            on_message=messages.append)

    assert peer.user == "alice" and peer.start == protocol.Start(IN_RATE)
    [turn] = turns
    assert turn.turn_id == "t1" and turn.transcript == "what time is it"
    assert turn.reply == "It is noon."
    assert turn.audio == AGENT_SPEECH and turn.sample_rate == OUT_RATE
    assert not turn.interrupted and turn.trace_id == "abc" and turn.latency_ms == LATENCY
    assert turn.played_samples == len(AGENT_SPEECH) // 2
    with wave.open(turn.audio_path, "rb") as f:  # out/<n>_<turn_id>.wav
        assert Path(turn.audio_path) == tmp_path / "out" / "1_t1.wav"
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (OUT_RATE, 1, 2)
        assert f.readframes(f.getnframes()) == AGENT_SPEECH
    assert [m["type"] for m in messages] == ["ready", "speech_started", "transcript", "reply",
                                             "reply", "audio", "turn_done"]

    # The WAV went out in real time, in 20 ms frames, then silence (a mic never stops).
    first = peer.frames[0][0]
    wav_done = next(t for t, total in peer.frames if total >= IN_RATE * 2)
    assert wav_done - first >= 0.9
    assert {b - a for (_, a), (_, b) in zip(peer.frames, peer.frames[1:], strict=False)} == {640}
    assert peer.audio[:IN_RATE * 2] == tone(1.0, IN_RATE)
    assert not any(peer.audio[IN_RATE * 2:])

    # `played` follows the virtual speaker's clock, ends with the whole turn, and the
    # client stops only after the answer has played and a little silence.
    reports = peer.reports("t1")
    sent = peer.sent_audio_at["t1"]
    assert len(reports) >= 2 and [n for _, n in reports] == sorted(n for _, n in reports)
    for at, samples in reports:
        assert samples <= (at - sent) * OUT_RATE + 0.03 * OUT_RATE
    end_at, end = reports[-1]
    assert end == len(AGENT_SPEECH) // 2
    assert end_at - sent >= 0.5 - 0.03
    assert peer.stop_at is not None and peer.stop_at - end_at >= 0.45
    assert time.monotonic() - started < 5


FIRST, SECOND = tone(2.0, OUT_RATE, 300), tone(0.3, OUT_RATE, 500)


async def barge_in(peer: Peer, ws: ServerConnection) -> None:
    await peer.heard(0.2)
    await send(ws, type="speech_started", turn_id="a")
    await send(ws, type="transcript", turn_id="a", text="tell me a story", final=True)
    await send(ws, type="reply", turn_id="a", seq=0, text="Once upon a time", last=True)
    await peer.say(ws, "a", FIRST)
    await asyncio.sleep(0.4)  # the user speaks over the answer
    await send(ws, type="flush", turn_id="a", reason="barge-in")
    peer.flushed_at["a"] = time.monotonic()
    await send(ws, type="turn_done", turn_id="a", interrupted=True, trace_id="x", latency_ms={})
    await send(ws, type="speech_started", turn_id="b")
    await send(ws, type="transcript", turn_id="b", text="stop", final=True)
    await send(ws, type="reply", turn_id="b", seq=0, text="Okay.", last=True)
    await peer.say(ws, "b", SECOND)
    await send(ws, type="turn_done", turn_id="b", interrupted=False, trace_id="y",
               latency_ms={"end_of_speech_to_first_audio": 500.0})


async def test_a_flush_drops_the_unplayed_audio_and_reports_what_was_heard(
        gateway: Any, tmp_path: Path) -> None:
    peer, url = await gateway(barge_in)
    wav = write_wav(tmp_path / "q.wav", tone(1.0, IN_RATE))
    speaker = VirtualSpeaker()
    first, second = await talk_wavs(url, token(), [wav], out_dir=tmp_path, speaker=speaker)

    flush_report_at, heard = peer.reports("a")[-1]  # the report sent on the flush
    assert 0.35 * OUT_RATE <= heard <= (flush_report_at - peer.sent_audio_at["a"]) * OUT_RATE
    assert first.turn_id == "a" and first.interrupted and first.played_samples == heard
    assert first.audio == FIRST[:heard * 2]  # what was heard, not what was sent
    assert Path(first.audio_path).name == "1_a.wav"
    assert second.turn_id == "b" and not second.interrupted and second.audio == SECOND
    assert second.played_samples == len(SECOND) // 2 == peer.reports("b")[-1][1]
    assert second.reply == "Okay." and second.latency_ms == {"end_of_speech_to_first_audio": 500.0}
    # Turn b played right after the flush, not after the 2 s of turn a it replaced.
    assert peer.reports("b")[-1][0] - peer.flushed_at["a"] < 1.0
    assert speaker.idle()


async def answer_each_wav(peer: Peer, ws: ServerConnection) -> None:
    """Answers the first 0.5 s tone, then the next tone once silence has ended."""
    for n, seconds in enumerate((0.5, 0.5), 1):
        onset = len(peer.audio) // 2 / IN_RATE
        while not any(peer.audio[int(onset * IN_RATE) * 2:]):  # silence until the next WAV
            onset = len(peer.audio) // 2 / IN_RATE
            peer.more_audio.clear()
            await peer.more_audio.wait()
        peer.onsets.append(time.monotonic())
        await peer.heard(onset + seconds)
        await send(ws, type="speech_started", turn_id=f"t{n}")
        await send(ws, type="reply", turn_id=f"t{n}", seq=0, text=f"answer {n}", last=True)
        await peer.say(ws, f"t{n}", tone(0.3, OUT_RATE))
        await send(ws, type="turn_done", turn_id=f"t{n}", interrupted=False, latency_ms={})


async def test_each_wav_waits_for_the_answer_to_the_one_before(
        gateway: Any, tmp_path: Path) -> None:
    peer, url = await gateway(answer_each_wav)
    wavs = [write_wav(tmp_path / f"{n}.wav", tone(0.5, IN_RATE)) for n in (1, 2)]
    turns = await talk_wavs(url, token(), wavs)
    assert [(t.turn_id, t.reply) for t in turns] == [("t1", "answer 1"), ("t2", "answer 2")]
    first_played_at = peer.reports("t1")[-1][0]
    assert peer.reports("t1")[-1][1] == 0.3 * OUT_RATE
    assert peer.onsets[1] >= first_played_at  # the second question waited for the answer


async def test_the_microphone_streams_until_stop(gateway: Any) -> None:
    class ToneMicrophone:
        """A microphone that hears a tone: frames of 20 ms, in real time."""

        sample_rate = IN_RATE

        def __init__(self) -> None:
            self.pcm, self.offset, self.opened, self.closed = tone(5.0, IN_RATE), 0, False, False

        def open(self) -> None:
            self.opened = True

        async def read(self) -> bytes:
            await asyncio.sleep(0.02)
            self.offset += 640
            return self.pcm[self.offset - 640:self.offset]

        def close(self) -> None:
            self.closed = True

    peer, url = await gateway(one_answer)
    stop = asyncio.Event()
    mic = ToneMicrophone()

    def on_message(message: dict[str, Any]) -> None:
        if message["type"] == "turn_done":
            asyncio.get_running_loop().call_later(0.6, stop.set)

    [turn] = await talk_mic(url, token(), mic, VirtualSpeaker(), stop=stop, on_message=on_message)
    assert turn.reply == "It is noon." and turn.audio == AGENT_SPEECH
    assert mic.opened and mic.closed and peer.stop_at is not None
    assert peer.audio == mic.pcm[:len(peer.audio)] and len(peer.audio) >= IN_RATE * 2


async def test_a_refused_token_is_said_plainly(gateway: Any, tmp_path: Path) -> None:
    _, url = await gateway(one_answer)
    wav = write_wav(tmp_path / "q.wav", tone(0.1, IN_RATE))
    with pytest.raises(ClientError, match="refused the token: bad signature"):
        await talk_wavs(url, token(secret=b"another-secret-0123456789"), [wav])


async def test_an_unreachable_gateway_is_said_plainly(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "q.wav", tone(0.1, IN_RATE))
    url = f"ws://127.0.0.1:{closed_port()}/v1/session"
    with pytest.raises(ClientError, match=f"cannot reach the gateway at {url}"):
        await talk_wavs(url, token(), [wav])


async def test_a_close_by_the_gateway_raises_its_code_and_reason(
        gateway: Any, tmp_path: Path) -> None:
    async def idle(peer: Peer, ws: ServerConnection) -> None:
        await peer.heard(0.2)
        await send(ws, type="speech_started", turn_id="t1")
        await send(ws, type="error", reason="idle too long")
        await ws.close(protocol.Close.IDLE, "idle too long")

    _, url = await gateway(idle)
    wav = write_wav(tmp_path / "q.wav", tone(1.0, IN_RATE))
    with pytest.raises(ClientError, match="closed the session: 4003: idle too long") as caught:
        await talk_wavs(url, token(), [wav])
    assert [t.turn_id for t in caught.value.turns] == ["t1"]  # what was seen is kept


async def test_wavs_of_different_rates_are_refused_up_front(tmp_path: Path) -> None:
    a = write_wav(tmp_path / "a.wav", tone(0.1, IN_RATE))
    b = write_wav(tmp_path / "b.wav", tone(0.1, 8000), rate=8000)
    with pytest.raises(ClientError, match=r"one sample rate \(a.wav: 16000 Hz, b.wav: 8000 Hz\)"):
        await talk_wavs("ws://127.0.0.1:1/v1/session", "t", [a, b])
    assert read_wav(b) == (8000, tone(0.1, 8000))


@pytest.mark.parametrize(("subtype", "fmt", "channels", "rate", "tolerance"), [
    ("PCM_U8", "WAV", 1, 8000, 256),  # 8-bit: one step is 256 of 16-bit
    ("PCM_24", "WAV", 1, 16000, 1),
    ("PCM_32", "WAV", 2, 44100, 1),  # stereo: channels averaged
    ("FLOAT", "WAV", 1, 48000, 1),
    ("DOUBLE", "WAV", 1, 22050, 1),
    ("PCM_16", "WAVEX", 2, 16000, 1),  # WAVE_FORMAT_EXTENSIBLE (format tag 65534)
])
def test_wavs_as_people_have_them_are_read_as_pcm16_mono(
        tmp_path: Path, subtype: str, fmt: str, channels: int, rate: int, tolerance: int) -> None:
    import soundfile

    expected = np.frombuffer(tone(0.2, rate), dtype="<i2")
    left = expected.astype(np.float64) / 32768
    # In stereo the second channel is the first at half level: the average (0.75 x)
    # shows both were read.
    data = left[:, None] if channels == 1 else np.stack([left, 0.5 * left], axis=1)
    path = tmp_path / f"in-{subtype}.wav"
    soundfile.write(str(path), data, rate, subtype=subtype, format=fmt)
    if fmt == "WAVEX":
        assert int.from_bytes(path.read_bytes()[20:22], "little") == 65534
    got_rate, pcm = read_wav(path)
    got = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    want = expected.astype(np.int32) if channels == 1 else (expected * 0.75).round()
    assert got_rate == rate and got.size == expected.size
    assert np.max(np.abs(got - want)) <= tolerance


@pytest.mark.product
def test_a_file_that_is_not_audio_is_refused_in_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    with pytest.raises(ClientError, match=r"notes.wav: not an audio file \(Format not recog"):
        read_wav(text)
    with pytest.raises(ClientError, match=r"missing\.wav: no such file"):
        read_wav(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    write_wav(empty, b"")
    with pytest.raises(ClientError, match=r"empty\.wav: no audio in it"):
        read_wav(empty)
    result = voicebus("talk", "--url", "ws://127.0.0.1:1/v1/session", "--user", "a",
                      "--wav", str(text),
                      env={"VOICEBUS_GATEWAY__SECRET": "cli-secret-0123456789abcdef"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"voicebus talk: cannot read {text}: not an audio file (Format not recognised.)"]


def test_the_virtual_speaker_plays_in_order_waits_when_dry_and_flushes() -> None:
    now = [0.0]  # times that are exact in binary: no rounding in the expected counts
    speaker = VirtualSpeaker(clock=lambda: now[0])
    speaker.open(1000)
    speaker.write("a", bytes(2 * 500))
    speaker.write("b", bytes(2 * 300))
    now[0] = 0.25
    assert (speaker.played("a"), speaker.played("b"), speaker.idle()) == (250, 0, False)
    now[0] = 0.625
    assert (speaker.played("a"), speaker.played("b")) == (500, 125)
    assert speaker.flush("b") == 125 and speaker.idle()
    speaker.write("b", bytes(2 * 50))  # a flushed turn's late audio is not played
    now[0] = 2.0
    assert speaker.played("b") == 125 and speaker.idle()
    speaker.write("c", bytes(2 * 100))  # after a dry spell the clock restarts here
    speaker.write("d", bytes(2 * 100))
    now[0] = 2.0625
    assert (speaker.played("c"), speaker.flush("d"), speaker.played("d")) == (62, 0, 0)
    now[0] = 2.25
    assert speaker.played("c") == 100 and speaker.idle()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def voicebus(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voicebus", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, **env})


@pytest.mark.product
def test_voicebus_token_mints_a_token_the_gateway_accepts() -> None:
    secret = "cli-secret-0123456789abcdef"
    result = voicebus("token", "--user", "alice", "--ttl", "120",
                      env={"VOICEBUS_GATEWAY__SECRET": secret})
    assert result.returncode == 0, result.stderr
    assert verify(secret.encode(), result.stdout.strip()) == "alice"
    with pytest.raises(TokenError, match="expired"):  # --ttl was used
        verify(secret.encode(), result.stdout.strip(), now=time.time() + 200)


@pytest.mark.product
def test_voicebus_talk_to_no_gateway_exits_2_with_one_line(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{closed_port()}/v1/session"
    result = voicebus("talk", "--url", url, "--user", "a",
                      "--wav", "voicebus/samples/cmu_goforward.wav",
                      env={"VOICEBUS_GATEWAY__SECRET": "cli-secret-0123456789abcdef"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"voicebus talk: cannot reach the gateway at {url}")


@pytest.mark.product
def test_the_client_imports_no_bus_and_no_models() -> None:
    code = ("import sys, edge.client, edge.audio_io, edge.cli_commands; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, check=True,
                                capture_output=True).stdout.split())
    assert not loaded & {"redis", "workers", "schemas", "msgspec", "pydantic", "soxr",
                         "onnxruntime", "sounddevice"}

"""``voicebus demo``: the whole product, end to end, on sample utterances.

Starts everything ``voicebus up`` starts (Redis, the local LLM server, one
process per stage, the gateway on a free port), then connects as an edge device
would (``edge.client``, a token minted for a fresh demo user) and plays the WAVs
in real time, each a user turn spoken once the previous answer has been played,
silence streamed in between. It prints per turn what the user said, what the
agent answered and how long each part took (``turn_done``'s latency breakdown,
measured by the gateway from the end of the user's speech), and saves what the
agent said as WAV files.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

from edge import audio_io
from edge.auth import load_secret, mint
from edge.client import TurnResult, talk_wavs
from edge.errors import ClientError
from workers.config import Config

SAMPLES = Path(__file__).parent / "samples"
LATENCY_ORDER = ("end_of_speech_to_first_audio", "turn_detect", "asr", "llm_ttft",
                 "llm_first_text", "tts_first_chunk")


class DemoError(RuntimeError):
    pass


def default_wavs() -> list[Path]:
    return sorted(SAMPLES.glob("*.wav"))


def read_wav(path: Path) -> tuple[bytes, int]:
    """PCM16 mono audio and its rate, or a DemoError saying what is wrong with the file
    (any WAV people have: ``edge.audio_io.read_wav``)."""
    try:
        rate, pcm = audio_io.read_wav(path)
    except ClientError as exc:
        raise DemoError(str(exc)) from None
    return pcm, rate


def answered(turn: TurnResult) -> bool:
    return bool(turn.audio) and not turn.interrupted


def user_turns(turns: list[TurnResult]) -> list[TurnResult]:
    """The turns the user took: a turn dropped because the user went on speaking (it was
    continued) is part of the turn that continues it, not a turn of its own."""
    return [turn for turn in turns if not turn.continued]


def as_json(turn: TurnResult) -> dict[str, Any]:
    return {"turn_id": turn.turn_id, "trace_id": turn.trace_id, "transcript": turn.transcript,
            "reply": turn.reply, "audio_path": turn.audio_path,
            "audio_seconds": round(len(turn.audio) / 2 / turn.sample_rate, 3),
            "interrupted": turn.interrupted, "answered": answered(turn),
            "continues": turn.continues, "latency_ms": turn.latency_ms}


def as_text(turn: TurnResult) -> str:
    lat = ", ".join(f"{k} {turn.latency_ms[k]:.0f} ms" for k in LATENCY_ORDER
                    if k in turn.latency_ms)
    status = "  (INTERRUPTED)" if turn.interrupted else "" if answered(turn) else "  (NO ANSWER)"
    seconds = len(turn.audio) / 2 / turn.sample_rate
    return (f"turn {turn.turn_id}{status}\n  user said : {turn.transcript}\n"
            f"  agent said: {turn.reply}  [{seconds:.2f} s of audio: {turn.audio_path}]\n"
            f"  latency   : {lat}")


async def run(config: Config, gateway_url: str, wavs: list[Path],
              out_dir: Path | None) -> list[TurnResult]:
    secret = load_secret(config.gateway.secret, config.gateway.secret_file)
    user = f"demo-{uuid.uuid4().hex[:8]}"  # a fresh memory for every demo run
    token = mint(secret, user, config.gateway.token_ttl_s)
    out = out_dir or Path(tempfile.mkdtemp(prefix="voicebus-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    return user_turns(await talk_wavs(gateway_url, token, wavs, out_dir=out))


def print_results(turns: list[TurnResult], json_lines: bool, expected: int) -> None:
    turns = user_turns(turns)
    for turn in turns:
        print(json.dumps(as_json(turn)) if json_lines else as_text(turn), flush=True)
    if not json_lines:
        print(f"\n{sum(answered(t) for t in turns)}/{expected} turns answered")

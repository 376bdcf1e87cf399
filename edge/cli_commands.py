"""``voicebus token`` and ``voicebus talk``: a device's side of the gateway from a shell.

Kept out of ``voicebus/cli.py`` (which imports these lazily) so that the CLI stays
small and ``talk`` pulls in only the client's light imports.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from edge import protocol
from edge.auth import load_secret, mint
from edge.errors import ClientError

if TYPE_CHECKING:
    from edge.client import TurnResult
    from workers.config import Config

# turn_done's latency_ms keys, in pipeline order, as the latency line names them.
LATENCY_LABELS = {"turn_detect": "turn detect", "asr": "asr", "llm_ttft": "llm ttft",
                  "llm_first_text": "llm first text", "tts_first_chunk": "tts first chunk"}
HEADLINE = "end_of_speech_to_first_audio"


def cmd_token(args: argparse.Namespace, config: Config) -> int:
    gateway = config.gateway
    try:
        secret = load_secret(gateway.secret, gateway.secret_file)
        token = mint(secret, args.user, args.ttl or gateway.token_ttl_s)
        print(token if args.url is None else page_link(args.url or _page_url(config), token))
    except (OSError, ValueError, ClientError) as exc:
        print(f"voicebus token: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_talk(args: argparse.Namespace, config: Config) -> int:
    from edge.client import talk_wavs

    printer = LivePrinter()
    try:
        url, token = _url(args, config), _token(args, config)
        if args.wav:
            turns = asyncio.run(talk_wavs(url, token, args.wav, out_dir=args.out,
                                          wait_for_answer=not args.no_wait, on_message=printer))
        else:
            turns = asyncio.run(_talk_mic(url, token, args.out, printer))
    except ClientError as exc:
        printer.finish()
        print(f"voicebus talk: {exc}", file=sys.stderr)
        return 2
    printer.finish()
    _print_saved(turns)
    return 0


async def _talk_mic(url: str, token: str, out_dir: Path | None,
                    printer: LivePrinter) -> list[TurnResult]:
    """The microphone until Ctrl-C (the first ends the session cleanly, a second aborts)."""
    from edge.audio_io import DeviceMicrophone, DeviceSpeaker
    from edge.client import talk_mic

    microphone, speaker = DeviceMicrophone(), DeviceSpeaker()  # no device: fail before connecting
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    printer.status = "speak; Ctrl-C to stop"
    try:
        return await talk_mic(url, token, microphone, speaker, stop=stop, out_dir=out_dir,
                              on_message=printer)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def page_link(base: str, token: str) -> str:
    """The browser page at ``base`` with the token in the fragment: browsers never send
    a fragment to a server (no token in access logs); the page removes it once read."""
    return f"{base.split('#')[0].rstrip('/')}/#token={token}"


def _url(args: argparse.Namespace, config: Config) -> str:
    if args.url:
        return str(args.url)
    return f"ws://{_gateway_address(config)}{protocol.PATH}"


def _page_url(config: Config) -> str:
    return f"http://{_gateway_address(config)}/"


def _gateway_address(config: Config) -> str:
    """``host:port`` of the configured gateway, as this machine reaches it."""
    host, port = config.gateway.host, config.gateway.port
    if port == 0:
        raise ClientError("gateway.port is 0 (any free port): give --url")
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: this machine is one of them
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def _token(args: argparse.Namespace, config: Config) -> str:
    if args.user:
        try:
            secret = load_secret(config.gateway.secret, config.gateway.secret_file)
            return mint(secret, args.user, config.gateway.token_ttl_s)
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot mint a token: {exc}") from None
    if not args.token:
        raise ClientError("give --token (from `voicebus token`), $VOICEBUS_TOKEN, or --user")
    return str(args.token)


def latency_line(message: dict[str, Any]) -> str:
    """``turn 3f2a: end of speech → first audio 980 ms (turn detect 370, asr 420, ...)``."""
    latency = {k: v for k, v in (message.get("latency_ms") or {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    head = latency.pop(HEADLINE, None)
    text = f"turn {str(message.get('turn_id', ''))[:4]}: "
    text += f"end of speech → first audio {head:.0f} ms" if head is not None else "no audio"
    order = [k for k in LATENCY_LABELS if k in latency] + \
        [k for k in latency if k not in LATENCY_LABELS]
    if order:
        parts = ", ".join(f"{LATENCY_LABELS.get(k, k.replace('_', ' '))} {latency[k]:.0f}"
                          for k in order)
        text += f" ({parts})"
    if message.get("interrupted"):
        text += " [interrupted]"
    return text


class LivePrinter:
    """Shows the conversation as it happens: "you: ...", "agent: ..." as the text arrives."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out, self.err = out, err
        self.status = ""  # shown once the gateway is ready
        self._agent_turn: str | None = None  # the turn whose "agent:" line is open

    def __call__(self, message: dict[str, Any]) -> None:
        kind, turn_id = message.get("type"), message.get("turn_id")
        if kind == "ready":
            extra = f"; {self.status}" if self.status else ""
            print(f"connected: session {message.get('session_id')} as "
                  f"{message.get('user_id')}{extra}", file=self.err, flush=True)
        elif kind == "transcript" and message.get("final", True):
            self._line(f"you: {message.get('text', '')}")
        elif kind == "reply":
            if self._agent_turn != turn_id:
                self._end_agent_line()
                self.out.write("agent:")
                self._agent_turn = str(turn_id)
            self.out.write(f" {str(message.get('text', '')).strip()}")
            self.out.flush()
        elif kind == "flush":
            self._line("  (interrupted)")
        elif kind == "turn_done":
            self._line(latency_line(message))
        elif kind == "error":
            self._end_agent_line()
            print(f"gateway error: {message.get('reason', '')}", file=self.err, flush=True)

    def finish(self) -> None:
        """End an open "agent:" line (the session is over)."""
        self._end_agent_line()
        self.out.flush()

    def _end_agent_line(self) -> None:
        if self._agent_turn is not None:
            self.out.write("\n")
            self._agent_turn = None

    def _line(self, text: str) -> None:
        self._end_agent_line()
        print(text, file=self.out, flush=True)


def _print_saved(turns: list[TurnResult]) -> None:
    for turn in turns:
        if turn.audio_path:
            print(f"saved {turn.audio_path}", file=sys.stderr)

"""The ``voicebus`` command: run workers, the whole bus, the demo; inspect a live bus."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from voicebus.local_llm import LocalLlmError
from voicebus.redis_server import RedisLaunchError
from workers import stages
from workers.config import Config
from workers.config_load import ConfigError, load_config
from workers.observability.logs import setup_logging

log = logging.getLogger("voicebus")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voicebus",
        description="A real-time voice agent: independent workers on Redis Streams.",
        epilog="Redis: REDIS_URL if set, else a private redis-server is started. "
               "Config: --config, VOICEBUS_CONFIG, ./config.yaml, or the embedded defaults; "
               "any key can be overridden as VOICEBUS_<SECTION>__<KEY>.")
    p.add_argument("--config", metavar="FILE", help="configuration file (YAML)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", help="run one worker of a stage (start as many as you like)")
    w.add_argument("stage", choices=stages.NAMES)
    w.add_argument("--standby", action="store_true",
                   help="load the models, then wait for a line on stdin before taking work "
                        "(EOF: exit); `voicebus up` keeps one per stage to replace a dead "
                        "worker at once")

    s = sub.add_parser("status", help="streams, consumer groups, pending work, dead letters")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--sessions", action="store_true", help="list per-session streams one by one")
    s.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")

    u = sub.add_parser("up", help="start Redis, the local LLM, one worker per stage and the "
                                  "gateway, until Ctrl-C")
    u.add_argument("--no-standby", action="store_true",
                   help="no loaded standby per stage: a dead worker is restarted cold "
                        "(saves a process's memory per stage; a restart takes seconds)")
    u.add_argument("--only", nargs="+", choices=stages.PROCESSES, metavar="PROCESS",
                   help="run only these (" + ", ".join(stages.PROCESSES) + "), e.g. one worker "
                        "per pod: when it dies its heartbeat goes at once, so its peers "
                        "take its work over without waiting for the heartbeat to lapse")
    sub.add_parser("gateway", help="run the WebSocket gateway edge devices connect to")
    sub.add_parser("llm-server", help="run the local LLM server (llama.cpp) in the foreground, "
                                      "for LLM workers on this or other machines")

    t = sub.add_parser("trace", help="a turn's waterfall from the local span file")
    t.add_argument("turn", nargs="?", metavar="TURN_ID", help="a turn id or trace id")
    t.add_argument("--last", type=int, default=1, metavar="N", help="the last N turns")
    t.add_argument("--file", metavar="PATH", help="span file (default: tracing.local_path)")

    d = sub.add_parser("demo", help="run the bus and play sample utterances through it")
    d.add_argument("wavs", nargs="*", type=Path, metavar="WAV",
                   help="16-bit mono WAV files (default: the shipped samples)")
    d.add_argument("--json", action="store_true", help="one JSON object per turn on stdout")
    d.add_argument("--out", type=Path, metavar="DIR",
                   help="save what the agent said here (default: a new temporary directory)")

    t = sub.add_parser("token", help="mint a device token for the gateway (shared secret)")
    t.add_argument("--user", required=True, metavar="ID", help="the user the token names")
    t.add_argument("--ttl", type=float, metavar="SECONDS",
                   help="lifetime (default: gateway.token_ttl_s)")
    t.add_argument("--url", nargs="?", const="", metavar="BASE",
                   help="print a link that opens the browser page with the token, at BASE "
                        "(default: http://gateway.host:gateway.port/; behind a TLS proxy, "
                        "its https address)")

    k = sub.add_parser("talk", help="talk to the gateway: microphone and speaker, or WAV files")
    k.add_argument("--url", help="ws://HOST:PORT/v1/session (default: gateway.host/port)")
    who = k.add_mutually_exclusive_group()
    who.add_argument("--token", default=os.environ.get("VOICEBUS_TOKEN"),
                     help="a token from `voicebus token` (default: $VOICEBUS_TOKEN)")
    who.add_argument("--user", metavar="ID",
                     help="mint a token for ID from the local secret (on the gateway's machine)")
    k.add_argument("--wav", nargs="+", type=Path, metavar="FILE",
                   help="play these 16-bit WAVs instead of the microphone, one turn each")
    k.add_argument("--no-wait", action="store_true",
                   help="with --wav: stream the files back to back, not waiting for answers")
    k.add_argument("--out", type=Path, metavar="DIR", help="save each answer as a WAV in DIR")

    sub.add_parser("redis", help="run a private redis-server and print its URL, until Ctrl-C")
    sub.add_parser("config", help="print the effective configuration")
    pr = sub.add_parser("probe", help="Kubernetes readiness/liveness: exit 0 when this host's "
                                      "STAGE worker is in its group (ready) or not stuck (live)")
    pr.add_argument("mode", choices=["ready", "live"])
    pr.add_argument("stage", choices=[*stages.NAMES, "gateway"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"voicebus: {exc}", file=sys.stderr)
        return 2
    component = f"{args.stage}-worker" if args.command == "worker" else args.command
    setup_logging(config.log.level, config.log.format, component=component)
    missing = _missing_server_packages() if args.command not in DEVICE_COMMANDS else []
    if missing:
        print(f"voicebus {args.command}: this install has only the edge client (missing: "
              f"{', '.join(missing)}); run the bus with pip install 'voicebus[server]'",
              file=sys.stderr)
        return 2
    if args.command in ("worker", "gateway"):
        from workers.observability.metrics import setup_metrics
        from workers.observability.telemetry import setup_tracing

        component = args.stage if args.command == "worker" else "gateway"
        setup_tracing(config, component)
        setup_metrics(config, component)
    try:
        return COMMANDS[args.command](args, config)
    except (RedisLaunchError, LocalLlmError) as exc:
        print(f"voicebus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# What a device-only install (no "server" extra) can run.
DEVICE_COMMANDS = frozenset({"token", "talk", "config", "trace"})
SERVER_PACKAGES = ("redis", "msgspec", "onnxruntime", "faster_whisper", "openai", "piper")


def _missing_server_packages() -> list[str]:
    import importlib.util

    return [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from voicebus.redis_server import redis_url
    from workers.stages import build_worker

    with redis_url(config.redis.url) as url:
        if not config.redis.url:
            log.warning("no REDIS_URL: started a private redis-server at %s; "
                        "other workers can join with REDIS_URL=%s", url, url)
        with contextlib.ExitStack() as stack:
            if args.stage == "llm":
                from voicebus.local_llm import llm_endpoint

                endpoint = stack.enter_context(llm_endpoint(config.llm))
                config = config.model_copy(update={
                    "llm": config.llm.model_copy(update={"base_url": endpoint})})
            worker = build_worker(args.stage, config, url)
            if args.standby and not _promoted(args.stage):
                return 0
            try:
                asyncio.run(worker.run(install_signals=True))
            except asyncio.CancelledError:  # a second Ctrl-C: stopped without waiting
                return 130
    return 0


def _promoted(stage: str) -> bool:
    """A standby waits, models loaded, until its supervisor says go (a line on stdin);
    True when it did, False when stdin closed (the supervisor stopped or died)."""
    log.info("%s: standby ready (models loaded); waiting to be promoted", stage)
    return bool(sys.stdin.readline())


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from redis.exceptions import RedisError

    from voicebus.status import collect, render
    from workers.runtime.connection import connect
    from workers.runtime.keys import Keys

    if not config.redis.url:
        print("voicebus status: set REDIS_URL to the bus to inspect", file=sys.stderr)
        return 2

    async def once() -> str:
        client = connect(config.redis.url or "")
        try:
            report = await collect(client, Keys.of(config.redis),
                                   config.redis.maxlen.model_dump())
        finally:
            await client.aclose()
        if args.json:
            return json.dumps(report.to_dict())
        return render(report, per_session=args.sessions)

    while True:
        try:
            text = asyncio.run(once())
        except (OSError, RedisError) as exc:
            print(f"voicebus status: cannot reach {config.redis.url}: {exc}", file=sys.stderr)
            return 1
        if args.watch:
            print("\033[2J\033[H", end="")
        print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_up(args: argparse.Namespace, config: Config) -> int:
    from voicebus.supervisor import Supervisor

    supervisor = Supervisor(config.redis.url, config_path=args.config, llm=config.llm,
                            standby=not args.no_standby, stages=args.only or stages.PROCESSES)
    supervisor.start()
    if supervisor.gateway_url:
        page = supervisor.gateway_url.replace("ws://", "http://", 1).rsplit("/v1/", 1)[0] + "/"
        print(f"voicebus is up: REDIS_URL={supervisor.url}  devices: {supervisor.gateway_url} "
              f"(voicebus token --user ID; voicebus talk)  browser: {page} (voicebus token "
              "--user ID --url)  Ctrl-C to stop", file=sys.stderr)
    else:
        print(f"voicebus is up: {', '.join(supervisor.stages)} on REDIS_URL={supervisor.url}",
              file=sys.stderr)
    try:
        supervisor.wait()
    finally:
        supervisor.stop()
    return 0


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from edge.errors import ClientError
    from voicebus.demo import DemoError, answered, default_wavs, print_results, read_wav, run
    from voicebus.supervisor import running

    wavs = args.wavs or default_wavs()
    try:
        rates = {read_wav(wav)[1] for wav in wavs}  # refuse bad files before starting anything
        if len(rates) > 1:
            raise DemoError(f"the WAVs must share one sample rate (got {sorted(rates)} Hz): "
                            "a device streams at one rate")
    except DemoError as exc:
        print(f"voicebus demo: {exc}", file=sys.stderr)
        return 2
    # The demo's gateway takes any free port: a `voicebus up` may hold the configured one.
    with running(config.redis.url, config_path=args.config, llm=config.llm,
                 env={"VOICEBUS_GATEWAY__PORT": "0"}) as bus:
        try:
            turns = asyncio.run(run(config, bus.gateway_url, wavs, args.out))
        except ClientError as exc:
            print(f"voicebus demo: {exc}", file=sys.stderr)
            print_results(exc.turns, args.json, len(wavs))
            return 1
    print_results(turns, args.json, len(wavs))
    return 0 if len(turns) == len(wavs) and all(answered(t) for t in turns) else 1


def cmd_redis(args: argparse.Namespace, config: Config) -> int:
    from voicebus.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        print(f"REDIS_URL={server.url}", flush=True)
        from voicebus.supervisor import Supervisor

        Supervisor(server.url, stages=()).wait()
    return 0


def cmd_config(args: argparse.Namespace, config: Config) -> int:
    print(config.dump_yaml(), end="")
    return 0


def cmd_gateway(args: argparse.Namespace, config: Config) -> int:
    from edge.gateway import run
    from voicebus.redis_server import redis_url

    with redis_url(config.redis.url) as url:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(config, url))
    return 0


def cmd_token(args: argparse.Namespace, config: Config) -> int:
    from edge.cli_commands import cmd_token

    return cmd_token(args, config)


def cmd_talk(args: argparse.Namespace, config: Config) -> int:
    from edge.cli_commands import cmd_talk

    return cmd_talk(args, config)


def cmd_trace(args: argparse.Namespace, config: Config) -> int:
    from voicebus.traces import read_spans, render, select

    path = args.file or config.tracing.local_path
    chosen = select(read_spans(path), args.turn, max(1, args.last))
    if not chosen:
        print(f"voicebus trace: no {'turn ' + args.turn if args.turn else 'turns'} in {path} "
              "(spans are written there when tracing.otlp_endpoint is unset)", file=sys.stderr)
        return 1
    print("\n\n".join(render(spans) for spans in chosen))
    return 0


def cmd_llm_server(args: argparse.Namespace, config: Config) -> int:
    from voicebus.local_llm import LocalLlmServer
    from voicebus.supervisor import Supervisor

    with LocalLlmServer(config.llm) as server:
        print(f"VOICEBUS_LLM__BASE_URL={server.url}", flush=True)
        Supervisor(None, stages=()).wait()  # until Ctrl-C / SIGTERM
    return 0


def cmd_probe(args: argparse.Namespace, config: Config) -> int:
    from voicebus.probe import probe

    return probe(args.mode, args.stage, config)


COMMANDS = {"llm-server": cmd_llm_server, "trace": cmd_trace, "gateway": cmd_gateway,
            "worker": cmd_worker, "status": cmd_status, "up": cmd_up, "demo": cmd_demo,
            "redis": cmd_redis, "config": cmd_config, "token": cmd_token, "talk": cmd_talk,
            "probe": cmd_probe}

#!/usr/bin/env python
"""One long conversation through the whole product, measured turn by turn as a user lives it.

    python -m bench.conversation [--turns 40] [--seed 7] [--set KEY=VALUE ...]
                                 [--out bench/results/conversation.json]

Starts what ``voicebus demo`` starts (``Supervisor``: embedded Redis, the local LLM
server, one process per stage, the gateway) with the repo's defaults (``--set
llm.temperature=0`` style overrides go to every process as ``VOICEBUS_*``), then one
device session, one user, plays ``--turns`` real recordings from the turn-taking
corpus (``bench/speech_corpus.py``: Asterisk prompts without the held-out families,
pocketsphinx recordings, joined utterances with real pauses, short answers) in real
time, each spoken once the previous answer has been played (``edge.client.talk_wavs``).
Memory grows over the whole session, as in real use.

Per turn: end of speech -> first audio and each stage (the gateway's ``turn_done``
breakdown), and from the turn's LLM span (``tracing.local_path``): the prompt's
estimated tokens and how many of them extend the previous prompt (what llama.cpp's
prefix cache can skip), time to first token and decoding speed. Summary: p50/p95 of
all turns, of turns 1-10 and of the last 10; CPU seconds per process per turn.
Writes the JSON (and the spans, the supervisor's log beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import proc_cpu_s
from bench.speech_corpus import Turn, export, load_corpus
from edge.auth import mint
from edge.client import TurnResult, talk_wavs
from edge.errors import ClientError
from voicebus.traces import read_spans
from workers.config_load import load_config
from workers.observability import semconv
from workers.observability.metrics import percentile

ROOT = Path(__file__).resolve().parent.parent

E2E = "end_of_speech_to_first_audio"
STAGES = ("turn_detect", "turn_commit", "asr", "llm_ttft", "llm_first_text", "tts_first_chunk")
# Of a conversation: mostly things a caller says, some multi-part, some short answers.
MIX = {"single": 0.6, "joined": 0.2, "short": 0.2}
MAX_TURN_S = 9.0  # longer recordings are rare in conversation; they only slow the run
ANSWER_TIMEOUT_S = 90.0


def pick(turns: list[Turn], n: int, seed: int) -> list[Turn]:
    """``n`` corpus turns in the ``MIX`` proportions, in a random but fixed order."""
    rng = np.random.default_rng(seed)
    chosen: list[Turn] = []
    for kind, share in MIX.items():
        pool = [t for t in turns if t.type == kind and t.audio.size / 16000 <= MAX_TURN_S]
        take = min(len(pool), round(n * share) if kind != "single" else n)
        chosen += [pool[i] for i in rng.choice(len(pool), size=take, replace=False)]
    singles = [t for t in chosen if t.type == "single"]
    others = [t for t in chosen if t.type != "single"]
    chosen = others + singles[: max(0, n - len(others))]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def llm_spans(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The LLM stage's span attributes by trace id (one trace per turn), in the order
    they ended: a turn the user continued has one request per fragment, the answer last."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not path.is_file():
        return out
    for span in read_spans(path):
        if semconv.LLM_TTFT_MS in span.attributes or semconv.LLM_PROMPT_TOKENS in span.attributes:
            out.setdefault(span.trace_id, []).append(span.attributes)
    return out


def row(i: int, turn: Turn, result: TurnResult,
        requests: list[dict[str, Any]]) -> dict[str, Any]:
    lat = result.latency_ms
    # The answer is the last request; earlier ones were replies prepared for a fragment
    # (a tentative or preemptive end) that the user went on from: what preemption costs.
    llm = requests[-1] if requests else {}
    wasted = requests[:-1]
    prompt = llm.get(semconv.LLM_PROMPT_TOKENS)
    reused = llm.get(semconv.LLM_PROMPT_REUSED_TOKENS)
    return {
        "turn": i + 1, "corpus_id": turn.id, "type": turn.type, "said": turn.text,
        "transcript": result.transcript, "reply": result.reply,
        "answered": bool(result.audio) and not result.interrupted,
        "e2e_ms": lat.get(E2E), **{f"{k}_ms": lat.get(k) for k in STAGES},
        "prompt_tokens": prompt, "prompt_reused_tokens": reused,
        # The prompt extends the previous one: the server had to evaluate only the rest.
        "prefix_kept": None if prompt is None or reused is None else reused > 0.5 * prompt,
        "new_prompt_tokens": None if prompt is None or reused is None else prompt - reused,
        "tokens_per_s": llm.get(semconv.LLM_TOKENS_PER_S),
        "output_tokens": llm.get(semconv.GEN_AI_OUTPUT_TOKENS),
        "dropped_requests": len(wasted),
        "dropped_output_tokens": sum(r.get(semconv.GEN_AI_OUTPUT_TOKENS) or 0 for r in wasted),
        "dropped_prompt_tokens": sum((r.get(semconv.LLM_PROMPT_TOKENS) or 0)
                                     - (r.get(semconv.LLM_PROMPT_REUSED_TOKENS) or 0)
                                     for r in wasted),
    }


def stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "p50": None, "p95": None}
    return {"n": len(values), "p50": round(percentile(values, 0.5)),
            "p95": round(percentile(values, 0.95)), "max": round(max(values))}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups = {"all": rows, "first_10": rows[:10], "last_10": rows[-10:]}
    out: dict[str, Any] = {}
    for name, group in groups.items():
        out[name] = {key: stats([r[key] for r in group]) for key in
                     ("e2e_ms", *(f"{k}_ms" for k in STAGES), "prompt_tokens",
                      "new_prompt_tokens", "tokens_per_s")}
        kept = [r["prefix_kept"] for r in group if r["prefix_kept"] is not None]
        out[name]["prefix_kept"] = f"{sum(kept)}/{len(kept)}"
        turns = max(1, len(group))
        out[name]["dropped_requests_per_turn"] = round(
            sum(r["dropped_requests"] for r in group) / turns, 2)
        out[name]["dropped_output_tokens_per_turn"] = round(
            sum(r["dropped_output_tokens"] for r in group) / turns, 1)
    first, last = out["first_10"]["e2e_ms"]["p50"], out["last_10"]["e2e_ms"]["p50"]
    out["last_vs_first_p50"] = round(last / first, 2) if first and last else None
    return out


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)

    head = ("turn", "type", "e2e", "detect", "commit", "asr", "ttft", "text1", "tts1",
            "prompt", "new", "tok/s")
    print(" ".join(f"{h:>7}" for h in head))
    for r in rows:
        cells = (r["turn"], r["type"], r["e2e_ms"], r["turn_detect_ms"], r["turn_commit_ms"],
                 r["asr_ms"], r["llm_ttft_ms"], r["llm_first_text_ms"], r["tts_first_chunk_ms"],
                 r["prompt_tokens"], r["new_prompt_tokens"], r["tokens_per_s"])
        print(" ".join(f"{f(c):>7}" for c in cells))
    print()
    print(f"{'ms, p50 / p95':<22}" + "".join(f"{g:>16}" for g in ("all", "first 10", "last 10")))
    for key in ("e2e_ms", *(f"{k}_ms" for k in STAGES), "new_prompt_tokens", "tokens_per_s"):
        groups = [summary[g][key] for g in ("all", "first_10", "last_10")]
        print(f"{key:<22}" + "".join(f"{f(c['p50']) + ' / ' + f(c['p95']):>16}" for c in groups))
    print(f"{'prefix kept':<22}" + "".join(f"{summary[g]['prefix_kept']:>16}"
                                          for g in ("all", "first_10", "last_10")))
    for key in ("dropped_requests_per_turn", "dropped_output_tokens_per_turn"):
        print(f"{key:<22}" + "".join(f"{summary[g][key]:>16}"
                                      for g in ("all", "first_10", "last_10")))
    print(f"\nlast 10 / first 10 e2e p50: {summary['last_vs_first_p50']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every process, e.g. llm.temperature=0")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/conversation.json")
    args = parser.parse_args()
    if args.turns < 1:
        parser.error("--turns must be >= 1")

    corpus, manifest = load_corpus()
    turns = pick(corpus, args.turns, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    spans_path = args.out.with_suffix(".spans.jsonl")
    spans_path.unlink(missing_ok=True)
    secret = secrets.token_urlsafe(24)[:32]
    env = {"VOICEBUS_GATEWAY__PORT": "0", "VOICEBUS_GATEWAY__SECRET": secret,
           "VOICEBUS_TRACING__LOCAL_PATH": str(spans_path)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: need KEY=VALUE")
        env["VOICEBUS_" + key.upper().replace(".", "__")] = value
    config = load_config(env={**os.environ, **env})

    from voicebus.supervisor import Supervisor

    wav_dir = Path(tempfile.mkdtemp(prefix="voicebus-conversation-"))
    wavs = export(turns, wav_dir)
    log_path = args.out.with_suffix(".supervisor.log")
    print(f"{len(turns)} turns; starting the product (log: {log_path}) ...", flush=True)
    error = ""
    with open(log_path, "w") as log_stream:
        supervisor = Supervisor(None, llm=config.llm, env=env, log_stream=log_stream)
        supervisor.start()
        try:
            pids = supervisor.pids()
            cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
            started = time.monotonic()
            token = mint(secret.encode(), f"bench-{secrets.token_hex(4)}", 3600)
            try:
                results = asyncio.run(talk_wavs(supervisor.gateway_url, token, wavs,
                                                answer_timeout_s=ANSWER_TIMEOUT_S))
            except ClientError as exc:
                results, error = exc.turns, str(exc)
            wall = time.monotonic() - started
            cpu: dict[str, float | None] = {}
            for name, pid in pids.items():
                now, before = proc_cpu_s(pid), cpu0[name]
                cpu[name] = None if now is None or before is None else round(now - before, 1)
        finally:
            supervisor.stop()

    taken = [r for r in results if not r.continued]  # a continued fragment is not a turn
    llm = llm_spans(spans_path)
    rows = [row(i, turn, result, llm.get(result.trace_id, []))
            for i, (turn, result) in enumerate(zip(turns, taken, strict=False))]
    args.out.with_suffix(".rows.json").write_text(json.dumps(rows, indent=1))  # come what may
    summary = summarize(rows)
    report = {
        "benchmark": "conversation", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform()},
        "params": {"turns": args.turns, "seed": args.seed, "set": args.set,
                   "corpus": manifest.get("fingerprint")},
        "config": {"asr": config.asr.model, "llm": config.llm.model, "n_ctx":
                   config.llm.local.n_ctx, "prompt_budget": config.prompt_budget(),
                   "trim_block": config.context_window.trim_block,
                   "chunking": config.llm.chunking, "tts": config.tts.backend},
        "error": error, "wall_s": round(wall, 1), "turns_answered":
            f"{sum(r['answered'] for r in rows)}/{len(turns)}",
        "continued_fragments": len(results) - len(taken),
        "cpu_s_per_turn": {k: None if v is None else round(v / max(1, len(rows)), 2)
                           for k, v in cpu.items()},
        "summary": summary, "turns": rows,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print_table(rows, summary)
    print(f"CPU s per turn: {report['cpu_s_per_turn']}")
    print(f"answered {report['turns_answered']}, {report['continued_fragments']} continued "
          f"fragments; {report['wall_s']} s; wrote {args.out}")
    if error:
        print(f"ERROR: {error}")
    return 0 if not error else 1


if __name__ == "__main__":
    raise SystemExit(main())

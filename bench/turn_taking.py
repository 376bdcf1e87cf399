#!/usr/bin/env python
"""Turn taking on real recordings: false cuts at inner pauses, missed ends, decision delay.

    python -m bench.turn_taking [--limit N] [--configs baseline,default]
                                [--set [NAME:]vad.x.y=VALUE ...] [--types single,joined]
                                [--out bench/results/turn_taking.json]

Every turn of the labelled corpus (``bench/speech_corpus.py``, built on first use) is
fed, followed by its own quiet, to a fresh ``workers.vad.turn_detection.TurnDetector``
window by window (512 samples at 16 kHz), as ``workers/vad_worker.py`` does, with the
real models: Silero, Smart Turn (``SmartTurnModel.probability`` on each
``NeedsTurnCheck``) and the ASR (``load_recognizer(Config().asr)`` on each speculative
``TurnEnd``, the transcript handed to ``judged(p, text)`` when the detector takes it).
Decisions are in audio time, so they do not depend on this machine's speed; the wall
time the VAD would wait for the models at a decision is measured and reported beside.

Configurations: ``default`` is ``workers.config.Config()`` (the repo's defaults);
``baseline`` is the old behaviour (text signal, per-user adaptation and continuation
off, where those keys exist); ``--set NAME:vad.x.y=VALUE`` defines or changes a named
variant, ``--set vad.x.y=VALUE`` changes every configuration.

Transcripts are cached by the audio's hash (with the time the first transcription
took) in ``~/.cache/voicebus/bench-corpus/asr-harness.json``: re-runs and the second
configuration only run Silero and Smart Turn.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.speech_corpus import CACHE, PAUSE_BINS, Pause, Turn, load_corpus
from workers.config import Config
from workers.vad import turn_detection as td

ROOT = Path(__file__).resolve().parent.parent

RATE = 16_000
WINDOW = 512
MISSED_AFTER_S = 3.0  # no TurnEnd this long after the true end: a missed end
MIN_TRAILING_S = 2.5
CUT_TOLERANCE_S = 0.1  # a decision this soon after a pause's labelled end still cut it
LENGTH_BINS = ((0.0, 0.3), *PAUSE_BINS, (1.5, 99.0))
BUILTIN = ("default", "baseline")
SESSION_SEED = 7
# The decision -> the reply's first audio: bench/conversation.py on this 2-core box gave
# p10 0.9 s, p50 1.24 s (2026-12-04); the faster end is taken, so the count errs high.
REPLY_READY_S = 0.9
EARLY_TURNS = 10  # a session's first turns, before much is learned of the user
TARGET_SPAN = (0.3, 1.5)  # the inner pauses issue 10's target counts
TARGET_KEY = "span:0.3-1.5s"
BUSY_LOAD, IDLE_LOAD = 1.0, 0.8  # 1-minute load averages (a 2-core box)


# -- configurations ---------------------------------------------------------------------
def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise SystemExit(f"--set {dotted}: {p!r} is not a section")
        node = node[p]
    if parts[-1] not in node:
        raise SystemExit(f"--set {dotted}: unknown key {parts[-1]!r}")
    node[parts[-1]] = value


def baseline_overrides() -> dict[str, Any]:
    """The old behaviour, as far as this code has the keys for it."""
    vad = Config().vad
    out: dict[str, Any] = {}
    if hasattr(vad, "endpointing") and hasattr(vad.endpointing, "text"):
        out["vad.endpointing.text"] = False
    if hasattr(vad, "adaptive") and hasattr(vad.adaptive, "enabled"):
        out["vad.adaptive.enabled"] = False
    if hasattr(vad, "continuation") and hasattr(vad.continuation, "enabled"):
        out["vad.continuation.enabled"] = False
    return out


def build_configs(names: list[str], sets: list[str]) -> dict[str, tuple[Config, dict[str, Any]]]:
    """name -> (Config, the overrides it was made with)."""
    common: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = defaultdict(dict)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(raw)
        if ":" in key:
            name, _, key = key.partition(":")
            named[name][key.strip()] = value
        else:
            common[key.strip()] = value
    unknown = [n for n in names if n not in BUILTIN and n not in named]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}: built in are {list(BUILTIN)}; "
                         "define others with --set NAME:vad.x.y=VALUE")
    out = {}
    for name in names:
        overrides = {**(baseline_overrides() if name == "baseline" else {}), **common,
                     **named.get(name, {})}
        data = Config().model_dump()
        for k, v in overrides.items():
            _set(data, k, v)
        out[name] = (Config.model_validate(data), overrides)
    return out


# -- models -----------------------------------------------------------------------------
class Transcripts:
    """The real recognizer, its transcripts cached by the audio's hash (with the time the
    transcription took when it ran)."""

    def __init__(self, retime: bool = False) -> None:
        from workers.backends.asr import load_recognizer

        cfg = Config().asr
        self.key = f"{cfg.model}/{cfg.compute_type}/beam{cfg.beam_size}/{cfg.language}"
        self.recognizer = load_recognizer(cfg)
        self.path = CACHE / "asr-harness.json"
        self.cache: dict[str, Any] = {}
        if self.path.is_file():
            self.cache = json.loads(self.path.read_text())
        self.fresh = self.cached = 0
        self.retime = retime  # transcribe (and time) again what the cache holds
        self.recognizer.transcribe(np.zeros(RATE, np.int16).tobytes(), RATE)  # warm-up

    def __call__(self, audio: np.ndarray) -> tuple[str, float, bool]:
        """(text, ms the transcription took, came from the cache)."""
        from workers.backends.audio import float_to_pcm16

        pcm = float_to_pcm16(audio)
        key = f"{self.key}:{hashlib.sha1(pcm).hexdigest()}"
        hit = None if self.retime else self.cache.get(key)
        if hit is not None and hit.get("load", 0) > BUSY_LOAD and os.getloadavg()[0] < IDLE_LOAD:
            hit = None  # timed on a busy machine and this one is idle now: time it again
        if hit is not None:
            self.cached += 1
            return str(hit["text"]), float(hit["ms"]), True
        started = time.perf_counter()
        text = self.recognizer.transcribe(pcm, RATE).text
        ms = (time.perf_counter() - started) * 1000
        self.cache[key] = {"text": text, "ms": round(ms, 1),
                           "load": round(os.getloadavg()[0], 2)}
        self.fresh += 1
        if self.fresh % 25 == 0:
            self.save()
        return text, ms, False

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.path)


@dataclass
class Models:
    silero: Any
    smart_turn: dict[tuple[str | None, int], Any]
    asr: Transcripts
    # (model, audio hash) -> (P, ms): a configuration that asks about the same audio as
    # another one did gets the same answer and the time measured then
    judged: dict[tuple[str | None, int, str], tuple[float, float]] = field(default_factory=dict)

    def probability(self, cfg: Config, audio: np.ndarray) -> tuple[float, float]:
        st = cfg.vad.smart_turn
        key = (st.model_path, st.threads, hashlib.sha1(audio.tobytes()).hexdigest())
        if key not in self.judged:
            model = self.smart(cfg)
            started = time.perf_counter()
            p = float(model.probability(audio))
            self.judged[key] = (p, (time.perf_counter() - started) * 1000)
        return self.judged[key]

    def smart(self, cfg: Config) -> Any:
        from workers.backends.smart_turn import SmartTurnModel

        st = cfg.vad.smart_turn
        key = (st.model_path, st.threads)
        if key not in self.smart_turn:
            model = SmartTurnModel(st.model_path, "cpu", st.threads)
            model.probability(np.zeros(RATE * 2, np.float32))  # warm-up
            self.smart_turn[key] = model
        return self.smart_turn[key]


class LearnedPauses:
    """``workers.vad.pauses.PauseProfile`` without Redis: one user, for the turns of one
    session (``--session-turns``; 1: a new user every turn)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.vad.adaptive
        self.timeout_s = cfg.vad.fallback.silence_timeout
        self.average: float | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def allowance_s(self) -> float:
        from workers.vad.pauses import allowance

        return allowance(self.cfg, self.average)

    def learn(self, pause_s: float) -> float:
        x = min(pause_s, self.timeout_s * self.cfg.max_stretch)
        self.average = x if self.average is None else \
            self.average + self.cfg.adjustment_rate * (x - self.average)
        return self.allowance_s


# -- one turn ---------------------------------------------------------------------------
def api_mode(detector: Any) -> str:
    """How this detector takes the transcript: ``texted`` (``texted(speech_end, text)``
    whenever it comes; ends may be tentative, then committed), ``judged_text``
    (``judged(p, text)``) or ``none`` (``judged(p)``: no text signal)."""
    if hasattr(detector, "texted"):
        return "texted"
    try:
        if len(inspect.signature(detector.judged).parameters) >= 2:
            return "judged_text"
    except (TypeError, ValueError):
        pass
    return "none"


@dataclass
class Run:
    """What happened in one turn under one configuration."""
    turn: Turn
    decisions: list[dict[str, Any]] = field(default_factory=list)  # non-speculative TurnEnds
    checks: list[dict[str, Any]] = field(default_factory=list)  # NeedsTurnCheck + its guess
    continued: int = 0
    blips: int = 0
    allowance_s: float = 0.0  # the user's learned pause allowance at the end of the turn
    position: int = 0  # the turn's place in its session (0: first)


def run_turn(turn: Turn, cfg: Config, models: Models, asr_delay_s: float | None = None,
             pauses: LearnedPauses | None = None, position: int = 0) -> Run:
    """Feed one turn and its trailing quiet to a fresh detector, as vad_worker does;
    ``pauses``: what was learned of this user so far (their session's earlier turns)."""
    vad = cfg.vad
    detector = td.TurnDetector(vad, models.silero.stream())
    mode = api_mode(detector)
    use_text = bool(getattr(detector, "use_text", False))
    text_wait = getattr(getattr(vad, "endpointing", None), "text_wait", None)
    continuation = getattr(getattr(vad, "continuation", None), "enabled", True)
    smart = models.smart(cfg) if vad.type != "silero" else None
    pauses = pauses or LearnedPauses(cfg)
    if hasattr(detector, "pause_allowance"):
        detector.pause_allowance = int(pauses.allowance_s * RATE)
    resumed_cls = getattr(td, "Resumed", None)
    commit_cls = getattr(td, "Commit", None)
    run = Run(turn, position=position)
    # continue: the last end came before the true end (the speaker goes on);
    # pending: a transcript on its way to texted() (audio sample it arrives at, guess)
    state: dict[str, Any] = {"continue": False, "pending": None, "guess": None}
    total_s = max(turn.audio.size / RATE + MIN_TRAILING_S,
                  turn.speech_end_s + MISSED_AFTER_S + 0.6)
    audio = np.concatenate([turn.audio, turn.trailing(total_s - turn.audio.size / RATE)])

    def deliver_due() -> None:
        pending = state["pending"]
        if pending is not None and detector.pos >= pending[0]:
            state["pending"] = None
            _at, speech_end, text = pending
            handle(detector.texted(speech_end, text))

    def handle(actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, td.SpeechStart):
                if state["continue"] and continuation and hasattr(detector, "continue_turn") \
                        and getattr(detector, "continuable", True):
                    run.continued += 1
                    state["continue"] = False
                    handle(detector.continue_turn())
                state["continue"] = False
            elif isinstance(a, td.TurnEnd) and a.speculative:
                hyp, ms, cached = models.asr(a.audio)
                state["guess"] = {"text": hyp, "asr_ms": round(ms, 1), "cached": cached,
                                  "speech_end_s": a.speech_end / RATE}
                if mode == "texted" and use_text:  # as vad_worker: one guess awaited
                    delay_s = ms / 1000 if asr_delay_s is None else asr_delay_s
                    if text_wait is not None and delay_s > text_wait:
                        state["pending"] = (a.decided + int(text_wait * RATE), a.speech_end,
                                            None)
                        state["guess"]["late"] = True
                    else:
                        state["pending"] = (a.decided + int(delay_s * RATE), a.speech_end,
                                            hyp)
            elif isinstance(a, td.NeedsTurnCheck):
                if smart is None:
                    continue
                p, st_ms = models.probability(cfg, a.audio)
                guess, state["guess"] = state["guess"], None
                text: str | None = guess["text"] if guess else None
                late = bool(guess and guess.get("late"))
                if mode == "judged_text" and use_text and guess and text_wait is not None \
                        and guess["asr_ms"] > text_wait * 1000:
                    late, text = True, None  # vad_worker decides without it (text_wait)
                run.checks.append({
                    "at_s": round(detector.pos / RATE, 3), "p": round(p, 4),
                    "st_ms": round(st_ms, 1), "text": guess["text"] if guess else None,
                    "asr_ms": guess["asr_ms"] if guess else None,
                    "asr_cached": guess["cached"] if guess else None,
                    "text_used": bool(use_text and mode != "none" and guess and not late),
                    "text_late": late})
                if mode == "judged_text":
                    handle(getattr(detector, "judged")(p, text))  # noqa: B009 - older API
                else:
                    handle(detector.judged(p))
                    if mode == "texted":
                        deliver_due()
            elif isinstance(a, td.TurnEnd):
                decided = a.decided / RATE
                tentative = bool(getattr(a, "tentative", False))
                check = len(run.checks) - 1 if run.checks and \
                    run.checks[-1]["at_s"] >= a.speech_end / RATE else None
                run.decisions.append({
                    "decided_s": round(decided, 3), "speech_end_s": round(a.speech_end / RATE, 3),
                    "start_s": round(a.start / RATE, 3), "rule": a.rule, "tentative": tentative,
                    "probability": None if a.probability is None else round(a.probability, 4),
                    "verdict": getattr(a, "text_verdict", ""),
                    "text": run.checks[check]["text"] if check is not None else None,
                    "check": check, "in_pause": _pause_at(turn.pauses, decided),
                    "before_end": decided < turn.speech_end_s,
                    "committed_s": None if tentative else round(decided, 3),
                    "commit_rule": None if tentative else "", "commit_verdict": None,
                    "allowance_s": round(getattr(detector, "pause_allowance", 0) / RATE, 3)})
                if decided < turn.speech_end_s:
                    state["continue"] = True
            elif commit_cls is not None and isinstance(a, commit_cls):
                open_ = [d for d in run.decisions if d["tentative"] and d["committed_s"] is None]
                if open_:
                    open_[-1]["committed_s"] = round(a.decided / RATE, 3)
                    open_[-1]["commit_rule"] = a.rule
                    open_[-1]["commit_verdict"] = a.text_verdict
            elif resumed_cls is not None and isinstance(a, resumed_cls):
                if pauses.enabled:
                    detector.pause_allowance = int(pauses.learn(a.pause / RATE) * RATE)
            elif isinstance(a, td.Blip):
                run.blips += 1

    for i in range(0, audio.size - WINDOW + 1, WINDOW):
        if mode == "texted":
            deliver_due()  # vad_worker looks for the transcript before each frame
        handle(detector.push(audio[i:i + WINDOW]))
    run.allowance_s = getattr(detector, "pause_allowance", 0) / RATE
    return run


def _pause_at(pauses: list[Pause], t: float | None) -> int | None:
    if t is None:
        return None
    for k, p in enumerate(pauses):
        if p.start_s <= t <= p.end_s + CUT_TOLERANCE_S:
            return k
    return None


# -- metrics ----------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": _r(pct(values, 50)), "p90": _r(pct(values, 90)),
            "p95": _r(pct(values, 95)), "max": _r(max(values) if values else None),
            "mean": _r(statistics.fmean(values) if values else None)}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def length_bin(length: float) -> str:
    for lo, hi in LENGTH_BINS:
        if lo <= length < hi:
            return f"{lo:g}-{hi:g}s" if hi < 99 else f">{lo:g}s"
    return "?"


def ratio(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None}


def end_decision(run: Run) -> dict[str, Any] | None:
    """The first end decided at or after the true end, if committed within
    MISSED_AFTER_S of it (a tentative end counts once committed)."""
    for d in run.decisions:
        if d["decided_s"] >= run.turn.speech_end_s:
            c = d["committed_s"]
            if c is not None and c - run.turn.speech_end_s <= MISSED_AFTER_S:
                return d
            return None
    return None


def wall_wait_ms(run: Run, d: dict[str, Any], text_wait_s: float | None,
                 mode: str) -> tuple[float, float]:
    """How long the VAD would wait on the models beyond the decision's audio time: with
    Smart Turn alone, and with Smart Turn and the speculative transcript when the
    decision used it (``judged(p, text)``: the worker awaits both, ASR capped at
    text_wait). With ``texted`` the transcript's time is already in the audio time (it
    reaches the detector that much audio later), so both numbers are the same."""
    if d["check"] is None:
        return 0.0, 0.0
    c = run.checks[d["check"]]
    lead_ms = (d["committed_s"] - c["at_s"]) * 1000  # audio that passed after the check
    st = c["st_ms"]
    both = st
    if mode == "judged_text" and c["text_used"] and c["asr_ms"] is not None:
        asr = c["asr_ms"] if text_wait_s is None else min(c["asr_ms"], text_wait_s * 1000)
        both = max(st, asr)
    return max(0.0, st - lead_ms), max(0.0, both - lead_ms)


def metrics(runs: list[Run], cfg: Config, mode: str,
            reply_ready_s: float = REPLY_READY_S) -> dict[str, Any]:
    text_wait = getattr(getattr(cfg.vad, "endpointing", None), "text_wait", None)
    heard_after = cfg.vad.continuation.heard_after
    pauses_by: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key -> [cut, n]
    # A cut the user notices: the reply's first audio (at the commit, once it is ready)
    # plays heard_after before they go on; a later start still continues the turn.
    heard_by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    ended_in: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # any end, tentative too
    turns_cut: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    missed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    delays: dict[str, list[float]] = defaultdict(list)
    tentative_delays: list[float] = []
    started: list[float] = []  # the turn's end decided, tentative or not: the pipeline starts
    walls_st: dict[str, list[float]] = defaultdict(list)
    walls_all: dict[str, list[float]] = defaultdict(list)
    end_rules: Counter[str] = Counter()
    commit_rules: Counter[str] = Counter()
    cut_rules: Counter[str] = Counter()
    unlabelled = tentative_continued = 0
    st_ms, asr_fresh, asr_all = [], [], []
    late = checks = text_used = continued = 0
    for run in runs:
        t = run.turn
        cut_pauses: set[int] = set()
        heard_pauses: set[int] = set()
        any_pauses: set[int] = set()
        premature = False
        for d in run.decisions:
            if not d["before_end"]:
                continue
            committed = d["committed_s"] is not None
            if d["in_pause"] is not None:
                any_pauses.add(d["in_pause"])
            if committed:
                premature = True
                if d["in_pause"] is not None:
                    cut_pauses.add(d["in_pause"])
                    audible = max(d["committed_s"], d["decided_s"] + reply_ready_s)
                    if audible + heard_after <= t.pauses[d["in_pause"]].end_s:
                        heard_pauses.add(d["in_pause"])
                    cut_rules[d["rule"] + (f"+{d['commit_rule']}" if d["tentative"] else "")] += 1
                else:
                    unlabelled += 1
            else:
                tentative_continued += 1
        early = "early" if run.position < EARLY_TURNS else "later"
        for k, p in enumerate(t.pauses):
            keys = ["all", f"kind:{p.kind}", f"len:{length_bin(p.length_s)}",
                    f"type:{t.type}", f"kind_len:{p.kind}:{length_bin(p.length_s)}"]
            if TARGET_SPAN[0] <= p.length_s <= TARGET_SPAN[1]:  # the 0.3-1.5 s
                keys += [TARGET_KEY, f"{TARGET_KEY}:{early}"]
            for key in keys:
                pauses_by[key][0] += int(k in cut_pauses)
                pauses_by[key][1] += 1
                heard_by[key][0] += int(k in heard_pauses)
                heard_by[key][1] += 1
                ended_in[key][0] += int(k in any_pauses)
                ended_in[key][1] += 1
        for key in ("all", f"type:{t.type}"):
            turns_cut[key][0] += int(premature)
            turns_cut[key][1] += 1
        end = end_decision(run)
        for key in ("all", f"type:{t.type}"):
            missed[key][0] += int(end is None)
            missed[key][1] += 1
        if end is not None:
            delay = (end["committed_s"] - t.speech_end_s) * 1000
            w_st, w_all = wall_wait_ms(run, end, text_wait, mode)
            end_rules[end["rule"]] += 1
            started.append((end["decided_s"] - t.speech_end_s) * 1000)
            if end["tentative"]:
                commit_rules[str(end["commit_rule"])] += 1
                tentative_delays.append((end["decided_s"] - t.speech_end_s) * 1000)
            for key in ("all", f"rule:{end['rule']}", f"type:{t.type}"):
                delays[key].append(delay)
                walls_st[key].append(delay + w_st)
                walls_all[key].append(delay + w_all)
        for c in run.checks:
            checks += 1
            st_ms.append(c["st_ms"])
            if c["asr_ms"] is not None:
                asr_all.append(c["asr_ms"])
                if not c["asr_cached"]:
                    asr_fresh.append(c["asr_ms"])
            late += int(c["text_late"])
            text_used += int(c["text_used"])
        continued += run.continued
    return {
        "api": mode,
        "false_cuts": {k: ratio(*v) for k, v in sorted(pauses_by.items())},
        "false_cuts_heard": {k: ratio(*v) for k, v in sorted(heard_by.items())},
        "ends_in_pauses_incl_tentative": {k: ratio(*v) for k, v in sorted(ended_in.items())},
        "false_cut_rules": dict(cut_rules),
        "premature_outside_labelled_pauses": unlabelled,
        "tentative_ends_continued": tentative_continued,
        "turns_with_false_cut": {k: ratio(*v) for k, v in sorted(turns_cut.items())},
        "missed_ends": {k: ratio(*v) for k, v in sorted(missed.items())},
        "end_rules": dict(end_rules), "commit_rules": dict(commit_rules),
        "delay_ms": {k: dist(v) for k, v in sorted(delays.items())},
        "tentative_delay_ms": dist(tentative_delays),
        "started_delay_ms": dist(started),
        # Replies prepared for an end the user went on from (tentative, never committed).
        "dropped_preparations_per_turn": round(tentative_continued / max(1, len(runs)), 2),
        "wall_delay_smart_turn_ms": {k: dist(v) for k, v in sorted(walls_st.items())},
        "wall_delay_smart_turn_asr_ms": {k: dist(v) for k, v in sorted(walls_all.items())},
        "smart_turn_ms": dist(st_ms), "asr_ms": dist(asr_all), "asr_ms_measured_now":
            dist(asr_fresh), "checks": checks, "checks_with_text": text_used,
        "text_late": late, "continued": continued,
    }


# -- report -----------------------------------------------------------------------------
def _fmt_ratio(r: dict[str, Any] | None) -> str:
    if not r or not r["n"]:
        return "-"
    return f"{100 * r['rate']:.1f}% ({r['k']}/{r['n']})"


def _fmt_dist(d: dict[str, Any] | None) -> str:
    if not d or not d["n"]:
        return "-"
    return f"{d['p50']:.0f}/{d['p90']:.0f}/{d['p95']:.0f} n={d['n']}"


def table(results: dict[str, dict[str, Any]], kinds: list[str], types: list[str]) -> str:
    names = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Any) -> None:
        rows.append((label, [get(results[n]) for n in names]))

    def section(title: str) -> None:
        rows.append((title, [""] * len(names)))

    section("false cuts: inner pauses cut (committed) / pauses")
    row("  all", lambda m: _fmt_ratio(m["false_cuts"].get("all")))
    row("  0.3-1.5 s (issue 10's target)", lambda m: _fmt_ratio(m["false_cuts"].get(TARGET_KEY)))
    row(f"  ... turns 1-{EARLY_TURNS} of a session",
        lambda m: _fmt_ratio(m["false_cuts"].get(f"{TARGET_KEY}:early")))
    row(f"  ... turns {EARLY_TURNS + 1}+",
        lambda m: _fmt_ratio(m["false_cuts"].get(f"{TARGET_KEY}:later")))
    row("  0.3-1.5 s, reply heard first",
        lambda m: _fmt_ratio(m["false_cuts_heard"].get(TARGET_KEY)))
    for k in kinds:
        row(f"  kind {k}", lambda m, k=k: _fmt_ratio(m["false_cuts"].get(f"kind:{k}")))
    for lo, hi in LENGTH_BINS:
        b = length_bin((lo + min(hi, 9)) / 2)
        row(f"  length {b}", lambda m, b=b: _fmt_ratio(m["false_cuts"].get(f"len:{b}")))
    for k in kinds:
        if k == "natural":
            continue
        for lo, hi in PAUSE_BINS:
            b = length_bin((lo + hi) / 2)
            row(f"  {k} {b}",
                lambda m, k=k, b=b: _fmt_ratio(m["false_cuts"].get(f"kind_len:{k}:{b}")))
    row("  rules that cut", lambda m: ", ".join(f"{r} {n}" for r, n in
                                                 sorted(m["false_cut_rules"].items())) or "-")
    row("  early, outside labels", lambda m: str(m["premature_outside_labelled_pauses"]))
    row("  any end in pause (+tentative)",
        lambda m: _fmt_ratio(m["ends_in_pauses_incl_tentative"].get("all")))
    row("  tentative ends continued", lambda m: str(m["tentative_ends_continued"]))
    row("  ... per turn (replies dropped)", lambda m: str(m["dropped_preparations_per_turn"]))
    section("turns with >= 1 false cut / turns")
    row("  all", lambda m: _fmt_ratio(m["turns_with_false_cut"].get("all")))
    for t in types:
        row(f"  {t}", lambda m, t=t: _fmt_ratio(m["turns_with_false_cut"].get(f"type:{t}")))
    section(f"missed ends (no end <= {MISSED_AFTER_S:g} s)")
    row("  all", lambda m: _fmt_ratio(m["missed_ends"].get("all")))
    for t in types:
        row(f"  {t}", lambda m, t=t: _fmt_ratio(m["missed_ends"].get(f"type:{t}")))
    section("delay after the true end (audio: when committed), ms p50/p90/p95")
    row("  audio, all", lambda m: _fmt_dist(m["delay_ms"].get("all")))
    rules = sorted({k for m in results.values() for k in m["delay_ms"] if k.startswith("rule:")})
    for r in rules:
        row(f"  audio, {r[5:]}", lambda m, r=r: _fmt_dist(m["delay_ms"].get(r)))
    for t in types:
        row(f"  audio, {t}", lambda m, t=t: _fmt_dist(m["delay_ms"].get(f"type:{t}")))
    row("  tentative end (before commit)", lambda m: _fmt_dist(m["tentative_delay_ms"]))
    row("  pipeline starts (any end)", lambda m: _fmt_dist(m.get("started_delay_ms")))
    row("  wall est. + Smart Turn", lambda m: _fmt_dist(m["wall_delay_smart_turn_ms"].get("all")))
    row("  wall est. + ST & ASR", lambda m: _fmt_dist(m["wall_delay_smart_turn_asr_ms"]
                                                      .get("all")))
    section("compute, ms p50/p90/p95")
    row("  Smart Turn per check", lambda m: _fmt_dist(m["smart_turn_ms"]))
    row("  ASR per guess", lambda m: _fmt_dist(m["asr_ms"]))
    row("  ASR measured this run", lambda m: _fmt_dist(m["asr_ms_measured_now"]))
    row("  checks / with text / late", lambda m: f"{m['checks']} / {m['checks_with_text']} / "
                                                 f"{m['text_late']}")
    row("  continued after a cut", lambda m: str(m["continued"]))
    row("  end rules", lambda m: ", ".join(f"{r} {n}" for r, n in sorted(m["end_rules"].items())))
    row("  commit rules", lambda m: ", ".join(f"{r} {n}" for r, n in
                                              sorted(m["commit_rules"].items())) or "-")
    row("  detector API", lambda m: m["api"])
    width = max(len(lbl) for lbl, _ in rows) + 2
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) + 2 for i, n in enumerate(names)]
    out = [" " * width + "".join(n.ljust(c) for n, c in zip(names, cols, strict=True))]
    for lbl, vals in rows:
        out.append(lbl.ljust(width) + "".join(v.ljust(c) for v, c in zip(vals, cols, strict=True)))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="only the first N turns of each type "
                        "(in corpus order)")
    parser.add_argument("--configs", default="baseline,default",
                        help="comma-separated: default, baseline, or names given in --set")
    parser.add_argument("--set", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                        help="override a config key (vad.smart_turn.threshold=0.6) in NAME "
                             "(a new variant if not built in) or, without NAME, everywhere")
    parser.add_argument("--types", help="only these turn types (single,stretched,joined,short)")
    parser.add_argument("--asr-delay", type=float, metavar="S",
                        help="with a detector that takes the transcript whenever it comes "
                             "(texted): it arrives S s of audio after its guess, instead of "
                             "as long as the transcription took here")
    parser.add_argument("--retime", action="store_true",
                        help="transcribe every guess again (the cache keeps the time the "
                             "first transcription took; use on an idle machine)")
    parser.add_argument("--session-turns", type=int, default=40, metavar="K",
                        help="turns per user (a seeded shuffle of the corpus dealt into "
                             "sessions of K turns; what is learned of a user's pauses "
                             "carries over between their turns); 1: a new user every turn")
    parser.add_argument("--reply-ready", type=float, default=REPLY_READY_S, metavar="S",
                        help="seconds from the (tentative) end to the reply's first audio, "
                             "for the 'reply heard before the user went on' rows")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/turn_taking.json")
    args = parser.parse_args()
    if args.session_turns < 1:
        parser.error("--session-turns must be at least 1")

    started = time.perf_counter()
    configs = build_configs([n.strip() for n in args.configs.split(",") if n.strip()],
                            args.set)
    turns, manifest = load_corpus()
    if args.types:
        wanted = set(args.types.split(","))
        turns = [t for t in turns if t.type in wanted]
    if args.limit:
        per: Counter[str] = Counter()
        kept = []
        for t in turns:
            if per[t.type] < args.limit:
                per[t.type] += 1
                kept.append(t)
        turns = kept
    from workers.backends.silero import SileroModel

    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        print(f"warning: load average {load:.2f} before the start: other work on this "
              "machine slows the ASR and Smart Turn timings (the decisions are in audio "
              "time, but with a texted detector the transcript's arrival is not)")
    models = Models(SileroModel(), {}, Transcripts(retime=args.retime))
    print(f"{len(turns)} turns ({dict(Counter(t.type for t in turns))}), configs "
          f"{list(configs)}; corpus {manifest['fingerprint'][:16]}; "
          f"{args.session_turns} turn(s) per user")
    for name, (_cfg, ov) in configs.items():
        print(f"  {name}: {ov or 'the defaults'}")
    runs: dict[str, list[Run]] = {n: [] for n in configs}
    per_config_s: dict[str, float] = defaultdict(float)
    if args.session_turns > 1:  # sessions of one user each, in a seeded order
        random.Random(SESSION_SEED).shuffle(turns)
    learned: dict[str, LearnedPauses] = {}
    for i, turn in enumerate(turns):
        position = i % args.session_turns
        for name, (cfg, _ov) in configs.items():  # interleaved: a busy spell hits all alike
            if position == 0:
                learned[name] = LearnedPauses(cfg)  # a new user
            t0 = time.perf_counter()
            runs[name].append(run_turn(turn, cfg, models, args.asr_delay, learned[name],
                                       position))
            per_config_s[name] += time.perf_counter() - t0
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(turns)} turns, {time.perf_counter() - started:.0f} s "
                  f"(ASR {models.asr.fresh} run, {models.asr.cached} cached)", flush=True)
    models.asr.save()
    probe = td.TurnDetector(Config().vad, models.silero.stream())
    mode = api_mode(probe)
    results = {n: metrics(rs, configs[n][0], mode, args.reply_ready) for n, rs in runs.items()}
    kinds = sorted({p.kind for t in turns for p in t.pauses})
    types = [t for t in ("single", "stretched", "joined", "short")
             if any(x.type == t for x in turns)]
    wall = time.perf_counter() - started
    print()
    print(table(results, kinds, types))
    print(f"\n{len(turns)} turns x {len(configs)} configs in {wall:.0f} s "
          f"({', '.join(f'{n} {s:.0f} s' for n, s in per_config_s.items())}); "
          f"ASR: {models.asr.fresh} transcribed, {models.asr.cached} from the cache")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "corpus": {k: manifest[k] for k in ("version", "seed", "fingerprint", "counts",
                                            "sources")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)},
        "wall_s": round(wall, 1), "limit": args.limit, "asr_delay_s": args.asr_delay,
        "session_turns": args.session_turns, "session_seed": SESSION_SEED,
        "reply_ready_s": args.reply_ready,
        "detector_api": mode,
        "configs": {n: {"overrides": ov, "vad": cfg.vad.model_dump(mode="json")}
                    for n, (cfg, ov) in configs.items()},
        "metrics": results,
        "turns": [{
            "id": t.id, "type": t.type, "text": t.text, "true_end_s": t.speech_end_s,
            "pauses": [{"start_s": p.start_s, "end_s": p.end_s, "kind": p.kind,
                        "text_before": p.text_before} for p in t.pauses],
            "runs": {n: {"decisions": runs[n][i].decisions, "checks": runs[n][i].checks,
                         "continued": runs[n][i].continued,
                         "allowance_s": runs[n][i].allowance_s,
                         "session_position": runs[n][i].position}
                     for n in configs}}
            for i, t in enumerate(turns)],
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Are word-mode joins heard as one reply? The played audio transcribed back, and its gaps.

    python -m bench.chunk_joins [--runs 3] [--out bench/results/chunk_joins.json]

Word mode (``llm.chunking: word``, the default) sends the reply's first 3-5 words to
TTS on their own, so audio starts sooner; the voice then speaks the rest of that
sentence as a separate utterance. Two risks at that join: words garbled or lost, and
a hitch (a pause where the sentence has none, a change of intonation). For replies
of the kinds an assistant gives (short answers, lists, numbers, questions back,
several sentences), each chunked as the LLM worker chunks it and synthesised chunk by
chunk through the TTS stage's own path (``TtsStage.speak``: Piper, resampled to the
device rate, as the device plays it, back to back):

* **words**: tiny.en transcribes the whole played reply; word error rate against the
  reply text, per mode. Piper's VITS samples noise, so every rendition differs:
  ``--runs`` renditions per reply and mode, interleaved.
* **the first join's gap**, where the first chunk stops mid-sentence: silence (10 ms
  frames under -40 dBFS) from the last voiced frame of the first chunk to the first
  voiced frame of the second (the stage keeps ``JOIN_TAIL_S`` of the first's); beside it
  the gap between two sentences in sentence mode, the pause the voice itself makes
  where a sentence ends.

Prints a table; writes the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.transcripts import wer
from workers.backends.asr import FasterWhisperRecognizer
from workers.backends.audio import pcm16_to_float, voiced_end
from workers.backends.model_files import resolve_model
from workers.backends.tts import load_backend
from workers.config import TtsConfig
from workers.observability.metrics import percentile
from workers.text.chunking import chunks, ends_sentence
from workers.tts_worker import ChunkMetrics, TtsStage

ROOT = Path(__file__).resolve().parent.parent

RATE = 24_000  # the TTS stage's default output rate (what the device plays)
SILENT_DB = -40.0

# What an assistant says: written for this bench, not taken from any test set.
REPLIES = [
    "Sure, I can help you with that. What time would you like the appointment?",
    "The capital of Australia is Canberra, not Sydney as many people think.",
    "Your order number is four five seven two, and it should arrive on Thursday.",
    "I'm sorry, I didn't catch that. Could you say it again?",
    "Paris is lovely in May. The weather is mild and the gardens are in bloom.",
    "To reset your password, open the settings page and choose security.",
    "Yes.",
    "Here are three ideas: a walk in the park, a museum visit, or a picnic by the river.",
    "The meeting has been moved to half past two on Wednesday afternoon.",
    "That depends on the traffic, but it usually takes about twenty minutes by car.",
    "Green tea has less caffeine than coffee, and many people find it calming.",
    "Of course. I have set a reminder for seven in the morning.",
    "The train to Boston leaves at nine fifteen from platform four.",
    "I think the answer is forty two, but let me explain why.",
    "You can pay by card or by bank transfer. Which would you prefer?",
    "Lisbon is warmest from June to September, with highs around twenty eight degrees.",
]


def trailing_silence_s(audio: np.ndarray) -> float:
    return (audio.size - voiced_end(audio, RATE, SILENT_DB)) / RATE


def leading_silence_s(audio: np.ndarray) -> float:
    return trailing_silence_s(audio[::-1])


def speak(stage: TtsStage, text: str) -> np.ndarray:
    async def run() -> bytes:
        parts = [pcm async for pcm, _ in stage.speak(text, asyncio.Event(), ChunkMetrics(0))]
        return b"".join(parts)

    return pcm16_to_float(asyncio.run(run()))


def render(stage: TtsStage, reply: str, mode: str) -> tuple[list[str], list[np.ndarray]]:
    """The reply chunked as the LLM worker does (one token per word), each chunk spoken."""
    tokens = [w + " " for w in reply.split()]
    said = chunks(tokens, mode)  # type: ignore[arg-type]
    return said, [speak(stage, c) for c in said]


def first_join_gap(said: list[str], audio: list[np.ndarray]) -> float | None:
    """Silence where the first chunk stops mid-sentence and the next goes on."""
    if len(audio) < 2 or ends_sentence(said[0]):
        return None
    return trailing_silence_s(audio[0]) + leading_silence_s(audio[1])


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 0.5), 3),
            "p95": round(percentile(values, 0.95), 3), "max": round(max(values), 3),
            "mean": round(float(np.mean(values)), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="renditions per reply and mode")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chunk_joins.json")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")

    stage = TtsStage(load_backend(TtsConfig()), sample_rate=RATE)
    tiny = FasterWhisperRecognizer(resolve_model("tiny.en").path, device="cpu",
                                   compute_type="int8", cpu_threads=2)
    per_reply: list[dict[str, Any]] = []
    wers: dict[str, list[float]] = {"sentence": [], "word": []}
    join_gaps: list[float] = []
    between_sentences: list[float] = []
    started = time.perf_counter()
    for reply in REPLIES:
        row: dict[str, Any] = {"reply": reply}
        for _run in range(args.runs):
            for mode in ("sentence", "word"):
                said, audio = render(stage, reply, mode)
                heard = tiny.transcribe(np.concatenate(audio), RATE).text
                error = wer(reply, heard)
                wers[mode].append(error)
                entry = row.setdefault(mode, {"chunks": said, "heard": [], "wer": []})
                entry["heard"].append(heard)
                entry["wer"].append(round(error, 3))
                if mode == "word" and (gap := first_join_gap(said, audio)) is not None:
                    join_gaps.append(gap)
                    entry.setdefault("first_join_gap_s", []).append(round(gap, 3))
                if mode == "sentence":
                    between_sentences += [trailing_silence_s(a) + leading_silence_s(b)
                                          for a, b in itertools.pairwise(audio)]
        per_reply.append(row)
        print(f"  {reply[:60]!r}: word-mode WER {row['word']['wer']}, "
              f"sentence-mode WER {row['sentence']['wer']}", flush=True)

    result = {
        "machine": platform.processor() or platform.machine(),
        "runs": args.runs, "replies": len(REPLIES),
        "seconds": round(time.perf_counter() - started, 1),
        "wer": {mode: summary(v) for mode, v in wers.items()},
        "replies_with_a_word_lost_or_changed": {
            mode: sum(1 for r in per_reply if max(r[mode]["wer"]) > 0)
            for mode in ("sentence", "word")},
        "first_join_gap_s": summary(join_gaps),
        "between_sentences_gap_s": summary(between_sentences),
        "per_reply": per_reply,
    }
    print()
    print(f"{'':44} {'sentence mode':>14} {'word mode':>10}")
    print(f"{'word error rate, mean over renditions':44} "
          f"{result['wer']['sentence']['mean']:>14.3f} {result['wer']['word']['mean']:>10.3f}")
    lost = result["replies_with_a_word_lost_or_changed"]
    print(f"{'replies with a word heard wrong (any run)':44} "
          f"{lost['sentence']:>11}/{len(REPLIES)} {lost['word']:>7}/{len(REPLIES)}")
    js, bs = result["first_join_gap_s"], result["between_sentences_gap_s"]
    print(f"{'gap at the first join, p50 / p95 s':44} {'-':>14} "
          f"{js.get('p50', 0):>5.2f}/{js.get('p95', 0):.2f}")
    print(f"{'gap between sentences, p50 / p95 s':44} "
          f"{bs.get('p50', 0):>8.2f}/{bs.get('p95', 0):.2f} {'-':>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

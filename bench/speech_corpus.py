#!/usr/bin/env python
"""Real human recordings, labelled for turn taking (``bench/turn_taking.py``).

    python -m bench.speech_corpus [--rebuild] [--export DIR] [--list]

Builds (once) and caches under ``~/.cache/voicebus/bench-corpus/`` (or
``$VOICEBUS_BENCH_CORPUS``) a few hundred *turns*: one 16 kHz mono utterance each, with
the true end of its speech, the inner pauses where the speaker goes on, and the
reference text. A second run, and ``load_corpus()``, only read the cache.

Sources, fetched by package name (nothing is copied by hand):

* Debian ``asterisk-core-sounds-en-g722``: Allison Smith's Asterisk prompts (G.722,
  decoded to 16 kHz by the ffmpeg that the PyPI package ``imageio-ffmpeg`` ships), and
  ``asterisk-core-sounds-en`` for their transcripts (``core-sounds-en.txt.gz``). The
  families ``vm-``, ``conf-``, ``queue-``, ``agent-`` and ``demo-`` are held out for
  acceptance tests and never loaded; neither are tones, silence files or symbols.
* Debian ``pocketsphinx-testdata`` (falls back to the PyPI ``pocketsphinx`` sdist's
  ``test/data``): LibriVox, card names, "go forward ten meters", TIDIGITS digits.
  Nothing named like ``jfk`` / inaugural is ever used (held out).

Every recording is checked with the repo's ASR (``load_recognizer(Config().asr)``):
prompts whose transcript is far from the reference text (WER > ``MAX_WER``) are
dropped. Speech bounds come from the repo's Silero VAD, run window by window with the
detector's hysteresis; word timings (faster-whisper ``word_timestamps``) say which
words come before a pause.

Turn types (see ``bench/README.md``): ``single`` (a real utterance as recorded; its
own pauses >= 0.15 s are inner pauses of kind ``natural``), ``stretched`` (one natural
pause lengthened to 0.3-1.5 s with the recording's own quiet; kind ``mid_sentence`` or
``sentence_boundary``), ``joined`` (2-4 recordings or fragments read as one turn with
0.3-1.5 s pauses between; kind ``joined``) and ``short`` (one short word or phrase).
Everything random comes from ``SEED``: every build gives the same corpus (its
``fingerprint`` is printed and stored).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import numpy as np

VERSION = 2  # bump when the recipe changes: the cache is keyed by it
SEED = 20240917
RATE = 16_000
WINDOW = 512  # the detector's window (32 ms)
LEAD_S = 0.5  # the recording's own quiet before each turn
MAX_WER = 0.3  # prompts whose ASR transcript is further from the text are dropped
NATURAL_MIN_S = 0.15  # a gap in the speech this long is an inner pause
STRETCH_CANDIDATE_S = 0.09  # a natural gap this long may be stretched
PAUSE_BINS = ((0.3, 0.7), (0.7, 1.1), (1.1, 1.5))
NOISE_DBFS = -70.0  # filler for digitally silent recordings
SPEECH_THRESHOLD = 0.5  # as vad.speech_threshold and the detector's hysteresis
STOP_GAP = 0.15

CACHE = Path(os.environ.get("VOICEBUS_BENCH_CORPUS") or "~/.cache/voicebus/bench-corpus")
CACHE = CACHE.expanduser()
PKGS = CACHE / "pkgs"

# Held out for acceptance testing: never loaded (prefixes of the Asterisk file names).
EXCLUDED_PREFIXES = ("vm-", "conf-", "queue-", "agent-", "demo-")
HELD_OUT = re.compile(r"jfk|inaugur", re.IGNORECASE)
# Not speech, or not a word anyone answers with.
NOT_SPEECH = re.compile(r"^(silence/|beep|beeperr$|ascending-|descending-|tt-monkeys$|"
                        r"confbridge-join$|confbridge-leave$|letters/ascii|letters/space$)")
POCKETSPHINX_SDIST = "pocketsphinx==5.1.1"
# Transcripts the pocketsphinx data gives outside a transcription file: its tests'
# expected hypothesis for goforward.raw, and TIDIGITS' digits-in-the-name convention.
PS_EXTRA = {"goforward.raw": "go forward ten meters",
            "tidigits/dhd.2934z.raw": "two nine three four zero"}


# -- labels ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Pause:
    start_s: float  # end of the speech before it (VAD, audio time in the turn)
    end_s: float  # start of the speech after it
    kind: str  # natural | mid_sentence | sentence_boundary | joined
    text_before: str = ""  # the reference words before it (as far as known)
    target_s: float | None = None  # the length it was built with (constructed pauses)

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class Turn:
    id: str
    type: str  # single | stretched | joined | short
    source: str  # asterisk | pocketsphinx
    text: str  # the reference text of the whole turn
    parts: list[str]  # the recordings it is made of
    speech_start_s: float
    speech_end_s: float  # the true end of the turn's speech
    pauses: list[Pause]
    audio: np.ndarray = field(repr=False)  # float32, 16 kHz mono, LEAD_S of quiet first
    noise: np.ndarray | None = field(default=None, repr=False)  # quiet to extend it with

    @property
    def pcm16(self) -> bytes:
        return bytes((np.clip(self.audio, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())

    def trailing(self, seconds: float) -> np.ndarray:
        """``seconds`` of this turn's own quiet (or -70 dBFS noise), the same every call."""
        rng = np.random.default_rng(int(hashlib.sha1(self.id.encode()).hexdigest()[:8], 16))
        return filler(self.noise, int(seconds * RATE), rng)

    def labels(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("audio", "noise")}
        d["duration_s"] = round(self.audio.size / RATE, 3)
        return d


# -- packages -------------------------------------------------------------------------
def _run(cmd: Sequence[str | Path], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


def deb_package(name: str) -> Path:
    """The files of Debian package ``name`` (``apt-get download`` + ``dpkg-deb -x``)."""
    root = PKGS / name
    if (root / ".extracted").is_file():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{name}: needs apt-get and dpkg-deb (Debian/Ubuntu)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _run(["apt-get", "download", name], cwd=tmp)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"apt-get download {name} failed (run `apt-get update` "
                               f"first?): {exc.stderr.decode(errors='replace')[-400:]}") from exc
        deb = next(Path(tmp).glob(f"{name}_*.deb"))
        partial = root.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _run(["dpkg-deb", "-x", deb, partial])
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
        (root / ".extracted").write_text(deb.name + "\n")
    return root


def pip_package(spec: str, binary: bool) -> Path:
    """``pip download --no-deps`` of ``spec`` into the cache; the file."""
    dest = PKGS / "pip"
    dest.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>]", spec)[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if found:
        return sorted(found)[-1]
    only = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    _run([sys.executable, "-m", "pip", "download", "--no-deps", *only, "-d", dest, spec])
    return pip_package(spec, binary)


def ffmpeg() -> str:
    """The ffmpeg binary that PyPI's imageio-ffmpeg ships (installed, or its wheel)."""
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    out = PKGS / "imageio_ffmpeg"
    exe = next(out.glob("**/ffmpeg-*"), None) if out.is_dir() else None
    if exe is None:
        wheel = pip_package("imageio-ffmpeg", binary=True)
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if "/binaries/ffmpeg" in n]
            if not names:
                raise RuntimeError(f"{wheel.name} holds no ffmpeg binary for this platform")
            z.extract(names[0], out)
        exe = out / names[0]
    exe.chmod(0o755)
    return str(exe)


def pocketsphinx_data() -> tuple[Path, str]:
    """pocketsphinx's test/data directory and where it came from."""
    try:
        root = deb_package("pocketsphinx-testdata")
        return next(root.glob("**/pocketsphinx/test/data")), (root / ".extracted").read_text()
    except (RuntimeError, StopIteration) as exc:
        print(f"  pocketsphinx-testdata unavailable ({exc}); using the PyPI sdist")
    out = PKGS / "pocketsphinx-sdist"
    if not out.is_dir():
        sdist = pip_package(POCKETSPHINX_SDIST, binary=False)
        import tarfile

        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/test/data/" in m.name and m.isfile()]
            tar.extractall(out, members=members, filter="data")
    return next(out.glob("*/test/data")), POCKETSPHINX_SDIST


# -- recordings -----------------------------------------------------------------------
@dataclass
class Recording:
    id: str  # ast/<prompt name> or ps/<file>
    source: str
    text: str
    audio: np.ndarray
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    levels: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    runs: list[tuple[int, int]] = field(default_factory=list)  # speech, in samples
    asr: str = ""
    wer: float = 1.0
    words: list[tuple[str, float, float]] = field(default_factory=list)  # ASR word timings

    @property
    def family(self) -> str:
        name = self.id.split("/", 1)[1]
        return name.split("/")[0] if "/" in name else "top"

    @property
    def speech_s(self) -> float:
        return sum(e - s for s, e in self.runs) / RATE

    @property
    def n_words(self) -> int:
        return len(norm_words(self.text))


def asterisk_recordings(ff: str) -> tuple[list[Recording], dict[str, Any]]:
    audio_root = deb_package("asterisk-core-sounds-en-g722")
    text_root = deb_package("asterisk-core-sounds-en")
    sounds = next(audio_root.glob("**/sounds/en_US_f_Allison"))
    listing = next(text_root.glob("**/core-sounds-en.txt*"))
    raw = listing.read_bytes()
    text = (gzip.decompress(raw) if listing.suffix == ".gz" else raw).decode("utf-8", "replace")
    transcripts: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith(";"):
            key, _, said = line.partition(":")
            transcripts[key.strip()] = said.strip()
    recordings, skipped = [], {"held_out": 0, "not_speech": 0, "no_audio": 0}
    for key in sorted(transcripts):
        name = key.rsplit("/", 1)[-1]
        if key.startswith(EXCLUDED_PREFIXES) or name.startswith(EXCLUDED_PREFIXES) \
                or HELD_OUT.search(key):
            skipped["held_out"] += 1
            continue
        said = transcripts[key]
        if NOT_SPEECH.match(key) or re.fullmatch(r"\s*[\[<(].*[\]>)]\s*", said):
            skipped["not_speech"] += 1
            continue
        path = sounds / f"{key}.g722"
        if not path.is_file():
            skipped["no_audio"] += 1
            continue
        pcm = _run([ff, "-nostdin", "-loglevel", "error", "-f", "g722", "-i", path,
                    "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-"]).stdout
        audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
        recordings.append(Recording(f"ast/{key}", "asterisk", said, audio))
    info = {"audio": (audio_root / ".extracted").read_text().strip(),
            "text": (text_root / ".extracted").read_text().strip(), **skipped}
    return recordings, info


def _read_audio(path: Path) -> np.ndarray:
    if path.suffix == ".wav":
        with wave.open(str(path)) as w:
            if w.getframerate() != RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise ValueError(f"{path}: not 16 kHz mono PCM16")
            pcm = w.readframes(w.getnframes())
    else:
        pcm = path.read_bytes()
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0


def pocketsphinx_recordings() -> tuple[list[Recording], dict[str, Any]]:
    data, origin = pocketsphinx_data()
    items: list[tuple[str, str]] = []
    for listing, folder in (("librivox/transcription", "librivox"),
                            ("cards/cards.transcription", "cards")):
        for line in (data / listing).read_text().splitlines():
            m = re.match(r"\s*<s>(.*)</s>\s*\((\S+)\)", line)
            if m:
                items.append((f"{folder}/{m.group(2)}.wav", " ".join(m.group(1).split())))
    items += sorted(PS_EXTRA.items())
    recordings = []
    for rel, said in items:
        if HELD_OUT.search(rel) or not (data / rel).is_file():
            continue
        recordings.append(Recording(f"ps/{rel}", "pocketsphinx", said, _read_audio(data / rel)))
    return recordings, {"data": origin.strip()}


# -- text -------------------------------------------------------------------------------
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        return number_words(n // 1000) + " thousand" + (
            "" if rest == 0 else " " + number_words(rest))
    return " ".join(_ONES[int(d)] for d in str(n))


_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth",
            "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def ordinal_words(n: int) -> str:
    words = number_words(n).split()
    last = words[-1]
    if last in _ORDINAL:
        last = _ORDINAL[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*words[:-1], last])


def norm_words(text: str) -> list[str]:
    """Lower case, no punctuation or annotations, numbers spelled out ("10th": "tenth"),
    the keypad's "#" and "*" as said ("pound", "star")."""
    t = re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)", " ", text).lower()
    t = t.replace("#", " pound ").replace("*", " star ").replace("&", " and ")
    t = re.sub(r"(\d+)(st|nd|rd|th)\b", lambda m: f" {ordinal_words(int(m.group(1)))} ", t)
    t = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", t)
    t = t.replace(".", "").replace("\u2019", "'")
    t = re.sub(r"[^a-z' ]", " ", t)
    t = re.sub(r"\b(\w+)'(m|re|ve|ll|d)\b|\b(that|it|there|what|he|she)'s\b|\b(\w+)n't\b",
               _expand, t)
    return [w.strip("'") for w in t.split() if w.strip("'")]


def _expand(m: re.Match[str]) -> str:
    """Contractions spelled out, so "I'm" matches "I am" ("'s" only after pronouns:
    "party's" is a possessive)."""
    if m.group(1):
        return m.group(1) + " " + {"m": "am", "re": "are", "ve": "have", "ll": "will",
                                   "d": "would"}[m.group(2)]
    if m.group(3):
        return m.group(3) + " is"
    stem = m.group(4)
    return {"wo": "will", "ca": "can", "sha": "shall"}.get(stem, stem) + " not"


# Words the ASR may write for the same sound: not a sign that the text is wrong.
_SOUNDS_ALIKE = [{"for", "four"}, {"to", "two", "too"}, {"oh", "o", "zero"}, {"eight", "ate"},
                 {"one", "won"}, {"z", "zed"}]
_LETTER_NAMES = {"b": "bee be", "c": "see sea", "d": "dee", "g": "gee", "i": "eye", "j": "jay",
                 "k": "kay", "o": "oh", "p": "pee", "q": "queue cue", "r": "are", "t": "tea",
                 "u": "you", "v": "vee", "x": "ex", "y": "why"}
for _letter, _names in _LETTER_NAMES.items():
    _SOUNDS_ALIKE.append({_letter, *_names.split()})


def _same(a: str, b: str) -> bool:
    return a == b or any(a in s and b in s for s in _SOUNDS_ALIKE)


def _edits(a: Sequence[Any], b: Sequence[Any], same: Any = None) -> int:
    eq = same or (lambda x, y: x == y)
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (not eq(x, y)))
    return row[-1]


def _digit_reading(text: str) -> str:
    """Numbers read digit by digit ("29340": "two nine three four zero")."""
    return re.sub(r"\d{2,}", lambda m: " ".join(m.group()), text)


def error_rate(reference: str, hypothesis: str) -> float:
    """WER after normalising both, counting as equal: words that sound alike (a letter
    and its name, "for"/"four"), a number read as digits, and words split or joined
    differently ("lower case", "re-record")."""
    ref = norm_words(reference)
    best = 1e9
    for hyp_text in {hypothesis, _digit_reading(hypothesis)}:
        hyp = norm_words(hyp_text)
        if "".join(ref) == "".join(hyp):
            return 0.0
        best = min(best, _edits(ref, hyp, _same) / max(1, len(ref)))
    return best


def _ref_tokens(text: str) -> list[tuple[str, int]]:
    """Normalised reference tokens with the index of the original word each comes from."""
    out = []
    for i, word in enumerate(text.split()):
        out += [(t, i) for t in norm_words(word)]
    return out


def words_before(rec: Recording, at_s: float) -> tuple[str, str]:
    """The reference text before ``at_s`` s of ``rec`` (via the ASR word timings) and the
    punctuation the last of those words ends with (reference, else the ASR's)."""
    before = [w for w in rec.words if (w[1] + w[2]) / 2 < at_s]
    if not before:
        return "", ""
    ref_words = rec.text.split()
    ref = _ref_tokens(rec.text)
    hyp: list[tuple[str, int]] = []
    for k, (w, _s, _e) in enumerate(rec.words):
        hyp += [(t, k) for t in norm_words(w)]
    last_hyp = max((j for j, (_t, k) in enumerate(hyp) if k < len(before)), default=-1)
    if last_hyp < 0 or not ref:
        return "", ""
    matcher = SequenceMatcher(a=[t for t, _ in ref], b=[t for t, _ in hyp], autojunk=False)
    ref_index = 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if j1 <= last_hyp < j2 or (j1 == j2 and j1 > last_hyp):
            if tag == "insert" or i1 == i2:
                ref_index = max(0, i1 - 1)
            else:
                ref_index = min(i2 - 1, i1 + (last_hyp - j1) * (i2 - i1) // max(1, j2 - j1))
            break
        ref_index = max(0, i2 - 1)
    word_index = ref[ref_index][1]
    has_punct = re.search(r"[.,;:!?]", rec.text) is not None
    last = ref_words[word_index] if has_punct else before[-1][0]
    m = re.search(r"(\.\.\.|[.,;:!?…]+)[\"')\]]*$", last.strip())
    return " ".join(ref_words[:word_index + 1]), (m.group(1) if m else "")


# -- audio analysis -------------------------------------------------------------------
def level_db(window: np.ndarray) -> float:
    from workers.backends.audio import level_db as lvl

    return float(lvl(window))


def analyse(audio: np.ndarray, silero: Any) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Silero P(speech) and level per window, and the speech runs (samples) with the
    detector's hysteresis (on at 0.5, off below 0.35)."""
    stream = silero.stream()
    n = audio.size // WINDOW
    probs, levels = np.zeros(n), np.zeros(n)
    runs: list[tuple[int, int]] = []
    speaking, start = False, 0
    for i in range(n):
        w = audio[i * WINDOW:(i + 1) * WINDOW]
        probs[i], levels[i] = stream(w), level_db(w)
        threshold = max(0.05, SPEECH_THRESHOLD - STOP_GAP) if speaking else SPEECH_THRESHOLD
        voiced = probs[i] >= threshold
        if voiced and not speaking:
            start = i
        elif speaking and not voiced:
            runs.append((start * WINDOW, i * WINDOW))
        speaking = voiced
    if speaking:
        runs.append((start * WINDOW, n * WINDOW))
    return probs, levels, runs


def gaps(runs: list[tuple[int, int]], min_s: float) -> list[tuple[int, int]]:
    return [(a[1], b[0]) for a, b in itertools.pairwise(runs) if b[0] - a[1] >= min_s * RATE]


def quiet_bed(rec: Recording) -> np.ndarray | None:
    """The recording's own quietest non-speech windows, concatenated (None: silent)."""
    if rec.levels.size == 0:
        return None
    quiet = (rec.probs < 0.1) & (rec.levels <= rec.levels.min() + 6.0)
    pieces = [rec.audio[i * WINDOW:(i + 1) * WINDOW] for i in np.flatnonzero(quiet)]
    if len(pieces) < 2:
        return None
    bed = np.concatenate(pieces)
    return bed if float(np.sqrt(np.mean(bed ** 2))) > 1e-5 else None


def filler(bed: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of quiet: random crops of ``bed`` with crossfades, or -70 dBFS noise."""
    if n <= 0:
        return np.zeros(0, np.float32)
    if bed is None or bed.size < 512:
        return (rng.standard_normal(n) * 10 ** (NOISE_DBFS / 20)).astype(np.float32)
    out, fade = np.zeros(0, np.float32), 64
    ramp = np.linspace(0, 1, fade, dtype=np.float32)
    while out.size < n + fade:
        size = int(rng.integers(256, min(1024, bed.size) + 1))
        at = int(rng.integers(0, bed.size - size + 1))
        piece = bed[at:at + size].astype(np.float32)
        if out.size >= fade:
            out[-fade:] = out[-fade:] * ramp[::-1] + piece[:fade] * ramp
            out = np.concatenate([out, piece[fade:]])
        else:
            out = piece.copy()
    return out[:n]


def faded(chunk: np.ndarray, fade: int = 32) -> np.ndarray:
    """``chunk`` with 2 ms ramps at both ends, so chunks cut in quiet (or at a word's
    edge) join without clicks and without changing the timeline."""
    out = chunk.astype(np.float32).copy()
    if out.size >= 2 * fade:
        ramp = np.linspace(0, 1, fade, dtype=np.float32)
        out[:fade] *= ramp
        out[-fade:] *= ramp[::-1]
    return out


# -- ASR (cached by the audio's hash) -------------------------------------------------
class Asr:
    def __init__(self) -> None:
        from workers.backends.asr import load_recognizer
        from workers.config import Config

        cfg = Config().asr
        self.recognizer = load_recognizer(cfg)
        self.key = f"{cfg.model}/{cfg.compute_type}/{cfg.beam_size}"
        self.path = CACHE / "asr-check.json"
        self.cache: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() \
            else {}

    def _hash(self, audio: np.ndarray, kind: str) -> str:
        pcm = (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
        return f"{kind}:{self.key}:{hashlib.sha1(pcm).hexdigest()}"

    def text(self, audio: np.ndarray) -> str:
        key = self._hash(audio, "text")
        if key not in self.cache:
            pcm = (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
            self.cache[key] = self.recognizer.transcribe(pcm, RATE).text
        return str(self.cache[key])

    def words(self, audio: np.ndarray) -> list[tuple[str, float, float]]:
        key = self._hash(audio, "words")
        if key not in self.cache:
            model = self.recognizer.model  # type: ignore[attr-defined]
            segments, _ = model.transcribe(audio.astype(np.float32), language="en", beam_size=1,
                                           word_timestamps=True, vad_filter=False,
                                           condition_on_previous_text=False)
            self.cache[key] = [(w.word.strip(), round(w.start, 3), round(w.end, 3))
                               for s in segments for w in (s.words or [])]
        return [(str(w), float(a), float(b)) for w, a, b in self.cache[key]]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache, indent=0, sort_keys=True))
        tmp.replace(self.path)


# -- building turns ---------------------------------------------------------------------
@dataclass
class _Piece:
    """A span of one recording placed in a turn being built."""
    rec: Recording
    lo: int  # samples of rec.audio used: [lo, hi)
    hi: int


Made = tuple[int, int, str, str, float]  # a built pause: lo, hi, kind, text before, target s


class _Builder:
    """Assembles a turn: pieces of recordings and fillers; knows where the constructed
    pauses are (their intended speech bounds, in the turn's samples)."""

    def __init__(self, bed: np.ndarray | None, rng: np.random.Generator) -> None:
        self.bed, self.rng = bed, rng
        self.chunks: list[np.ndarray] = [filler(bed, int(LEAD_S * RATE), rng)]
        self.size = self.chunks[0].size
        self.made: list[Made] = []

    def add(self, audio: np.ndarray) -> int:
        """Append audio; its offset in the turn."""
        at = self.size
        self.chunks.append(faded(audio))
        self.size += audio.size
        return at

    def quiet(self, n: int) -> None:
        self.add(filler(self.bed, n, self.rng))

    def audio(self) -> np.ndarray:
        return np.concatenate(self.chunks).astype(np.float32)


def _pause_length(rng: np.random.Generator, bin_index: int) -> float:
    lo, hi = PAUSE_BINS[bin_index]
    return round(float(rng.uniform(lo, hi)), 3)


def _bounds(rec: Recording) -> tuple[int, int]:
    return rec.runs[0][0], rec.runs[-1][1]


def _energy_bounds(rec: Recording, above_floor_db: float = 25.0) -> tuple[int, int]:
    """First and last window clearly above the recording's floor (word onsets and tails
    that Silero's bounds may leave out)."""
    loud = np.flatnonzero(rec.levels > rec.levels.min() + above_floor_db)
    s, e = _bounds(rec)
    if loud.size == 0:
        return s, e
    return min(s, int(loud[0]) * WINDOW), max(e, int(loud[-1] + 1) * WINDOW)


def build_stretched(rec: Recording, gap: tuple[int, int], length_s: float, kind: str,
                    before: str, rng: np.random.Generator) -> tuple[np.ndarray, list[Made]]:
    """``rec`` with its natural gap made ``length_s`` long (filler at its quietest point)."""
    lo, hi = gap
    w0, w1 = lo // WINDOW, hi // WINDOW
    at = (w0 + int(np.argmin(rec.levels[w0:w1]))) * WINDOW + WINDOW // 2
    extra = int(length_s * RATE) - (hi - lo)
    b = _Builder(quiet_bed(rec), rng)
    offset = b.add(rec.audio[:at])
    b.quiet(extra)
    b.add(rec.audio[at:])
    start = offset + lo
    b.made.append((start, start + int(length_s * RATE), kind, before, length_s))
    return b.audio(), b.made


def _group(group: list[Recording], rng: np.random.Generator, bed: np.ndarray | None,
           inner_gap: tuple[float, float]) -> tuple[list[np.ndarray], int, int, int, int]:
    """Recordings read close together: the chunks, the first speech sample and the last
    (offsets in the group), and how much quiet there is before and after them."""
    pad = int(0.1 * RATE)
    chunks: list[np.ndarray] = []
    size = start = end = head = tail = 0
    for ri, rec in enumerate(group):
        s, e = _bounds(rec)
        es, ee = _energy_bounds(rec)
        first, last = ri == 0, ri == len(group) - 1
        lo = max(0, s - pad) if first else max(0, es - int(0.01 * RATE))
        hi = min(rec.audio.size, e + pad) if last else min(rec.audio.size, ee + int(0.01 * RATE))
        if first:
            start, head = s - lo, s - lo
        if last:
            end, tail = size + (e - lo), hi - e
        chunks.append(faded(rec.audio[lo:hi]))
        size += hi - lo
        if not last:
            q = faded(filler(bed, int(rng.uniform(*inner_gap) * RATE), rng))
            chunks.append(q)
            size += q.size
    return chunks, start, end, head, tail


def build_joined(pieces: list[list[Recording]], pauses_s: list[float],
                 rng: np.random.Generator, inner_gap: tuple[float, float] = (0.02, 0.07)
                 ) -> tuple[np.ndarray, list[Made], str]:
    """Groups of recordings read as one turn: inside a group the words follow each other
    closely (``inner_gap`` s of quiet between their sound), between groups a pause of
    ``pauses_s[i]`` (Silero's speech end to its next speech start)."""
    beds = [bed for g in pieces for r in g if (bed := quiet_bed(r)) is not None]
    bed = np.concatenate(beds) if beds else None
    b = _Builder(bed, rng)
    groups = [_group(g, rng, bed, inner_gap) for g in pieces]
    texts: list[str] = []
    prev_end = 0
    for gi, (chunks, _start, end, head, _tail) in enumerate(groups):
        audio = np.concatenate(chunks)
        lo = 0
        if gi:
            L = int(pauses_s[gi - 1] * RATE)
            keep_head = min(head, L // 3)
            lo = head - keep_head
            prev_tail = b.size - prev_end
            keep_tail = min(prev_tail, L // 3)
            b.chunks[-1] = faded(b.chunks[-1][:b.chunks[-1].size - (prev_tail - keep_tail)])
            b.size -= prev_tail - keep_tail
            b.quiet(L - keep_head - keep_tail)
            b.made.append((prev_end, b.size + keep_head, "joined", _join_texts(texts),
                           pauses_s[gi - 1]))
        offset = b.add(audio[lo:])
        prev_end = offset + end - lo
        texts.append(" ".join(_clean(r.text) for r in pieces[gi]))
    return b.audio(), b.made, _join_texts(texts)


def _join_texts(texts: list[str]) -> str:
    """The groups' texts as one: "You entered, one six six, four one eight"."""
    parts = [t.rstrip(".!,") if i < len(texts) - 1 else t for i, t in enumerate(texts)]
    return ", ".join(p for p in parts if p)


def _clean(text: str) -> str:
    t = re.sub(r"\s*\[[^\]]*\]", "", text).replace("...", " ").strip()
    return " ".join(t.split())


def label(turn_id: str, ttype: str, source: str, text: str, parts: list[str],
          audio: np.ndarray, made: list[Made], natural_before: Any, silero: Any,
          noise: np.ndarray | None) -> tuple[Turn | None, str]:
    """Speech bounds and inner pauses of a built turn from Silero on the turn itself.
    ``made``: the constructed pauses (each must show up as one gap); every other gap of
    >= NATURAL_MIN_S is a natural pause. ``natural_before(lo_s)``: text before it."""
    _probs, _levels, runs = analyse(audio, silero)
    if not runs:
        return None, "no speech found"
    found = gaps(runs, NATURAL_MIN_S)
    pauses: list[Pause] = []
    used: set[int] = set()
    for lo, hi, kind, before, target in made:
        best, overlap = None, 0
        for k, (g0, g1) in enumerate(found):
            ov = min(hi, g1) - max(lo, g0)
            if ov > overlap:
                best, overlap = k, ov
        if best is None or overlap < 0.5 * (hi - lo):
            return None, f"built pause at {lo / RATE:.2f} s not seen by the VAD"
        g0, g1 = found[best]
        if abs((g1 - g0) - (hi - lo)) > 0.15 * RATE:
            return None, (f"built pause {target:.2f} s measured {(g1 - g0) / RATE:.2f} s")
        used.add(best)
        pauses.append(Pause(round(g0 / RATE, 3), round(g1 / RATE, 3), kind, before, target))
    for k, (g0, g1) in enumerate(found):
        if k not in used:
            pauses.append(Pause(round(g0 / RATE, 3), round(g1 / RATE, 3), "natural",
                                natural_before(g0 / RATE) if natural_before else ""))
    pauses.sort(key=lambda p: p.start_s)
    return Turn(turn_id, ttype, source, text, parts, round(runs[0][0] / RATE, 3),
                round(runs[-1][1] / RATE, 3), pauses, audio.astype(np.float32), noise), ""


# -- the recipe -------------------------------------------------------------------------
DIGITS = [f"digits/{d}" for d in range(10)]
# (template name, pieces): each piece a prompt key, or "#N-M" (N-M random digits read
# close together), "@day"/"@month"/"@ord" (one at random), "|a|b" (one of a, b).
FRAGMENTS = [
    ("you_entered", [["you-entered"], ["#3-4"], ["#2-4"]]),
    ("first_letters", [["dir-pls-enter"], ["|digits/3|digits/4"], ["|dir-first|dir-last"]]),
    ("call_press", [["to-call-this-number"], ["dir-multi1"], ["#1-1"]]),
    ("if_correct", [["if-correct-press"], ["#1-1"]]),
    ("press_for_ext", [["dir-multi1", "#1-1"], ["dir-multi2"], ["dir-multi3", "#3-4"]]),
    ("successfully", [["num-was-successfully"], ["|added|removed"]]),
    ("last_caller", [["privacy-to-blacklist-last-caller"], ["#3-3"], ["#4-4"]]),
    ("ext_in_use", [["|extension|telephone-number"], ["#2-4"], ["is-in-use"]]),
    ("set_to", [["|call-forwarding|call-waiting|do-not-disturb"], ["is-set-to"],
                ["|enabled|disabled|activated|de-activated"]]),
    ("forward", [["|call-fwd-on-busy|call-fwd-no-ans|call-fwd-unconditional"],
                 ["|enabled|disabled|activated|cancelled"]]),
    ("last_call", [["info-about-last-call"], ["from-unknown-caller"]]),
    ("tone_time", [["at-tone-time-exactly"], ["|digits/3|digits/7|digits/11"],
                   ["|digits/oclock|digits/p-m|digits/a-m"]]),
    ("call_from", [["followme/call-from"], ["#3-3"], ["#4-4"]]),
    ("speed_dial", [["speed-dial", "#1-1"], ["is-set-to"], ["#3-4"]]),
    ("there_are", [["confbridge-there-are"], ["|digits/2|digits/5|digits/9"],
                   ["confbridge-participants"]]),
    ("to_mute", [["confbridge-mute-in"], ["dir-multi1", "#1-1"]]),
    ("to_leave", [["confbridge-leave-in"], ["dir-multi1", "#1-1"]]),
    ("date", [["@day"], ["@month", "@ord"]]),
    ("days", [["@day"], ["@day"], ["@day"]]),
    ("ordinals", [["@ord"], ["@ord"], ["@ord"]]),
]
# Prompts that do not finish a thought on their own ("You entered", "To call this
# number"): only used as the first pieces of joined turns, never as a turn by themselves.
INCOMPLETE = frozenset("""
ast/to-call-this-number ast/you-entered ast/to-extension ast/to-listen-to-it ast/to-rerecord-it
ast/is-set-to ast/is ast/for ast/with ast/your ast/dir-pls-enter ast/if-correct-press
ast/num-was-successfully ast/privacy-to-blacklist-last-caller ast/at-tone-time-exactly
ast/followme/call-from ast/digits/at ast/digits/minus ast/priv-callpending
""".split())
MAX_STRETCH_PER_RECORDING = 2
MAX_STRETCHED_S = 15.0  # longer prompts (whole IVR menus) are only used as they are
STRETCH_PER_KIND = 16
SHORT_FAMILY_CAP = {"digits": 14, "letters": 8, "phonetic": 8, "top": 100, "cards": 5,
                    "librivox": 0}


def _choose(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def build_corpus(verbose: bool = True) -> dict[str, Any]:
    """Fetch, check, build and cache the corpus; the manifest."""
    from workers.backends.silero import SileroModel

    started = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    say(f"building the turn-taking corpus in {CACHE} (version {VERSION}, seed {SEED})")
    ff = ffmpeg()
    ast, ast_info = asterisk_recordings(ff)
    ps, ps_info = pocketsphinx_recordings()
    recordings = ast + ps
    say(f"  {len(ast)} Asterisk prompts (held out / not speech / no audio: "
        f"{ast_info['held_out']} / {ast_info['not_speech']} / {ast_info['no_audio']}), "
        f"{len(ps)} pocketsphinx recordings")
    silero = SileroModel()
    asr = Asr()
    dropped: list[dict[str, Any]] = []
    usable: dict[str, Recording] = {}
    for i, rec in enumerate(recordings):
        rec.probs, rec.levels, rec.runs = analyse(rec.audio, silero)
        if not rec.runs:
            dropped.append({"id": rec.id, "text": rec.text, "why": "no speech found"})
            continue
        rec.asr = asr.text(rec.audio)
        rec.wer = error_rate(rec.text, rec.asr)
        if rec.wer > MAX_WER:
            dropped.append({"id": rec.id, "text": rec.text, "asr": rec.asr,
                            "wer": round(rec.wer, 3), "why": f"WER > {MAX_WER}"})
            continue
        if len(rec.runs) > 1 and rec.n_words > 1:
            rec.words = asr.words(rec.audio)
        usable[rec.id] = rec
        if verbose and (i + 1) % 50 == 0:
            say(f"  checked {i + 1}/{len(recordings)} ({time.perf_counter() - started:.0f} s)")
            asr.save()
    asr.save()
    say(f"  ASR check: {len(dropped)} of {len(recordings)} dropped (WER > {MAX_WER} or no "
        "speech)")

    seeds = np.random.SeedSequence(SEED).spawn(4)
    turns: list[Turn] = []
    rejected: list[dict[str, str]] = []

    def keep(result: tuple[Turn | None, str], tid: str) -> None:
        turn, why = result
        if turn is None:
            rejected.append({"id": tid, "why": why})
        else:
            turns.append(turn)

    def lead(rec: Recording, rng: np.random.Generator) -> np.ndarray:
        """The recording after LEAD_S of its own quiet."""
        b = _Builder(quiet_bed(rec), rng)
        b.add(rec.audio)
        return b.audio()

    def before_fn(rec: Recording, shift_s: float,
                  extra: tuple[float, float] | None = None) -> Callable[[float], str]:
        def fn(t: float) -> str:
            t -= shift_s
            if extra is not None and t > extra[0]:
                t = max(extra[0], t - extra[1])
            return words_before(rec, t)[0]
        return fn

    # a. single utterances, d. short answers
    rng_a, rng_b, rng_c, rng_d = (np.random.default_rng(s) for s in seeds)
    alone = [r for r in usable.values()
             if r.id not in INCOMPLETE and "..." not in r.text and not r.text.endswith(":")]
    singles = [r for r in alone if r.n_words >= 3 or r.speech_s >= 1.2]
    shorts = [r for r in alone if r not in singles]
    for rec in singles:
        tid = f"single/{rec.id}"
        keep(label(tid, "single", rec.source, _clean(rec.text), [rec.id], lead(rec, rng_a),
                   [], before_fn(rec, LEAD_S), silero, quiet_bed(rec)), tid)
    by_family: dict[str, list[Recording]] = {}
    for rec in shorts:
        by_family.setdefault(rec.family, []).append(rec)
    for fam, recs in sorted(by_family.items()):
        cap = SHORT_FAMILY_CAP.get(fam, 8)
        order = rng_d.permutation(len(recs))[:cap]
        for k in sorted(order):
            rec = recs[k]
            tid = f"short/{rec.id}"
            keep(label(tid, "short", rec.source, _clean(rec.text), [rec.id], lead(rec, rng_d),
                       [], None, silero, quiet_bed(rec)), tid)

    # b. a natural pause stretched, one turn per length bin
    candidates = []
    for rec in singles:
        if rec.runs[-1][1] / RATE > MAX_STRETCHED_S:  # a whole IVR menu is no one's turn
            continue
        for gap in gaps(rec.runs, STRETCH_CANDIDATE_S):
            mid = (gap[0] + gap[1]) / 2 / RATE
            inside = any(s + 0.05 < mid < e - 0.05 for _w, s, e in rec.words)
            if inside or rec.levels[gap[0] // WINDOW:gap[1] // WINDOW].min() > -45:
                continue
            before, punct = words_before(rec, mid)
            if not before or before == " ".join(rec.text.split()):
                continue
            kind = "sentence_boundary" if punct in (".", "!", "?") else "mid_sentence"
            candidates.append((rec, gap, kind, before))
    # At most MAX_STRETCH_PER_RECORDING pauses of one prompt (of either kind), and up
    # to STRETCH_PER_KIND of each kind: three turns (one per length bin) each.
    chosen_c: list[tuple[Recording, tuple[int, int], str, str]] = []
    per_rec: dict[str, int] = {}
    for kind in ("sentence_boundary", "mid_sentence"):  # the rarer kind picks first
        of_kind = [c for c in candidates if c[2] == kind]
        n = 0
        for k in rng_b.permutation(len(of_kind)):
            rec = of_kind[k][0]
            if per_rec.get(rec.id, 0) < MAX_STRETCH_PER_RECORDING and n < STRETCH_PER_KIND:
                per_rec[rec.id] = per_rec.get(rec.id, 0) + 1
                chosen_c.append(of_kind[k])
                n += 1
    chosen_c.sort(key=lambda c: (c[0].id, c[1]))
    for rec, gap, kind, before in chosen_c:
        for bi in range(len(PAUSE_BINS)):
            length = _pause_length(rng_b, bi)
            tid = f"stretched/{rec.id}@{gap[0] / RATE:.2f}s/{bi}"
            audio, made = build_stretched(rec, gap, length, kind, before, rng_b)
            extra = (gap[0] / RATE, length - (gap[1] - gap[0]) / RATE)
            keep(label(tid, "stretched", rec.source, _clean(rec.text), [rec.id], audio,
                       [(lo, hi, k, bf, t) for lo, hi, k, bf, t in made],
                       before_fn(rec, LEAD_S, extra), silero, quiet_bed(rec)), tid)

    # c. joined sequences
    def pick(spec: str, rng: np.random.Generator) -> list[Recording] | None:
        def get(key: str) -> Recording | None:
            return usable.get(f"ast/{key}")

        def have(keys: list[str]) -> list[str]:
            return [k for k in keys if f"ast/{k}" in usable] or keys
        if spec.startswith("#"):
            lo, hi = map(int, spec[1:].split("-"))
            n = int(rng.integers(lo, hi + 1))
            got = [get(_choose(rng, have([*DIGITS, "digits/oh"]))) for _ in range(n)]
        elif spec.startswith("|"):
            got = [get(_choose(rng, have(spec[1:].split("|"))))]
        elif spec == "@day":
            got = [get(_choose(rng, have([f"digits/day-{d}" for d in range(7)])))]
        elif spec == "@month":
            got = [get(_choose(rng, have([f"digits/mon-{m}" for m in range(12)])))]
        elif spec == "@ord":
            got = [get(_choose(rng, have([f"digits/h-{d}" for d in range(1, 21)])))]
        else:
            got = [get(spec)]
        return None if any(g is None for g in got) else [g for g in got if g is not None]

    bin_cycle = 0
    jobs: list[tuple[str, list[list[str]]]] = []
    for name, groups in FRAGMENTS:
        jobs += [(f"{name}/{k}", groups) for k in range(3)]
    for k in range(12):  # phone numbers / codes in groups
        n_groups = int(rng_c.integers(2, 5))
        jobs.append((f"digit_groups/{k}", [[f"#{2 if g < n_groups - 1 else 3}-4"]
                                           for g in range(n_groups)]))
    for k in range(8):  # spelled codes: letters and digits
        letters = "|" + "|".join(f"letters/{c}" for c in "abcdefgjkmnprstuvxyz")
        jobs.append((f"spelled/{k}", [[letters, letters, "#1-2"], [letters, "#1-2"]]
                     if k % 2 else [[letters, letters], ["#2-3"], [letters, "#1-1"]]))
    for k in range(8):  # NATO alphabet
        nato = "|" + "|".join(f"phonetic/{c}_p" for c in "abcdefghijklmnopqrstuvwxyz")
        jobs.append((f"phonetic/{k}", [[nato, nato], [nato, nato]] if k % 2 else
                     [[nato], [nato], [nato]]))
    for k in range(6):  # a list: "one, two, three"
        n = int(rng_c.integers(3, 5))
        start = int(rng_c.integers(1, 10 - n + 1))
        jobs.append((f"list/{k}", [[f"digits/{start + j}"] for j in range(n)]))
    for jid, groups in jobs:
        # each job its own stream: adding or dropping one leaves the others as they were
        rng_j = np.random.default_rng([SEED, 3, zlib.crc32(jid.encode())])
        picked = [[pick(spec, rng_j) for spec in g] for g in groups]
        if any(p is None for g in picked for p in g):
            rejected.append({"id": f"joined/{jid}", "why": "a piece was dropped"})
            continue
        chosen = [[r for p in g if p is not None for r in p] for g in picked]
        pauses = []
        for _ in range(len(groups) - 1):
            pauses.append(_pause_length(rng_j, bin_cycle % len(PAUSE_BINS)))
            bin_cycle += 1
        audio, made, text = build_joined(chosen, pauses, rng_j)
        tid = f"joined/{jid}"
        noise = quiet_bed(chosen[0][0])
        keep(label(tid, "joined", "asterisk", text, [p.id for g in chosen for p in g], audio,
                   made, None, silero, noise), tid)

    manifest = save(turns, {
        "version": VERSION, "seed": SEED, "sources": {"asterisk": ast_info,
                                                       "pocketsphinx": ps_info},
        "excluded_prefixes": list(EXCLUDED_PREFIXES), "max_wer": MAX_WER,
        "recordings": len(recordings), "usable": len(usable), "dropped": dropped,
        "rejected_turns": rejected, "build_s": round(time.perf_counter() - started, 1)})
    say(f"  {len(turns)} turns ({_counts(turns)}); {len(rejected)} built turns rejected; "
        f"fingerprint {manifest['fingerprint'][:16]}; {manifest['build_s']} s")
    return manifest


def _counts(turns: list[Turn]) -> str:
    c: dict[str, int] = {}
    for t in turns:
        c[t.type] = c.get(t.type, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


# -- cache ------------------------------------------------------------------------------
def corpus_dir() -> Path:
    return CACHE / f"corpus-v{VERSION}"


def save(turns: list[Turn], info: dict[str, Any]) -> dict[str, Any]:
    out = corpus_dir()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    digest = hashlib.sha256()
    labels = []
    for i, t in enumerate(turns):
        pcm = np.frombuffer(t.pcm16, "<i2")
        arrays[f"a{i}"] = pcm
        if t.noise is not None:
            arrays[f"n{i}"] = (np.clip(t.noise, -1, 32767 / 32768) * 32768).astype("<i2")
        lab = t.labels()
        labels.append(lab)
        digest.update(pcm.tobytes())
        digest.update(json.dumps(lab, sort_keys=True).encode())
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    (tmp / "audio.npz").write_bytes(buf.getvalue())
    counts: dict[str, Any] = {}
    for t in turns:
        c = counts.setdefault(t.type, {"turns": 0, "pauses": {}})
        c["turns"] += 1
        for p in t.pauses:
            c["pauses"][p.kind] = c["pauses"].get(p.kind, 0) + 1
    manifest = {**info, "turns": len(turns), "counts": counts,
                "fingerprint": digest.hexdigest()}
    (tmp / "turns.json").write_text(json.dumps({"manifest": manifest, "turns": labels},
                                               indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def load_corpus(build: bool = True) -> tuple[list[Turn], dict[str, Any]]:
    """The turns and the manifest (built first if not cached)."""
    path = corpus_dir() / "turns.json"
    if not path.is_file():
        if not build:
            raise FileNotFoundError(path)
        build_corpus()
    data = json.loads(path.read_text())
    with np.load(corpus_dir() / "audio.npz") as z:
        turns = []
        for i, lab in enumerate(data["turns"]):
            noise = z[f"n{i}"].astype(np.float32) / 32768 if f"n{i}" in z.files else None
            turns.append(Turn(
                lab["id"], lab["type"], lab["source"], lab["text"], lab["parts"],
                lab["speech_start_s"], lab["speech_end_s"],
                [Pause(**p) for p in lab["pauses"]],
                z[f"a{i}"].astype(np.float32) / 32768, noise))
    return turns, data["manifest"]


def export(turns: list[Turn], folder: Path) -> list[Path]:
    """Each turn as a 16 kHz WAV in ``folder``; the paths, in the turns' order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in turns:
        path = folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", t.id) + ".wav")
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(t.pcm16)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true", help="build again (keeps the "
                        "downloaded packages and the ASR cache)")
    parser.add_argument("--export", type=Path, help="also write every turn as a WAV here")
    parser.add_argument("--list", action="store_true", help="print every turn's labels")
    args = parser.parse_args()
    if args.rebuild:
        shutil.rmtree(corpus_dir(), ignore_errors=True)
    turns, manifest = load_corpus()
    print(f"{len(turns)} turns in {corpus_dir()} (fingerprint {manifest['fingerprint'][:16]})")
    for ttype, c in sorted(manifest["counts"].items()):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["pauses"].items()))
        print(f"  {ttype:<10} {c['turns']:>4} turns; inner pauses: {kinds or 'none'}")
    print(f"  {len(manifest['dropped'])} of {manifest['recordings']} recordings dropped by "
          f"the ASR check; {len(manifest['rejected_turns'])} built turns rejected")
    if args.list:
        for t in turns:
            ps = " ".join(f"[{p.start_s:.2f}-{p.end_s:.2f} {p.kind}]" for p in t.pauses)
            print(f"{t.id:<60} end {t.speech_end_s:6.2f}  {t.text[:60]!r} {ps}")
    if args.export:
        export(turns, args.export)
        print(f"wrote {len(turns)} WAVs to {args.export}")


if __name__ == "__main__":
    main()

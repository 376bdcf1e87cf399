"""Which module implements which stage, and how a worker for it is built."""

from __future__ import annotations

import importlib
from typing import Any

from workers.runtime import JobStage, RuntimeSettings
from workers.runtime.jobs import JobWorker
from workers.runtime.sessions import SessionWorker
from workers.runtime.worker import Worker

STAGE_MODULES = {
    "vad": "workers.vad_worker",
    "asr": "workers.asr_worker",
    "llm": "workers.llm_worker",
    "tts": "workers.tts_worker",
}


def build_worker(name: str, config: Any, url: str, consumer: str | None = None) -> Worker:
    """A ready-to-run worker for stage ``name`` (its models load here, once)."""
    module = importlib.import_module(STAGE_MODULES[name])
    stage = module.build(config)
    settings = RuntimeSettings.from_config(config, url)
    if isinstance(stage, JobStage):
        return JobWorker(stage, settings, consumer)
    return SessionWorker(stage, settings, consumer)

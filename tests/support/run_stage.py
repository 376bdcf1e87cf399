"""Run one test stage as a worker process: python -m tests.support.run_stage STAGE URL PREFIX."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.support.stages import STAGES
from workers.config import RedisConfig, WorkerConfig
from workers.observability.logs import setup_logging
from workers.runtime import JobStage, RuntimeSettings
from workers.runtime.jobs import JobWorker
from workers.runtime.sessions import SessionWorker
from workers.runtime.worker import Worker


def main() -> None:
    stage_name, url, prefix = sys.argv[1:4]
    setup_logging("INFO", "text", component=stage_name)
    settings = RuntimeSettings(
        url,
        RedisConfig(key_prefix=prefix, block_ms=200,
                    claim_idle_ms=int(os.environ.get("TEST_CLAIM_IDLE_MS", "1000")),
                    max_deliveries=int(os.environ.get("TEST_MAX_DELIVERIES", "5")),
                    queue_shards=int(os.environ.get("TEST_QUEUE_SHARDS", "1"))),
        WorkerConfig(janitor_interval_s=1.0,
                     shutdown_grace_s=float(os.environ.get("TEST_GRACE_S", "5")),
                     concurrency=int(os.environ.get("TEST_CONCURRENCY", "4")),
                     liveness_ms=int(os.environ.get("TEST_LIVENESS_MS", "1500"))))
    stage = STAGES[stage_name]
    worker: Worker = (JobWorker(stage, settings) if isinstance(stage, JobStage)
                      else SessionWorker(stage, settings))
    print(f"READY {worker.consumer}", flush=True)
    asyncio.run(worker.run(install_signals=True))


if __name__ == "__main__":
    main()

"""The chaos suite's CI part: the real product (two processes per worker stage, the
gateway, a real Redis, real speech in real time) hit at random moments of real turns
(``bench/chaos_harness.py``; the long run with its table is ``bench/chaos.py``).

Each scenario runs a turn with one fault aimed at the process doing that turn's work
(again, up to twice, if the work was done before the fault struck). Every turn must be
answered once, nothing shown twice, no key left without a TTL, no process crashed, and
a fault must have landed inside a turn (one that missed would make the test pass
without testing anything).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.chaos_harness import Chaos, Fleet, Probe, product_env, run_scenario, scripted_llm

CLAIM_IDLE_MS = 3000  # the "beyond the idle time" of SIGSTOP is this + 1 s
SEED = 13
SECRET = "chaos-test-secret-0123456789"

pytestmark = [pytest.mark.product, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def chaos(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    prefix = f"c{uuid.uuid4().hex[:9]}"
    logs = tmp_path_factory.mktemp("chaos-logs")
    with scripted_llm() as llm_url:
        fleet = Fleet(product_env(redis_url, prefix, llm_url, SECRET, CLAIM_IDLE_MS), logs)
        try:
            fleet.start()
            yield Chaos(fleet, Probe(redis_url, prefix), SECRET, random.Random(SEED))
        finally:
            fleet.stop()
            _delete_prefix(redis_url, prefix)


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _logs(chaos: Chaos) -> str:
    tails = [f"--- {p.log.name}\n" + p.log.read_text(errors="replace")[-3000:]
             for p in chaos.fleet.procs]
    return "\n".join(tails)


# rolling-restart: every worker gets SIGTERM in turn and is replaced while a conversation
# runs, as a Kubernetes rolling update does to each Deployment (deploy/k8s/README.md).
@pytest.mark.parametrize("scenario", ["kill-vad", "kill-asr", "kill-llm", "kill-tts",
                                      "sigstop-llm", "poison", "disconnects",
                                      "rolling-restart"])
def test_a_fault_in_a_turn_loses_and_duplicates_nothing(chaos: Chaos, scenario: str) -> None:
    # A fault that struck after the work was done proves nothing: up to 2 more turns.
    verdict = run_scenario(chaos, scenario, 1, CLAIM_IDLE_MS, retries=2)
    where = f"{verdict.row(None)}\nprocess logs: {Path(chaos.fleet.logs)}"
    assert any(f.landed for f in verdict.faults), where
    assert verdict.turns == verdict.completed, where + _logs(chaos)
    assert verdict.lost == verdict.duplicated == 0, where
    assert verdict.violations == [], where
    assert verdict.keys_without_ttl == [], where
    # The client saw every turn it was told of end (after a VAD takeover too: the new
    # owner ends the turn the device saw start).
    assert verdict.errors == [], where

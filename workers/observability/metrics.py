"""Stage metrics: what operators watch. Two outlets, both fed from the same numbers:

* **OpenTelemetry metrics** (``setup_metrics``, with an OTLP endpoint configured):
  a histogram ``voicebus.stage.duration`` (ms) per stage of each turn
  (``voicebus.stage``: turn_detect, asr, llm_ttft, llm_first_text, tts_first_chunk,
  end_of_speech_to_first_audio) and counters ``voicebus.turns`` (``interrupted``),
  ``voicebus.fallbacks`` (``kind``: llm_apology, tts_espeak) and
  ``voicebus.dead_letters`` (``stream``), exported every 10 s.
* **The bus itself**: the gateway appends each turn's breakdown to a capped stream
  (``Keys.turn_latency``), so ``voicebus status`` shows p50/p95/p99 per stage over a
  recent window with no collector at all (`recent_latency`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics

from workers.config import Config

log = logging.getLogger(__name__)

TURN_LATENCY_MAXLEN = 10_000
STAGES = ("end_of_speech_to_first_audio", "turn_detect", "asr", "llm_ttft", "llm_first_text",
          "tts_first_chunk")
_meter = metrics.get_meter("voicebus")
stage_duration = _meter.create_histogram(
    "voicebus.stage.duration", unit="ms", description="Latency of one stage of a turn")
turns = _meter.create_counter("voicebus.turns", description="Turns answered or cut off")
fallbacks = _meter.create_counter("voicebus.fallbacks", description="Fallbacks used")
dead_letters = _meter.create_counter("voicebus.dead_letters",
                                     description="Entries sent to the dead-letter stream")


def setup_metrics(config: Config, component: str) -> None:
    """Export OpenTelemetry metrics over OTLP when an endpoint is configured."""
    endpoint = config.tracing.otlp_endpoint
    if not config.tracing.enabled or not endpoint:
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    exporter: Any
    if config.tracing.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        exporter = HttpMetricExporter(endpoint=endpoint.rstrip("/") + "/v1/metrics")
    resource = Resource.create({"service.name": f"{config.tracing.service_name}-{component}"})
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[
        PeriodicExportingMetricReader(exporter, export_interval_millis=10_000)]))


def record_turn(latency_ms: dict[str, float], interrupted: bool, continued: bool = False) -> None:
    """A finished turn. A continued one (dropped: the user went on) counts, but its
    stage durations are not latencies anyone waited for."""
    if not continued:
        for stage, value in latency_ms.items():
            stage_duration.record(value, {"voicebus.stage": stage})
    turns.add(1, {"interrupted": interrupted, "continued": continued})


def turn_entry(latency_ms: dict[str, float], interrupted: bool, rule: str) -> dict[Any, Any]:
    """The fields of one ``Keys.turn_latency`` entry."""
    return {b"j": json.dumps({"latency_ms": latency_ms, "interrupted": interrupted,
                              "rule": rule}).encode()}


@dataclass
class StageLatency:
    stage: str
    count: int
    p50: float
    p95: float
    p99: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def recent_latency(entries: list[tuple[Any, dict[bytes, bytes]]]
                   ) -> tuple[list[StageLatency], int, int]:
    """Per-stage p50/p95/p99 of the given turn entries; also (turns, interrupted)."""
    values: dict[str, list[float]] = {s: [] for s in STAGES}
    count = interrupted = 0
    for _id, fields in entries:
        try:
            record = json.loads(fields[b"j"])
        except (KeyError, ValueError):
            continue
        count += 1
        interrupted += bool(record.get("interrupted"))
        for stage, value in record.get("latency_ms", {}).items():
            if stage in values and isinstance(value, int | float):
                values[stage].append(float(value))
    stats = [StageLatency(s, len(v), percentile(v, .5), percentile(v, .95), percentile(v, .99))
             for s, v in values.items() if v]
    return stats, count, interrupted


def window_start_id(window_s: float) -> str:
    return f"{int((time.time() - window_s) * 1000)}-0"

"""One trace per turn across processes: the span tree as the workers and the gateway
write it (real processes, real Redis, real models), after a reclaim too, and the
same spans arriving at a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from edge.audio_io import write_wav
from edge.auth import mint
from edge.client import talk_wavs
from schemas import TextChunk, Transcript
from tests.audio import GO_FORWARD, join, silence, speech
from tests.busutil import publish, read_all
from tests.conftest import ROOT, WorkerProcs, wait_for
from tests.support.openai_server import Script, ScriptedOpenAI
from voicebus.supervisor import Supervisor
from voicebus.traces import SpanRecord, read_spans, render, turns
from workers.backends.audio import float_to_pcm16
from workers.observability import semconv
from workers.runtime.keys import Keys

SECRET = "tracing-test-secret-0123456789"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def spans_of(path: Path, trace_id: str, names: set[str],
             timeout: float = 15) -> list[SpanRecord]:
    """The trace's spans once every name in ``names`` has arrived (batched exports)."""
    def found() -> list[SpanRecord] | None:
        spans = turns(read_spans(path)).get(trace_id, [])
        have = {s.name.split(" ")[0] for s in spans}
        return spans if names <= have else None
    result: list[SpanRecord] = wait_for(found, timeout=timeout, what=f"spans {names}")
    return result


@pytest.mark.timeout(300)
def test_a_turn_is_one_trace_across_every_process(redis_url: str, tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    prefix = f"tr{uuid.uuid4().hex[:8]}"
    env = {"VOICEBUS_REDIS__KEY_PREFIX": prefix, "VOICEBUS_GATEWAY__PORT": "0",
           "VOICEBUS_GATEWAY__SECRET": SECRET, "VOICEBUS_LLM__BACKEND": "echo",
           "VOICEBUS_TRACING__LOCAL_PATH": str(spans_file)}
    wav = tmp_path / "q.wav"
    write_wav(wav, float_to_pcm16(join(silence(0.4), speech(GO_FORWARD), silence(0.3))), 16000)
    with Supervisor(redis_url, env=env, log_stream=(tmp_path / "up.log").open("w")) as up:
        (turn,) = asyncio.run(talk_wavs(up.gateway_url, mint(SECRET.encode(), "tina", 60),
                                        [wav]))
    assert len(turn.trace_id) == 32
    spans = spans_of(spans_file, turn.trace_id, {
        semconv.TURN, semconv.TURN_DETECTION, semconv.ASR, semconv.LLM, semconv.TTS,
        semconv.PLAYBACK})
    root = next(s for s in spans if s.name == semconv.TURN)
    assert root.parent_id == "" and root.attributes[semconv.TURN_ID] == turn.turn_id
    others = [s for s in spans if s is not root]
    assert all(s.parent_id == root.span_id for s in others), [(s.name, s.parent_id)
                                                              for s in others]
    services = {s.name.split(" ")[0]: s.service for s in spans}
    # A tentatively ended turn has its commit in the trace too, from the VAD.
    assert services.pop(semconv.TURN_COMMIT, "voicebus-vad") == "voicebus-vad"
    assert services == {semconv.TURN: "voicebus-gateway", semconv.PLAYBACK: "voicebus-gateway",
                        semconv.TURN_DETECTION: "voicebus-vad", semconv.ASR: "voicebus-asr",
                        semconv.LLM: "voicebus-llm", semconv.TTS: "voicebus-tts"}
    # The stages happen inside the turn, in pipeline order. Every stage starts within the
    # turn; a job stage's span also covers the ack after its last output, so the last TTS
    # (or LLM) job may end just after the gateway sent the last byte and ended the root:
    # only the spans that end before the root by cause are held to its end.
    slack = 5_000_000  # 5 ms: one machine's clock, spans from different processes
    for span in others:
        assert root.start_ns - slack <= span.start_ns <= span.end_ns
        assert span.start_ns <= root.end_ns + slack
        if span.name in (semconv.TURN_DETECTION, semconv.PLAYBACK):
            assert span.end_ns <= root.end_ns + slack
    first = {name: min(s.start_ns for s in others if s.name.startswith(name))
             for name in (semconv.TURN_DETECTION, semconv.ASR, semconv.LLM, semconv.TTS,
                          semconv.PLAYBACK)}
    assert list(first) == sorted(first, key=lambda n: first[n])
    # Durations agree with the latency the gateway reported for the turn.
    detect = next(s for s in others if s.name == semconv.TURN_DETECTION)
    assert abs(detect.duration_ms - turn.latency_ms["turn_detect"]) < 150
    assert root.attributes[semconv.LATENCY_PREFIX + "end_of_speech_to_first_audio"] == (
        turn.latency_ms["end_of_speech_to_first_audio"])
    llm = next(s for s in others if s.name.startswith(semconv.LLM))
    assert llm.attributes[semconv.GEN_AI_OPERATION] == "chat"
    assert llm.attributes[semconv.GEN_AI_OUTPUT_TOKENS] > 0
    # What the user said and heard is not recorded unless configured.
    assert not any(k.startswith("voicebus.content.") for s in spans for k in s.attributes)
    waterfall = render(spans)
    assert f"turn {turn.turn_id}" in waterfall and "critical path" in waterfall
    # The same from the command line, by turn id and as the last turn.
    for args in ([turn.turn_id], ["--last", "1"]):
        shown = subprocess.run(
            [sys.executable, "-m", "voicebus", "trace", "--file", str(spans_file), *args],
            cwd=ROOT, text=True, capture_output=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        for name in (semconv.TURN_DETECTION, semconv.ASR, semconv.TTS, semconv.PLAYBACK):
            assert name in shown.stdout
        assert f"turn {turn.turn_id}" in shown.stdout


def test_a_reclaimed_turn_stays_in_its_trace(workers: WorkerProcs, sync_redis: redis.Redis,
                                             tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    pieces = [f"Part {i} of the answer. " for i in range(12)]
    # The first worker's reply waits (on the test, not the clock) until it is killed.
    mid_reply = threading.Event()
    with ScriptedOpenAI([Script.reply(pieces, hold=(3, mid_reply)),
                         Script.reply(pieces)]) as server:
        env = {"VOICEBUS_LLM__BASE_URL": server.url,
               "VOICEBUS_TRACING__LOCAL_PATH": str(spans_file)}
        # A long timeout: the held reply must not end as "stalled" before the kill.
        first = workers.start_cli("llm", **env, VOICEBUS_LLM__TIMEOUT="120")
        keys = Keys(workers.prefix)
        publish(sync_redis, keys.queue("llm"), Transcript(
            session_id="s1", turn_id="t1", text="tell me", traceparent=TRACEPARENT))

        def chunks() -> list[TextChunk]:
            return [e for e in read_all(sync_redis, keys.out("s1")) if isinstance(e, TextChunk)]

        wait_for(lambda: len(chunks()) >= 2, timeout=10, what="the first worker answering")
        workers.start_cli("llm", **env)
        first.kill()
        wait_for(lambda: any(c.last for c in chunks()), timeout=30, what="the reply's end")
    trace_id, root_id = TRACEPARENT.split("-")[1:3]
    spans = spans_of(spans_file, trace_id, {semconv.LLM})
    survivor = [s for s in spans if s.attributes.get(semconv.DELIVERIES, 0) >= 2]
    assert survivor, [(s.name, s.attributes) for s in spans]
    assert all(s.parent_id == root_id and s.trace_id == trace_id for s in spans)
    assert all(c.traceparent == TRACEPARENT for c in chunks())  # the context travels on


class _Receiver(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP receiver: decodes what arrives on /v1/traces and /v1/metrics."""

    received: list[ExportTraceServiceRequest] = []
    metrics: list[ExportMetricsServiceRequest] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path.endswith("/v1/metrics"):
            metric_request = ExportMetricsServiceRequest()
            metric_request.ParseFromString(body)
            _Receiver.metrics.append(metric_request)
        else:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            _Receiver.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[str]:
    _Receiver.received, _Receiver.metrics = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_spans_and_metrics_are_exported_over_otlp_http(
        workers: WorkerProcs, sync_redis: redis.Redis, otlp_receiver: str) -> None:
    # The model fails twice (the retry too): the apology is spoken, a fallback counted.
    with ScriptedOpenAI([Script.error(503)]) as server:
        proc = workers.start_cli("llm", VOICEBUS_LLM__BASE_URL=server.url,
                                 OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver)
        keys = Keys(workers.prefix)
        publish(sync_redis, keys.queue("llm"), Transcript(
            session_id="s2", turn_id="t2", text="hi", traceparent=TRACEPARENT))
        wait_for(lambda: any(isinstance(e, TextChunk) and e.last
                             for e in read_all(sync_redis, keys.out("s2"))), timeout=15)
        proc.terminate()  # a clean stop flushes the batch
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not _Receiver.received and time.monotonic() < deadline:
        time.sleep(0.1)
    spans = [(resource, span) for request in _Receiver.received
             for resource in request.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    assert spans, "nothing arrived at the OTLP receiver"
    resource, span = spans[0]
    service = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert service["service.name"] == "voicebus-llm"
    assert span.name.startswith(semconv.LLM)
    assert span.trace_id.hex() == TRACEPARENT.split("-")[1]
    assert span.parent_span_id.hex() == TRACEPARENT.split("-")[2]
    attrs = {a.key for a in span.attributes}
    assert {semconv.GEN_AI_REQUEST_MODEL, semconv.OUTCOME} <= attrs
    counted = {m.name: m for request in _Receiver.metrics for resource in request.resource_metrics
               for scope in resource.scope_metrics for m in scope.metrics}
    assert "voicebus.fallbacks" in counted, sorted(counted)
    (point,) = counted["voicebus.fallbacks"].sum.data_points
    assert point.as_int == 1
    assert {a.key: a.value.string_value for a in point.attributes} == {"kind": "llm_apology"}

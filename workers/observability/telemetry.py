"""OpenTelemetry tracing for every voicebus process: one trace per turn, across processes.

``setup_tracing(config, component)`` once per process. Spans go to:

* an OTLP endpoint (``tracing.otlp_endpoint`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``;
  ``tracing.otlp_protocol`` ``http/protobuf`` or ``grpc``) — how they reach Jaeger;
* otherwise the local file ``tracing.local_path``: OTLP/JSON, one
  ``ExportTraceServiceRequest`` per line (ids in hex, as the OTLP file exporter
  specification writes them), appended by every process of the machine, so
  nothing is lost on a laptop and ``voicebus trace`` can draw a turn from it.

Trace context travels inside the events (``traceparent``/``tracestate``):
`parent_of(event)` turns it back into a parent, whichever process or machine
handles the event, also after a reclaim by another worker.

The root ``turn`` span must have the span id that the VAD put into the turn's
``traceparent`` when the turn began (every stage span names it as parent), but it
is recorded at the end of the turn by the gateway: `root_span_ids` makes the
next span started in this thread get exactly those ids.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from workers.config import Config

log = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
MAX_FILE_BYTES = 64 << 20  # the local span file is rotated to <path>.1 beyond this


class TurnIdGenerator(RandomIdGenerator):
    """Random ids, except that the ids set by `root_span_ids` go to the next span."""

    def __init__(self) -> None:
        self._preset = threading.local()

    def _take(self, name: str) -> int | None:
        """The preset id ``name`` (once), or None."""
        preset = getattr(self._preset, name, None)
        setattr(self._preset, name, None)
        return None if preset is None else int(preset)

    def generate_span_id(self) -> int:
        preset = self._take("span_id")
        return super().generate_span_id() if preset is None else preset

    def generate_trace_id(self) -> int:
        preset = self._take("trace_id")
        return super().generate_trace_id() if preset is None else preset


_ids = TurnIdGenerator()


class JsonLinesExporter(SpanExporter):
    """OTLP/JSON lines in a local file (the OTLP file exporter's format)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from google.protobuf.json_format import MessageToDict
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        request = MessageToDict(encode_spans(spans))
        _hex_ids(request)
        line = (json.dumps(request, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                with contextlib.suppress(FileNotFoundError):
                    if self.path.stat().st_size > MAX_FILE_BYTES:
                        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                # One write() per line in append mode: lines of concurrent processes
                # do not interleave.
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.warning("could not write spans to %s: %s", self.path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _hex_ids(node: Any) -> None:
    """protobuf's JSON writes bytes as base64; OTLP/JSON wants trace and span ids in hex."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


def _exporter(config: Config) -> SpanExporter:
    endpoint = config.tracing.otlp_endpoint
    if not endpoint:
        return JsonLinesExporter(config.tracing.local_path)
    if config.tracing.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else (
        endpoint.rstrip("/") + "/v1/traces")
    return HttpExporter(endpoint=url)


def setup_tracing(config: Config, component: str) -> None:
    """Install this process's tracer provider (once; a no-op if tracing is disabled)."""
    global _provider
    if not config.tracing.enabled or _provider is not None:
        return
    resource = Resource.create({"service.name": f"{config.tracing.service_name}-{component}",
                                "service.namespace": config.tracing.service_name,
                                "voicebus.component": component})
    provider = TracerProvider(resource=resource, id_generator=_ids)
    exporter = _exporter(config)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    atexit.register(shutdown_tracing)
    where = config.tracing.otlp_endpoint or str(Path(config.tracing.local_path).expanduser())
    log.info("tracing to %s", where)


def shutdown_tracing() -> None:
    """Flush and stop: spans still buffered are written before the process exits."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer("voicebus")


def parent_of(traceparent: str, tracestate: str = "") -> otel_context.Context | None:
    """The context an event's ``traceparent`` names (None: the event carries none)."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier)


@contextlib.contextmanager
def root_span_ids(traceparent: str) -> Iterator[bool]:
    """Make the next span started in this thread the one ``traceparent`` names.

    Yields False (and does nothing) when ``traceparent`` is not a valid one.
    """
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        yield False
        return
    _ids._preset.trace_id, _ids._preset.span_id = int(parts[1], 16), int(parts[2], 16)
    try:
        yield True
    finally:
        _ids._preset.trace_id = _ids._preset.span_id = None

"""``voicebus trace``: a turn's waterfall in the terminal, from the local span file.

Reads the OTLP/JSON lines every voicebus process appends to
``tracing.local_path`` (``workers.observability.telemetry.JsonLinesExporter``), groups spans by
trace (one trace is one turn), and draws each turn: its stages, when each started
relative to the user's speech, how long it took, and the critical path (the
chain of spans that ends last, each starting after the previous one began).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.observability import semconv

BAR_WIDTH = 48


@dataclass
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    service: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    return None


def _attributes(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in items}


def read_spans(path: str | Path) -> list[SpanRecord]:
    """Every span in the file; unreadable lines are skipped (a file being written)."""
    spans: list[SpanRecord] = []
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        for resource_spans in request.get("resourceSpans", []):
            resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for s in scope_spans.get("spans", []):
                    spans.append(SpanRecord(
                        trace_id=s.get("traceId", ""), span_id=s.get("spanId", ""),
                        parent_id=s.get("parentSpanId", ""), name=s.get("name", ""),
                        start_ns=int(s.get("startTimeUnixNano", 0)),
                        end_ns=int(s.get("endTimeUnixNano", 0)),
                        service=str(resource.get("service.name", "")),
                        attributes=_attributes(s.get("attributes", []))))
    return spans


def turns(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    """Spans by trace id, each trace's spans in start order."""
    grouped: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        grouped[span.trace_id].append(span)
    return {t: sorted(s, key=lambda x: x.start_ns) for t, s in grouped.items()}


def root_of(spans: list[SpanRecord]) -> SpanRecord | None:
    return next((s for s in spans if s.name == semconv.TURN and not s.parent_id), None)


def select(spans: list[SpanRecord], turn_id: str | None, last: int) -> list[list[SpanRecord]]:
    """The traces to show: the one whose turn id (or trace id) matches, or the last N."""
    by_trace = turns(spans)
    if turn_id:
        return [s for t, s in by_trace.items() if t == turn_id or any(
            x.attributes.get(semconv.TURN_ID) == turn_id for x in s)]
    ordered = sorted(by_trace.values(), key=lambda s: (root_of(s) or s[0]).end_ns)
    with_root = [s for s in ordered if root_of(s) is not None]
    return (with_root or ordered)[-last:]


def critical_path(spans: list[SpanRecord]) -> list[SpanRecord]:
    """The chain of stages the turn waited on: from the stage span that ended last, back
    through the span that started last before each one started (what set it going; in
    a streaming pipeline stages overlap, so "ended before" would skip the LLM that was
    still typing when TTS began)."""
    stages = [s for s in spans if s.name != semconv.TURN]
    if not stages:
        return []
    path = [max(stages, key=lambda s: s.end_ns)]
    while True:
        before = [s for s in stages if s.start_ns < path[-1].start_ns and s not in path]
        if not before:
            return list(reversed(path))
        path.append(max(before, key=lambda s: s.start_ns))


def render(spans: list[SpanRecord]) -> str:
    root = root_of(spans)
    start = root.start_ns if root else min(s.start_ns for s in spans)
    end = max([s.end_ns for s in spans] + ([root.end_ns] if root else []))
    total = max(end - start, 1)
    critical = {s.span_id for s in critical_path(spans)}
    title = root.attributes.get(semconv.TURN_ID, "?") if root else "?"
    lines = [f"turn {title}  trace {spans[0].trace_id}  {total / 1e6:.0f} ms"
             + ("  (interrupted)" if root and root.attributes.get(semconv.INTERRUPTED) else "")
             + ("" if root else "  (no root span: the gateway did not record this turn)")]
    width = max(len(_label(s)) for s in spans)
    for span in spans:
        offset = (span.start_ns - start) / total
        length = max((span.end_ns - span.start_ns) / total, 1 / BAR_WIDTH)
        left = round(offset * BAR_WIDTH)
        bar = " " * left + "█" * max(1, round(length * BAR_WIDTH))
        mark = "*" if span.span_id in critical else " "
        lines.append(f"{mark} {_label(span):<{width}}  {(span.start_ns - start) / 1e6:>7.0f} "
                     f"{span.duration_ms:>7.0f} ms  |{bar:<{BAR_WIDTH}}|")
    lines.append(f"  {'':<{width}}  {'start':>7} {'took':>7}     * critical path")
    if root:
        lat = {k[len(semconv.LATENCY_PREFIX):]: v for k, v in root.attributes.items()
               if k.startswith(semconv.LATENCY_PREFIX)}
        if lat:
            lines.append("  latency: " + ", ".join(f"{k} {v:.0f} ms" for k, v in lat.items()))
    return "\n".join(lines)


def _label(span: SpanRecord) -> str:
    extra = ""
    if span.name.startswith(semconv.TTS):
        extra = f" #{span.attributes.get(semconv.TTS_SEQ, '?')}"
    elif span.name == semconv.ASR and span.attributes.get(semconv.SPECULATIVE):
        extra = " (speculative)"
    elif span.name == semconv.TURN_DETECTION:
        extra = f" ({span.attributes.get(semconv.TURN_RULE, '')})"
    deliveries = span.attributes.get(semconv.DELIVERIES)
    if isinstance(deliveries, int) and deliveries > 1:
        extra += f" [delivery {deliveries}]"
    return f"{span.name}{extra}"

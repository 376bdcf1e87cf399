"""The per-turn report: what ``turn_done`` tells the device, the turn's root and
playback spans, and its latency in the metrics and the ``turn_latency`` stream."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis.asyncio as aioredis
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError

from edge import protocol
from edge.turn_state import TurnState
from workers.observability import metrics, semconv, telemetry
from workers.runtime.keys import Keys


def turn_done_message(turn: TurnState, interrupted: bool) -> protocol.TurnDone:
    return protocol.TurnDone(turn.turn_id, interrupted, turn.continued, turn.continues,
                             turn.trace_id, turn.rule, turn.latency_ms())


async def record_latency(redis: aioredis.Redis, keys: Keys, turn: TurnState,
                         interrupted: bool) -> None:
    """The turn's latency into the metrics and, unless it was a continued fragment (not
    a turn the user waited for), the ``turn_latency`` stream (best effort)."""
    latency = turn.latency_ms()
    metrics.record_turn(latency, interrupted, turn.continued)
    if turn.continued:
        return
    with contextlib.suppress(RedisError, OSError):
        await redis.xadd(keys.turn_latency(), metrics.turn_entry(latency, interrupted, turn.rule),
                         maxlen=metrics.TURN_LATENCY_MAXLEN, approximate=True)


def record_spans(turn: TurnState, session_id: str, user_id: str,
                 interrupted: bool) -> None:
    """The turn's root span (speech start -> now: the last byte sent, or the cut) and
    the playback span, with the ids the turn's events already name as parent."""
    now = time.time_ns()
    start = turn.speech_start_ns or turn.speech_end_ns or turn.decided_ns or now
    outcome = "continued" if turn.continued else "interrupted" if interrupted else "answered"
    attributes: dict[str, Any] = {
        semconv.SESSION_ID: session_id, semconv.TURN_ID: turn.turn_id,
        semconv.USER_ID: user_id, semconv.INTERRUPTED: interrupted,
        semconv.TURN_RULE: turn.rule, semconv.TURN_OUTCOME: outcome,
        **({semconv.TURN_CONTINUES: turn.continues} if turn.continues else {}),
        **{semconv.LATENCY_PREFIX + k: v for k, v in turn.latency_ms().items()}}
    tracer = telemetry.tracer()
    if turn.continued:
        # The trace's root is recorded by the turn that continues this one (the same
        # trace covers the whole utterance); this one is a marked child of it.
        if turn.traceparent:
            tracer.start_span(semconv.TURN_CONTINUED, start_time=min(start, now),
                              context=telemetry.parent_of(turn.traceparent),
                              attributes=attributes).end(end_time=now)
        return
    with telemetry.root_span_ids(turn.traceparent) as preset:
        if not preset:
            return  # events without trace context (a producer that sets none)
        tracer.start_span(semconv.TURN, start_time=min(start, now), attributes=attributes,
                          kind=SpanKind.SERVER).end(end_time=now)
    if turn.first_sent_ns is not None:
        tracer.start_span(semconv.PLAYBACK, context=telemetry.parent_of(turn.traceparent),
                          start_time=turn.first_sent_ns, attributes={
                              semconv.SENT_SAMPLES: turn.sent_samples,
                              semconv.INTERRUPTED: interrupted}).end(end_time=now)

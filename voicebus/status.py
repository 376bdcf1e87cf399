"""``voicebus status``: the operator's first look at a live bus.

For every stream under the key prefix: its length against its high-water mark
(flagged above 80 %, the seed's alert), its consumer groups with consumers,
pending count and the age of the oldest pending entry, and the dead letters.
Per-session streams (thousands on a busy system) are summarised per kind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from schemas import DeadLetter, SchemaError, decode
from workers.observability.metrics import StageLatency, recent_latency, window_start_id
from workers.runtime.bus import FIELD, as_str
from workers.runtime.keys import Keys

ALERT_FILL = 0.8
LATENCY_WINDOW_S = 600.0  # per-stage percentiles over the turns of the last 10 minutes


@dataclass
class GroupStatus:
    name: str
    consumers: int
    pending: int
    oldest_pending_age_s: float | None  # since the entry was added
    oldest_pending_idle_s: float | None  # since it was last delivered
    consumer_names: list[str] = field(default_factory=list)
    # Entries not yet delivered to the group (Redis 7's XINFO lag; None where Redis
    # cannot tell, e.g. after entries were deleted mid-stream): what KEDA scales on.
    lag: int | None = None


@dataclass
class StreamStatus:
    key: str
    kind: str
    length: int
    high_water: int
    groups: list[GroupStatus]

    @property
    def fill(self) -> float:
        return self.length / self.high_water if self.high_water else 0.0

    @property
    def alert(self) -> bool:
        return self.fill > ALERT_FILL


@dataclass
class Report:
    prefix: str
    streams: list[StreamStatus]
    dead_letters: int
    recent_dead_letters: list[str]
    latency: list[StageLatency] = field(default_factory=list)  # over window_s
    window_s: float = LATENCY_WINDOW_S
    turns: int = 0
    interrupted: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for s, raw in zip(self.streams, data["streams"], strict=True):
            raw.update(fill=round(s.fill, 4), alert=s.alert)
        return data


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


async def _group(r: aioredis.Redis, stream: str, info: dict[Any, Any]) -> GroupStatus:
    name = as_str(info["name"])
    pending = int(info["pending"])
    age = idle = None
    names: list[str] = []
    if int(info["consumers"]):
        names = [as_str(c["name"]) for c in await r.xinfo_consumers(stream, name)]
    if pending:
        summary = await r.xpending(stream, name)
        oldest = as_str(summary["min"])
        age = max(0.0, time.time() - _id_ms(oldest) / 1000)
        rows = await r.xpending_range(stream, name, min=oldest, max=oldest, count=1)
        idle = int(rows[0]["time_since_delivered"]) / 1000 if rows else None
    lag = info.get("lag")
    return GroupStatus(name, int(info["consumers"]), pending, age, idle, names,
                       None if lag is None else int(lag))


async def collect(r: aioredis.Redis, keys: Keys, maxlen: dict[str, int]) -> Report:
    streams: list[StreamStatus] = []
    async for raw_key in r.scan_iter(match=keys.pattern(), count=1000, _type="STREAM"):
        key = as_str(raw_key)
        kind = keys.kind(key)
        if kind is None:
            continue
        groups = [await _group(r, key, g) for g in await r.xinfo_groups(key)]
        streams.append(StreamStatus(key, kind, int(await r.xlen(key)), maxlen.get(kind, 0),
                                    groups))
    streams.sort(key=lambda s: (s.kind, s.key))
    dead_key = keys.dead_letter()
    recent: list[str] = []
    newest: list[Any] = await r.xrevrange(dead_key, count=5) or []
    for entry_id, fields in newest:
        try:
            letter = decode(fields[FIELD])
            if isinstance(letter, DeadLetter):
                recent.append(f"{letter.stream} {letter.entry_id}: {letter.reason}")
        except (SchemaError, KeyError):
            recent.append(f"{as_str(entry_id)}: (unreadable dead letter)")
    window: Any = await r.xrange(keys.turn_latency(), min=window_start_id(LATENCY_WINDOW_S),
                                 max="+")
    latency, turns, interrupted = recent_latency(window)
    return Report(keys.prefix, streams, int(await r.xlen(dead_key)), recent, latency,
                  LATENCY_WINDOW_S, turns, interrupted)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def render(report: Report, *, per_session: bool = False) -> str:
    """A table; per-session streams are folded into one line per kind unless asked."""
    lines = [f"voicebus bus status (prefix {report.prefix!r})", ""]
    header = f"{'stream':<34} {'length':>8} {'fill':>6} {'group':<8} {'cons':>4} " \
             f"{'lag':>6} {'pending':>7} {'oldest':>7} {'idle':>7}"
    lines += [header, "-" * len(header)]
    shared = [s for s in report.streams if s.kind not in ("audio", "out") or per_session]
    folded = [s for s in report.streams if s not in shared]
    for s in shared:
        lines += _stream_lines(s.key, s.length, s.fill, s.alert, s.groups)
    for kind in ("audio", "out"):
        of_kind = [s for s in folded if s.kind == kind]
        if not of_kind:
            continue
        worst = max(of_kind, key=lambda s: s.fill)
        groups = [g for s in of_kind for g in s.groups]
        merged = GroupStatus(
            name=groups[0].name if groups else "-",
            consumers=len({n for g in groups for n in g.consumer_names}),
            pending=sum(g.pending for g in groups),
            oldest_pending_age_s=max((g.oldest_pending_age_s or 0 for g in groups), default=None),
            oldest_pending_idle_s=max((g.oldest_pending_idle_s or 0 for g in groups),
                                      default=None),
            lag=sum(g.lag or 0 for g in groups),
        )
        label = f"{report.prefix}:{{*}}:{kind} ({len(of_kind)} sessions)"
        lines += _stream_lines(label, sum(s.length for s in of_kind), worst.fill, worst.alert,
                               [merged] if groups else [])
    lines += ["", f"dead letters: {report.dead_letters}"]
    lines += [f"  {r}" for r in report.recent_dead_letters]
    lines += ["", f"turns in the last {report.window_s / 60:.0f} min: {report.turns} "
              f"({report.interrupted} interrupted)"]
    if report.latency:
        lines.append(f"  {'stage (ms)':<30} {'n':>5} {'p50':>7} {'p95':>7} {'p99':>7}")
        for st in report.latency:
            lines.append(f"  {st.stage:<30} {st.count:>5} {st.p50:>7.0f} {st.p95:>7.0f} "
                         f"{st.p99:>7.0f}")
    alerts = [s.key for s in report.streams if s.alert]
    if alerts:
        lines += ["", f"ALERT: above {ALERT_FILL:.0%} of high-water mark: " + ", ".join(alerts)]
    return "\n".join(lines)


def _stream_lines(label: str, length: int, fill: float, alert: bool,
                  groups: list[GroupStatus]) -> list[str]:
    flag = "!" if alert else " "
    head = f"{label:<34} {length:>8} {fill:>5.0%}{flag}"
    if not groups:
        return [f"{head} {'(no group)':<8}"]
    out = []
    for i, g in enumerate(groups):
        prefix = head if i == 0 else " " * len(head)
        lag = "-" if g.lag is None else str(g.lag)
        out.append(f"{prefix} {g.name:<8} {g.consumers:>4} {lag:>6} {g.pending:>7} "
                   f"{_age(g.oldest_pending_age_s):>7} {_age(g.oldest_pending_idle_s):>7}")
    return out

"""Per-user pause lengths (``vad.adaptive``): some people pause long mid-sentence.

Every time a user goes on after a pause inside their turn (or continues a turn that
was cut), the pause is folded into a running average kept in Redis per user
(exponential, weight ``adjustment_rate``; expires after ``ttl_s`` of silence from
them). The detector's waits that let a reply play — the commit wait
(``commit_silence``) and the silence timeout (without the text signal, also the
probable-end wait, which then commits at once) — are stretched to cover ``margin``
times that average (the user's *allowance*), between 1x and ``max_stretch`` x their
configured value:

    allowance = margin * average_pause
    wait      = clamp(allowance, configured, max_stretch * configured)  (the detector)

A user whose inner pauses average 0.3 s keeps the defaults; one who averages 0.6 s
has their replies committed after 1.2 s of silence instead of 0.7 s; one who averages
1.2 s waits 2.4 s instead of 1.5 s before the silence timeout ends a turn. The commit
wait is the one that decides whether a pause cuts the turn (the reply plays); it is
stretched for the users whose own pauses show they go on after such points (not after
a question, which yields the turn whoever asks it).
The immediate (tentative) Smart Turn end is not stretched: the reply is prepared at
once, and only its playing waits.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from workers.config import AdaptiveConfig

log = logging.getLogger(__name__)

# KEYS: the user's hash. ARGV: the pause (s), the weight, ttl. Returns the new average.
_LEARN = """
local avg = tonumber(redis.call('HGET', KEYS[1], 'avg'))
local x = tonumber(ARGV[1])
if avg == nil then avg = x else avg = avg + tonumber(ARGV[2]) * (x - avg) end
redis.call('HSET', KEYS[1], 'avg', tostring(avg))
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return tostring(avg)
"""


def allowance(cfg: AdaptiveConfig, average_pause_s: float | None) -> float:
    """The silence (s) this user's waits cover; 0 while nothing is learned (or off)."""
    if not cfg.enabled or average_pause_s is None:
        return 0.0
    return cfg.margin * average_pause_s


class PauseProfile:
    """One user's learned pause average, read once per session and updated per pause."""

    def __init__(self, client: aioredis.Redis, key: str, cfg: AdaptiveConfig,
                 silence_timeout_s: float) -> None:
        self.redis = client
        self.key = key
        self.cfg = cfg
        self.silence_timeout_s = silence_timeout_s
        self.average_s: float | None = None
        self._learn = client.register_script(_LEARN)

    @property
    def allowance_s(self) -> float:
        return allowance(self.cfg, self.average_s)

    async def load(self) -> float:
        """Read the user's average (best effort: no Redis, the defaults); the allowance."""
        try:
            raw = await self.redis.hget(self.key, "avg")
        except (RedisError, OSError) as exc:
            log.warning("could not read learned pauses (%s); using the defaults", exc)
            return self.allowance_s
        self.average_s = float(raw) if raw is not None else None
        return self.allowance_s

    async def learn(self, pause_s: float) -> float:
        """Fold one inner pause in; the new allowance."""
        cap = self.silence_timeout_s * self.cfg.max_stretch  # a long gap says little more
        try:
            raw = await self._learn(keys=[self.key], args=[
                f"{min(pause_s, cap):.3f}", self.cfg.adjustment_rate, self.cfg.ttl_s])
        except (RedisError, OSError) as exc:
            log.warning("could not store a learned pause (%s)", exc)
            return self.allowance_s
        self.average_s = float(raw)
        return self.allowance_s

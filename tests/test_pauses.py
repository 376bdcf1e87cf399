"""Learned per-user pause lengths (vad.adaptive) against a real Redis."""

from __future__ import annotations

import pytest

from workers.config import AdaptiveConfig
from workers.runtime.bus import connect
from workers.runtime.keys import Keys
from workers.vad.pauses import PauseProfile, stretch


def test_the_stretch_rule_and_its_bounds() -> None:
    cfg = AdaptiveConfig()  # margin 2, max 2x
    assert stretch(cfg, None, 1.5) == 1.0  # nothing learned yet
    assert stretch(cfg, 0.4, 1.5) == 1.0  # short pauses: the defaults
    assert stretch(cfg, 1.2, 1.5) == pytest.approx(1.6)  # 2 x 1.2 s = 2.4 s = 1.6 x 1.5 s
    assert stretch(cfg, 5.0, 1.5) == 2.0  # capped
    assert stretch(AdaptiveConfig(enabled=False), 1.2, 1.5) == 1.0


async def test_pauses_are_learned_per_user_and_expire(redis_url: str, prefix: str) -> None:
    client = connect(redis_url)
    keys = Keys(prefix)
    try:
        cfg = AdaptiveConfig(adjustment_rate=0.5, ttl_s=60)
        slow = PauseProfile(client, keys.user_pauses("slow"), cfg, 1.5)
        assert await slow.load() == 1.0
        await slow.learn(1.0)  # the first pause is the average
        assert slow.average_s == pytest.approx(1.0)
        assert await slow.learn(1.4) == pytest.approx(2 * 1.2 / 1.5)  # (1.0 + 1.4) / 2
        again = PauseProfile(client, keys.user_pauses("slow"), cfg, 1.5)  # a new session
        assert await again.load() == pytest.approx(1.6)
        other = PauseProfile(client, keys.user_pauses("quick"), cfg, 1.5)
        assert await other.load() == 1.0  # users never share what was learned
        assert 0 < await client.ttl(keys.user_pauses("slow")) <= 60
        await slow.learn(60.0)  # a gap of a minute says little more than a long pause
        assert slow.average_s is not None and slow.average_s <= (1.2 + 3.0) / 2 + 1e-6
    finally:
        await client.aclose()

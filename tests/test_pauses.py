"""Learned per-user pause lengths (vad.adaptive) against a real Redis."""

from __future__ import annotations

import pytest

from workers.config import AdaptiveConfig
from workers.runtime.connection import connect
from workers.runtime.keys import Keys
from workers.vad.pauses import PauseProfile, allowance


def test_the_allowance_is_margin_times_the_average_pause() -> None:
    cfg = AdaptiveConfig()  # margin 2
    assert allowance(cfg, None) == 0.0  # nothing learned yet: the defaults
    assert allowance(cfg, 0.3) == pytest.approx(0.6)  # within a 0.7 s commit wait
    assert allowance(cfg, 1.2) == pytest.approx(2.4)  # 1.6 x a 1.5 s silence timeout
    assert allowance(AdaptiveConfig(enabled=False), 1.2) == 0.0


async def test_pauses_are_learned_per_user_and_expire(redis_url: str, prefix: str) -> None:
    client = connect(redis_url)
    keys = Keys(prefix)
    try:
        cfg = AdaptiveConfig(adjustment_rate=0.5, ttl_s=60)
        slow = PauseProfile(client, keys.user_pauses("slow"), cfg, 1.5)
        assert await slow.load() == 0.0
        await slow.learn(1.0)  # the first pause is the average
        assert slow.average_s == pytest.approx(1.0)
        assert await slow.learn(1.4) == pytest.approx(2 * 1.2)  # (1.0 + 1.4) / 2
        again = PauseProfile(client, keys.user_pauses("slow"), cfg, 1.5)  # a new session
        assert await again.load() == pytest.approx(2.4)
        other = PauseProfile(client, keys.user_pauses("quick"), cfg, 1.5)
        assert await other.load() == 0.0  # users never share what was learned
        assert 0 < await client.ttl(keys.user_pauses("slow")) <= 60
        await slow.learn(60.0)  # a gap of a minute says little more than a long pause
        assert slow.average_s is not None and slow.average_s <= (1.2 + 3.0) / 2 + 1e-6
    finally:
        await client.aclose()

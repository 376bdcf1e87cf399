"""The LLM stage's handler on events, in process, its memory in a real redis-server
(bus tier): what the gateway reports as heard narrows the stored reply."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from schemas import Heard, Transcript
from tests.support.handlers import run_handler
from workers.config import Config, LlmConfig, RedisConfig
from workers.llm.memory import ConversationMemory
from workers.llm_worker import build
from workers.runtime.keys import Keys


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


def config(prefix: str) -> Config:
    return Config(redis=RedisConfig(key_prefix=prefix), llm=LlmConfig(backend="echo"))


async def test_what_was_heard_replaces_the_stored_reply(client: aioredis.Redis,
                                                        prefix: str) -> None:
    stage = build(config(prefix))
    memory = ConversationMemory(client, prefix)
    ask = Transcript(session_id="s1", turn_id="t1", user_id="ann", text="Tell me a story.")
    emits = await run_handler(stage.handle, [ask], redis=client, keys=Keys(prefix))
    assert emits  # the echo backend answered and the reply was stored
    reply = (await memory.history("ann"))[-1]
    assert reply.role == "assistant" and len(reply.content.split()) > 3
    heard = " ".join(reply.content.split()[:2])
    out = await run_handler(stage.handle, [Heard(session_id="s1", turn_id="t1", user_id="ann",
                                                 text=heard, played_samples=100,
                                                 sent_samples=900)],
                            redis=client, keys=Keys(prefix))
    assert out == []  # nothing to say: it only narrows memory
    last = (await memory.history("ann"))[-1]
    assert last.content == heard and last.interrupted


async def test_a_report_before_the_reply_is_stored_is_kept_for_it(client: aioredis.Redis,
                                                                  prefix: str) -> None:
    stage = build(config(prefix))
    await run_handler(stage.handle, [Heard(session_id="s2", turn_id="t9", user_id="bo",
                                           text="Well,")], redis=client, keys=Keys(prefix))
    memory = ConversationMemory(client, prefix)
    await memory.append("bo", "user", "Hi.", turn_id="t9")
    await memory.append("bo", "assistant", "Well, hello there, how can I help?", turn_id="t9",
                        interrupted=True)
    assert (await memory.history("bo"))[-1].content == "Well,"

"""ConversationMemory against a real Redis; every test has its own key prefix."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from workers.config import ContextWindowConfig, MemoryConfig
from workers.llm.memory import (
    INTERRUPTED_NOTE,
    MAX_CONTENT_BYTES,
    SUMMARY_PREFIX,
    ConversationMemory,
    prompt_tokens,
)
from workers.runtime.connection import connect

SYSTEM = "You are a helpful voice assistant."


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def mem(client: aioredis.Redis, prefix: str) -> ConversationMemory:
    return ConversationMemory(client, prefix, MemoryConfig(), ContextWindowConfig())


async def fill(mem: ConversationMemory, user: str, n: int, size: int = 10) -> None:
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        await mem.append(user, role, f"m{i:03d} " + "x" * size)


async def test_second_turn_sees_first(mem: ConversationMemory) -> None:
    await mem.append("alice", "user", "Hi, my name is Zelda.")
    await mem.append("alice", "assistant", "Nice to meet you, Zelda.")
    msgs = await mem.prompt("alice", SYSTEM, "What is my name?")
    assert msgs[0] == {"role": "system", "content": SYSTEM}
    assert msgs[-1] == {"role": "user", "content": "What is my name?"}
    assert {"role": "user", "content": "Hi, my name is Zelda."} in msgs
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


async def test_cap_and_ttl(mem: ConversationMemory, client: aioredis.Redis) -> None:
    await mem.append("bob", "user", "first")
    await mem.replace_with_summary("bob", "s", [])  # no-op: nothing covered
    hist = await mem.history("bob")
    assert await mem.replace_with_summary("bob", "Bob said first.", hist) == 1
    await fill(mem, "bob", 60)
    hist = await mem.history("bob")
    assert len(hist) == 50
    assert [h.content[:4] for h in hist] == [f"m{i:03d}" for i in range(10, 60)]
    ttl = MemoryConfig().message_ttl
    for key in (mem.messages_key("bob"), mem.summary_key("bob")):
        t = await client.ttl(key)
        assert 0 < t <= ttl, key


async def test_summarize_flow_with_concurrent_append(mem: ConversationMemory) -> None:
    await fill(mem, "carol", 45)
    assert await mem.needs_summary("carol")
    old = await mem.to_summarize("carol")
    assert len(old) == 35
    assert old[0].content.startswith("m000") and old[-1].content.startswith("m034")
    # The slow LLM summary runs here; the user keeps talking meanwhile.
    await mem.append("carol", "user", "said during summarization")
    removed = await mem.replace_with_summary("carol", "Carol likes sailing.", old)
    assert removed == 35
    hist = await mem.history("carol")
    assert [h.content[:4] for h in hist[:10]] == [f"m{i:03d}" for i in range(35, 45)]
    assert hist[-1].content == "said during summarization"
    assert len(hist) == 11
    assert await mem.summary("carol") == "Carol likes sailing."
    assert not await mem.needs_summary("carol")
    msgs = await mem.prompt("carol", SYSTEM, "hello")
    assert msgs[1] == {"role": "system", "content": SUMMARY_PREFIX + "Carol likes sailing."}
    # A second, stale replace of the same messages changes nothing.
    assert await mem.replace_with_summary("carol", "stale", old) == -1
    assert await mem.summary("carol") == "Carol likes sailing."
    assert len(await mem.history("carol")) == 11


async def test_concurrent_appends_racing_replace(mem: ConversationMemory) -> None:
    await fill(mem, "dave", 40)
    old = await mem.to_summarize("dave")
    assert len(old) == 30
    extra = [f"late {i}" for i in range(20)]
    results = await asyncio.gather(
        mem.replace_with_summary("dave", "summary", old),
        *(mem.append("dave", "user", t) for t in extra),
    )
    assert results[0] >= 0
    hist = [h.content for h in await mem.history("dave")]
    assert all(t in hist for t in extra)  # no concurrent append lost
    assert not any(c.startswith(f"m{i:03d}") for i in range(30) for c in hist)
    kept = [c for c in hist if c.startswith("m")]
    assert kept == [f"m{i:03d} " + "x" * 10 for i in range(30, 40)]


async def test_head_trimmed_by_cap_during_summarization(mem: ConversationMemory) -> None:
    await fill(mem, "erin", 45)
    old = await mem.to_summarize("erin")
    await fill(mem, "erin", 8)  # 53 -> capped to 50: the first 3 summarised ones are gone
    assert await mem.replace_with_summary("erin", "sum", old) == 32
    hist = await mem.history("erin")
    assert len(hist) == 18
    assert hist[0].content.startswith("m035")


@pytest.mark.parametrize("size", [0, 100, 400, 1000, 4000, 8000])
async def test_prompt_within_budget(mem: ConversationMemory, size: int) -> None:
    await fill(mem, "frank", 50, size=size)
    hist = await mem.history("frank")
    await mem.replace_with_summary("frank", "y" * min(size * 3 + 1, 20000), hist[:5])
    msgs = await mem.prompt("frank", SYSTEM, "and now?")
    window = ContextWindowConfig()
    assert prompt_tokens(msgs) <= mem.budget == 4000
    assert msgs[0]["content"] == SYSTEM and msgs[-1]["content"] == "and now?"
    history = msgs[1:-1]
    if history and history[0]["content"].startswith(SUMMARY_PREFIX):
        history = history[1:]
    assert len(history) <= window.keep_recent_messages
    # The most recent message is always the one kept when anything is kept.
    if history:
        assert history[-1]["content"].startswith("m049")
        stored = [m.content for m in await mem.history("frank")]
        contents = [h["content"] for h in history]
        assert contents == stored[-len(contents):]  # contiguous, oldest first


async def test_prompt_small_budget_keeps_system_and_user(
    client: aioredis.Redis, prefix: str
) -> None:
    mem = ConversationMemory(client, prefix, MemoryConfig(), ContextWindowConfig(max_tokens=60))
    await fill(mem, "gina", 12, size=50)
    hist = await mem.history("gina")
    await mem.replace_with_summary("gina", "z" * 1000 + "END", hist[:2])
    msgs = await mem.prompt("gina", SYSTEM, "hi")
    assert prompt_tokens(msgs) <= 60
    assert msgs[0]["content"] == SYSTEM and msgs[-1]["content"] == "hi"
    assert len(msgs) == 3 and msgs[1]["content"].endswith("END")  # summary cut from its start
    huge = "q" * 1000
    msgs = await mem.prompt("gina", huge, huge)
    assert msgs == [{"role": "system", "content": huge}, {"role": "user", "content": huge}]


async def test_users_isolated(mem: ConversationMemory) -> None:
    await mem.append("u1", "user", "secret of u1")
    await mem.append("u2", "user", "secret of u2")
    hist = await mem.history("u1")
    await mem.replace_with_summary("u1", "u1 summary", hist)
    p2 = await mem.prompt("u2", SYSTEM, "?")
    text = " ".join(m["content"] for m in p2)
    assert "u1" not in text and "secret of u2" in text
    assert [m.content for m in await mem.history("u2")] == ["secret of u2"]
    assert await mem.summary("u2") is None
    assert await mem.history("u3") == []


async def test_interrupted_reply_gets_a_note_not_a_marker_in_its_text(
        mem: ConversationMemory) -> None:
    await mem.append("hal", "user", "Tell me a story.")
    await mem.append("hal", "assistant", "Once upon a time", interrupted=True)
    msgs = await mem.prompt("hal", SYSTEM, "Stop.")
    assert msgs[2:] == [{"role": "assistant", "content": "Once upon a time"},
                        {"role": "system", "content": INTERRUPTED_NOTE},
                        {"role": "user", "content": "Stop."}]
    assert (await mem.history("hal"))[1].interrupted


async def test_validation(mem: ConversationMemory) -> None:
    with pytest.raises(ValueError, match="invalid role"):
        await mem.append("ok", "system", "x")
    for bad in ["", "a b", "x" * 129, "a\n", "a/b", "{tag}"]:
        with pytest.raises(ValueError, match="invalid user id"):
            await mem.append(bad, "user", "x")
        with pytest.raises(ValueError, match="invalid user id"):
            await mem.prompt(bad, SYSTEM, "x")
    with pytest.raises(ValueError, match="bytes; at most"):
        await mem.append("ok", "user", "é" * (MAX_CONTENT_BYTES // 2 + 1))
    await mem.append("ok", "user", "a" * MAX_CONTENT_BYTES)  # the limit itself is fine
    assert len(await mem.history("ok")) == 1


async def test_summarization_disabled(client: aioredis.Redis, prefix: str) -> None:
    cfg = MemoryConfig.model_validate({"summarization": {"enabled": False}})
    mem = ConversationMemory(client, prefix, cfg)
    await fill(mem, "ivy", 45)
    assert not await mem.needs_summary("ivy")


async def test_a_continued_turn_replaces_the_fragment_and_its_unheard_reply(
        mem: ConversationMemory) -> None:
    await mem.append("ann", "user", "What is the capital", turn_id="t1")
    await mem.append("ann", "assistant", "The capital of what?", turn_id="t1")
    await mem.append("ann", "user", "Hello.", turn_id="t0")  # another turn stays
    stored = await mem.continue_turn("ann", "t1", "t2", "What is the capital of France?")
    assert stored is not None and stored.turn_id == "t2"
    assert [(m.turn_id, m.role, m.content) for m in await mem.history("ann")] == [
        ("t0", "user", "Hello."), ("t2", "user", "What is the capital of France?")]
    # A late write of the dropped turn (its LLM worker still finishing) stores nothing;
    # replaying the continuation (a redelivered transcript) does not store it twice.
    assert await mem.append("ann", "assistant", "Paris?", turn_id="t1") is None
    assert await mem.append("ann", "user", "What is the capital", turn_id="t1") is None
    assert await mem.continue_turn("ann", "t1", "t2", "What is the capital of France?") is None
    assert len(await mem.history("ann")) == 2
    # A chain: t3 continues t2 (whose message already holds t1's words).
    await mem.continue_turn("ann", "t2", "t3", "What is the capital of France, and Spain?")
    assert [m.turn_id for m in await mem.history("ann")] == ["t0", "t3"]


async def test_continuing_a_turn_that_stored_nothing_just_stores_the_utterance(
        mem: ConversationMemory) -> None:
    await mem.continue_turn("ben", "gone", "t9", "One utterance.")
    assert [(m.turn_id, m.content) for m in await mem.history("ben")] == [("t9", "One utterance.")]
    with pytest.raises(ValueError):
        await mem.continue_turn("ben", "", "t9", "x")


async def test_prompts_extend_each_other_between_block_cuts(
        client: aioredis.Redis, prefix: str) -> None:
    # A conversation of 30 turns: each prompt must start like the previous one (so a
    # prefix-caching server evaluates only the new messages) except when the window
    # drops a block of old history; the budget holds throughout.
    window = ContextWindowConfig(keep_recent_messages=20, trim_block=10)
    mem = ConversationMemory(client, prefix, MemoryConfig(max_messages_per_user=50),
                             window, budget=1500)
    previous: list[dict[str, str]] = []
    changed, reused = 0, []
    for turn in range(30):
        question = f"Question {turn}: what about {'tea ' * (turn % 7)}and travel?"
        built = await mem.build_prompt("ivy", SYSTEM, question)
        msgs = built.messages
        assert built.tokens == prompt_tokens(msgs) <= 1500
        assert msgs[-1] == {"role": "user", "content": question}
        if previous:
            if msgs[:len(previous)] == previous:
                reused.append(built.reused_tokens)
                assert built.reused_tokens == prompt_tokens(previous)  # the reply too
            else:
                changed += 1
                assert built.reused_tokens == prompt_tokens(msgs[:1])  # the system prompt
        await mem.append("ivy", "user", question)
        await mem.append("ivy", "assistant", f"Answer {turn}. " + "Words and more. " * 6)
        previous = [*msgs, {"role": "assistant",
                            "content": f"Answer {turn}. " + "Words and more. " * 6}]
    assert changed <= 5  # not every turn once the window is full (it was 20 of 29)
    assert len(reused) >= 24


async def test_the_newest_history_is_what_the_window_keeps(
        client: aioredis.Redis, prefix: str) -> None:
    mem = ConversationMemory(client, prefix, MemoryConfig(),
                             ContextWindowConfig(keep_recent_messages=20), budget=4000)
    await fill(mem, "jo", 30)
    msgs = await mem.prompt("jo", SYSTEM, "next")
    assert [m["content"][:4] for m in msgs[1:-1]] == [f"m{i:03d}" for i in range(20, 30)]
    await mem.redis.set(mem.keys.user_window("jo"), b"\xff not json")  # unreadable state
    assert (await mem.prompt("jo", SYSTEM, "next"))[1:-1] == msgs[1:-1]


async def test_the_same_prompt_twice_is_all_reused(mem: ConversationMemory) -> None:
    first = await mem.build_prompt("kim", SYSTEM, "Two plus two?")
    again = await mem.build_prompt("kim", SYSTEM, "Two plus two?")  # a redelivered turn
    assert first.reused_tokens == 0 and again.reused_tokens == again.tokens


async def test_the_summary_is_asked_for_at_the_end_of_the_users_prompt(
        mem: ConversationMemory) -> None:
    await fill(mem, "lea", 12)
    await mem.replace_with_summary("lea", "Lea likes tea.", (await mem.history("lea"))[:2])
    prompt = await mem.prompt("lea", SYSTEM, "next")
    ask = await mem.summary_prompt("lea", SYSTEM, "Summarize.")
    assert ask[:-1] == prompt[:-1]  # the same prefix: a cache hit on the server
    assert ask[1]["content"].endswith("Lea likes tea.") and ask[-1] == {
        "role": "user", "content": "Summarize."}

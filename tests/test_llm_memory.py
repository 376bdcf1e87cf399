"""The LLM stage remembers: ``voicebus worker llm`` in its own process, real Redis, a
scripted OpenAI-compatible server (to see exactly what the model was asked)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from schemas import TextChunk, Transcript
from tests.busutil import cancel_turn, publish, read_all
from tests.conftest import WorkerProcs, wait_for
from tests.support.openai_server import Script, ScriptedOpenAI
from workers.config import ContextWindowConfig, LlmConfig, MemoryConfig
from workers.llm.memory import INTERRUPTED_NOTE, ConversationMemory, Message, prompt_tokens
from workers.llm.summarizer import INSTRUCTIONS
from workers.runtime.keys import Keys

SYSTEM = LlmConfig().system_prompt


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI() as s:
        yield s


def start_llm(workers: WorkerProcs, server: ScriptedOpenAI, **env: str) -> Keys:
    workers.start_cli("llm", VOICEBUS_LLM__BASE_URL=server.url, VOICEBUS_LLM__TIMEOUT="2",
                      **env)
    return Keys(workers.prefix)


def say(r: redis.Redis, keys: Keys, user: str, text: str, *, session: str | None = None,
        turn: str | None = None) -> tuple[str, str]:
    session = session or f"s{uuid.uuid4().hex[:8]}"
    turn = turn or f"t{uuid.uuid4().hex[:8]}"
    publish(r, keys.queue("llm"), Transcript(session_id=session, turn_id=turn, text=text,
                                             user_id=user))
    return session, turn


def answered(r: redis.Redis, keys: Keys, session: str, turn: str) -> list[TextChunk]:
    def done() -> list[TextChunk] | None:
        got = [e for e in read_all(r, keys.out(session))
               if isinstance(e, TextChunk) and e.turn_id == turn]
        return got if any(c.last for c in got) else None
    found: list[TextChunk] = wait_for(done, timeout=15, what=f"the reply to {turn}")
    return found


def history(url: str, prefix: str, user: str) -> list[Message]:
    async def read() -> list[Message]:
        client = aioredis.Redis.from_url(url)
        try:
            return await ConversationMemory(client, prefix).history(user)
        finally:
            await client.aclose()
    return asyncio.run(read())


def stored(url: str, prefix: str, user: str, n: int) -> list[Message]:
    found: list[Message] = wait_for(lambda: (h := history(url, prefix, user)) and len(h) >= n
                                    and h, timeout=10, what=f"{n} stored messages")
    return found


def test_second_turn_sees_the_first_and_users_are_apart(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    server.scripts = [Script.reply(["Nice to meet you, ", "Ada."])]
    keys = start_llm(workers, server)
    session, first = say(sync_redis, keys, "ada", "Hi, my name is Ada.")
    answered(sync_redis, keys, session, first)
    stored(workers.url, workers.prefix, "ada", 2)
    # A later session of the same user (a reconnect) continues the conversation.
    session2, second = say(sync_redis, keys, "ada", "What is my name?")
    answered(sync_redis, keys, session2, second)
    assert server.requests[1].body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi, my name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    # Another user starts from nothing and never sees Ada's conversation.
    session3, third = say(sync_redis, keys, "bob", "What is my name?")
    answered(sync_redis, keys, session3, third)
    assert server.requests[2].body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is my name?"},
    ]
    msgs = stored(workers.url, workers.prefix, "ada", 4)
    assert [(m.role, m.turn_id) for m in msgs] == [("user", first), ("assistant", first),
                                                   ("user", second), ("assistant", second)]
    assert [(m.role, m.content) for m in history(workers.url, workers.prefix, "bob")] == [
        ("user", "What is my name?"), ("assistant", "Nice to meet you, Ada.")]


def test_a_redelivered_turn_is_remembered_once(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    server.scripts = [Script.reply(["Four."])]
    keys = start_llm(workers, server)
    session, turn = say(sync_redis, keys, "carl", "Two plus two?")
    answered(sync_redis, keys, session, turn)
    stored(workers.url, workers.prefix, "carl", 2)
    # The same turn again (a producer retry, a reclaim after a crash).
    say(sync_redis, keys, "carl", "Two plus two?", session=session, turn=turn)
    wait_for(lambda: len(server.requests) == 2, what="the second request")
    # Its prompt does not contain the turn's own words twice...
    assert server.requests[1].body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Two plus two?"},
    ]
    time.sleep(0.5)
    # ...and memory holds the turn once.
    assert [m.role for m in history(workers.url, workers.prefix, "carl")] == ["user",
                                                                             "assistant"]


def test_an_interrupted_reply_keeps_only_what_was_heard(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    pieces = [f"Sentence number {i}. " for i in range(40)]
    server.scripts = [Script.reply(pieces, delay=0.1)]
    keys = start_llm(workers, server)
    session, turn = say(sync_redis, keys, "dora", "Talk a lot.")

    def chunks() -> list[TextChunk]:
        return [e for e in read_all(sync_redis, keys.out(session)) if isinstance(e, TextChunk)]

    wait_for(lambda: len(chunks()) >= 3, timeout=10, what="three chunks")
    cancel_turn(workers.url, keys, session, turn, "barge-in")
    msgs = stored(workers.url, workers.prefix, "dora", 2)
    reply = msgs[1]
    assert reply.role == "assistant" and reply.interrupted and reply.turn_id == turn
    sent = " ".join(c.text for c in chunks())
    assert reply.content == sent  # what was sent to the speaker, nothing more
    assert 3 <= len(reply.content.split(". ")) < 40

    # The gateway then reports what was actually played: that replaces it.
    async def heard() -> tuple[bool, list[dict[str, str]]]:
        client = aioredis.Redis.from_url(workers.url)
        try:
            memory = ConversationMemory(client, workers.prefix)
            changed = await memory.record_heard("dora", turn, "Sentence number 0.")
            return changed, await memory.prompt("dora", "sys", "next")
        finally:
            await client.aclose()

    changed, prompt = asyncio.run(heard())
    assert changed
    assert prompt[2:4] == [{"role": "assistant", "content": "Sentence number 0."},
                           {"role": "system", "content": INTERRUPTED_NOTE}]


async def test_record_heard_either_order(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        memory = ConversationMemory(client, prefix)
        assert not await memory.record_heard("eve", "t1", "Hello there.")
        await memory.append("eve", "user", "Hi", turn_id="t1")
        stored_reply = await memory.append("eve", "assistant", "Hello there. How are you?",
                                           turn_id="t1")
        assert stored_reply is not None
        assert (stored_reply.content, stored_reply.interrupted) == ("Hello there.", True)
        assert await memory.append("eve", "assistant", "again", turn_id="t1") is None
        assert [m.content for m in await memory.history("eve")] == ["Hi", "Hello there."]
    finally:
        await client.aclose()


def test_long_history_is_summarized_in_the_background(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    summary = "The user is Ada, who likes green tea and is planning a trip to Lisbon."
    server.scripts = [Script.reply(["Lisbon is lovely in May."]), Script.reply([summary])]
    memory_cfg, window = MemoryConfig(), ContextWindowConfig(max_tokens=600)

    async def prefill() -> None:
        client = aioredis.Redis.from_url(workers.url)
        try:
            memory = ConversationMemory(client, workers.prefix, memory_cfg, window)
            for i in range(22):
                await memory.append("ada", "user", f"Question {i}: tell me more about tea "
                                                   f"and travel, please, in detail.")
                await memory.append("ada", "assistant", f"Answer {i}: " + "words " * 30)
        finally:
            await client.aclose()

    asyncio.run(prefill())  # 44 messages: above the trigger (40), 46 with the turn
    keys = start_llm(workers, server, VOICEBUS_CONTEXT_WINDOW__MAX_TOKENS="600")
    session, turn = say(sync_redis, keys, "ada", "When should I go to Lisbon?")
    answered(sync_redis, keys, session, turn)
    # The reply went out first; then the summary was asked for, off the critical path.
    wait_for(lambda: len(server.requests) >= 2, timeout=15, what="the summary request")
    # Asked at the end of the conversation as the prompts show it (a prefix-caching
    # server evaluates only the instructions), within the budget.
    ask_summary = server.requests[1].body["messages"]
    assert ask_summary[0]["content"] == SYSTEM and ask_summary[-1]["content"] == INSTRUCTIONS
    assert ask_summary[-2]["content"] == "Lisbon is lovely in May."
    assert prompt_tokens(ask_summary) <= 600
    # The reply's prompt stayed within the budget, history included.
    assert prompt_tokens(server.requests[0].body["messages"]) <= 600
    assert server.requests[0].body["messages"][-1]["content"] == "When should I go to Lisbon?"

    def summarized() -> bool:
        return sync_redis.get(keys.user_summary("ada")) == summary.encode()
    wait_for(summarized, timeout=10, what="the summary stored")
    # 4 short of the cap (50): it did not wait for a quiet moment, nor would it give way.
    assert "near its cap: summarizing without giving way" in workers.logs()
    msgs = history(workers.url, workers.prefix, "ada")
    assert len(msgs) == memory_cfg.summarization.keep_recent
    assert msgs[-1].content == "Lisbon is lovely in May."

    async def next_prompt() -> list[dict[str, str]]:
        client = aioredis.Redis.from_url(workers.url)
        try:
            return await ConversationMemory(client, workers.prefix, memory_cfg,
                                            window).prompt("ada", SYSTEM, "And the food?")
        finally:
            await client.aclose()

    prompt = asyncio.run(next_prompt())
    assert summary in prompt[1]["content"]
    assert prompt_tokens(prompt) <= 600


def test_a_continued_turn_replaces_the_fragment_and_drops_its_reply(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    import threading

    gate = threading.Event()  # the fragment's reply is mid-way when the user goes on
    server.scripts = [Script.reply(["Which ", "country ", "do you mean? ", "Tell ", "me."],
                                   hold=(4, gate)),
                      Script.reply(["Paris."])]
    # A long timeout: the held reply must not end as "stalled" first.
    workers.start_cli("llm", VOICEBUS_LLM__BASE_URL=server.url, VOICEBUS_LLM__TIMEOUT="60")
    keys = Keys(workers.prefix)
    session, fragment = say(sync_redis, keys, "eve", "What is the capital")
    wait_for(lambda: [e for e in read_all(sync_redis, keys.out(session))
                      if isinstance(e, TextChunk)], what="the fragment's reply under way")
    cancel_turn(workers.url, keys, session, fragment, "continued")  # the user went on
    # Release the held stream only once the worker has seen the cancel: released
    # earlier (a busy box delays the cancel lane), the reply simply finishes.
    wait_for(lambda: "reply dropped: the user went on" in workers.logs(),
             what="the worker dropping the fragment's reply")
    gate.set()
    publish(sync_redis, keys.queue("llm"), Transcript(
        session_id=session, turn_id="whole", text="What is the capital of France?",
        user_id="eve", continues=fragment))
    answered(sync_redis, keys, session, "whole")
    wait_for(lambda: any(m.turn_id == "whole" and m.role == "assistant"
                         for m in history(workers.url, workers.prefix, "eve")),
             what="the whole turn's reply stored")
    kept = [(m.turn_id, m.role, m.content) for m in history(workers.url, workers.prefix, "eve")]
    # One user message for the utterance, the reply to it; nothing of the fragment.
    assert kept == [("whole", "user", "What is the capital of France?"),
                    ("whole", "assistant", "Paris.")]
    [asked] = [r for r in server.requests if r.user_text == "What is the capital of France?"]
    assert [m["role"] for m in asked.body["messages"]] == ["system", "user"]  # no fragment


def test_a_summary_gives_way_to_a_live_turn_and_warms_the_next_prompt(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    import threading

    summary = "The user is Ada, who likes green tea and is planning a trip to Lisbon."
    gate = threading.Event()  # the first summary is mid-way for as long as the test needs
    server.scripts = [Script.reply(["Lisbon is lovely."]),
                      Script.reply(["The user ", "is Ada."], hold=(1, gate)),
                      Script.reply(["In May."]),
                      Script.reply([summary]),
                      Script.reply(["Sure"])]  # the warm-up (one token asked)
    memory_cfg = MemoryConfig()

    async def prefill() -> None:
        client = aioredis.Redis.from_url(workers.url)
        try:
            memory = ConversationMemory(client, workers.prefix, memory_cfg)
            for i in range(20):
                await memory.append("ada", "user", f"Question {i} about tea and travel.")
                await memory.append("ada", "assistant", f"Answer {i}: " + "words " * 10)
        finally:
            await client.aclose()

    asyncio.run(prefill())  # 40 messages: the trigger, well short of the cap (50)
    keys = start_llm(workers, server, VOICEBUS_MEMORY__SUMMARIZATION__IDLE_S="1")
    asked = time.time()
    session, turn = say(sync_redis, keys, "ada", "When should I go to Lisbon?")
    answered(sync_redis, keys, session, turn)
    wait_for(lambda: len(server.requests) >= 2, what="the summary request")
    assert server.requests[1].at - asked >= 1.0  # it waited for a quiet second
    # The user speaks while the summary is being written: the summary gives way.
    _, second = say(sync_redis, keys, "ada", "And when is it warm?", session=session)
    answered(sync_redis, keys, session, second)
    wait_for(lambda: "gave way to a live turn" in workers.logs(), what="the summary giving way")
    assert server.requests[2].user_text == "And when is it warm?"
    # Held mid-way until the worker hangs up: the server sees it while it waits.
    wait_for(lambda: server.requests[1].aborted, what="the first summary's request closed")
    gate.set()
    # After the second reply it is tried again, stored, and the next prompt warmed.
    wait_for(lambda: sync_redis.get(keys.user_summary("ada")) == summary.encode(),
             what="the summary stored")
    wait_for(lambda: len(server.requests) >= 5, what="the warm-up request")
    warm = server.requests[4].body
    assert warm["max_tokens"] == 1
    assert warm["messages"][0]["content"] == SYSTEM and summary in warm["messages"][1]["content"]
    assert warm["messages"][-1]["content"] == "In May."  # the history, no new user text

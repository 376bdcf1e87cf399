"""The LLM stage as an operator runs it: ``python -m voicebus worker llm`` against a real
redis-server and a scripted OpenAI-compatible HTTP server (tests/support/openai_server.py),
fed final transcripts. Plus the backend against the scripted server, in process.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
import redis
import redis.asyncio as aioredis

from schemas import TextChunk, Transcript
from tests.busutil import cancel_turn, pending, publish, read_all
from tests.conftest import WorkerProcs, wait_for
from tests.support.openai_server import Script, ScriptedOpenAI
from workers.backends.llm import EchoLlm, LlmError, LlmTimeout, OpenAIChat
from workers.config import LlmConfig
from workers.llm.memory import ConversationMemory, Message
from workers.llm.resume import Said, said_before
from workers.llm_worker import SAY_AGAIN
from workers.runtime.keys import Keys
from workers.text.chunking import chunks as chunk_text

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TIMEOUT = 1.0
APOLOGY = LlmConfig().apology
SYSTEM = LlmConfig().system_prompt


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI() as s:
        yield s


def start_llm(workers: WorkerProcs, server: ScriptedOpenAI, **env: str) -> Keys:
    workers.start_cli("llm", VOICEBUS_LLM__BASE_URL=server.url,
                      VOICEBUS_LLM__TIMEOUT=str(TIMEOUT), **env)
    return Keys(workers.prefix)


def ask(r: redis.Redis, keys: Keys, text: str, *, failed: bool = False,
        final: bool = True) -> tuple[str, str]:
    session, turn = f"s{uuid.uuid4().hex[:8]}", "t1"
    publish(r, keys.queue("llm"), Transcript(
        session_id=session, turn_id=turn, text=text, final=final, failed=failed,
        error="no speech recognised" if failed else "", traceparent=TRACEPARENT))
    return session, turn


def reply(r: redis.Redis, keys: Keys, session: str, timeout: float = 15) -> list[TextChunk]:
    """The session's text chunks on its out stream, once the last one is there."""
    def done() -> list[TextChunk] | None:
        got = [e for e in read_all(r, keys.out(session)) if isinstance(e, TextChunk)]
        return got if any(c.last for c in got) else None

    found: list[TextChunk] = wait_for(done, timeout=timeout, what="the reply's last chunk")
    return found


def tts_chunks(r: redis.Redis, keys: Keys, session: str) -> list[TextChunk]:
    return [e for e in read_all(r, keys.queue("tts"))  # type: ignore[misc]
            if e.session_id == session]


def check_well_formed(chunks: Sequence[TextChunk]) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.traceparent == TRACEPARENT for c in chunks)


def acked(r: redis.Redis, keys: Keys) -> None:
    wait_for(lambda: not pending(r, keys.queue("llm"), "llm"), timeout=10,
             what="the transcript to be acked")


PIECES = ["He", "llo th", "ere! Dr", ". Smith earned 3", ".5 mil", "lion dollars, e.",
          "g. in stocks", ". Is that ", "right?"]
TEXT = "".join(PIECES)


def test_reply_streams_in_sentences(workers: WorkerProcs, server: ScriptedOpenAI,
                                    sync_redis: redis.Redis) -> None:
    server.scripts = [Script.reply(PIECES, delay=0.01)]
    keys = start_llm(workers, server)
    session, _ = ask(sync_redis, keys, "Tell me about Dr. Smith.")
    chunks = reply(sync_redis, keys, session)
    check_well_formed(chunks)
    assert [c.text for c in chunks] == chunk_text(PIECES) == [
        "Hello there!", "Dr. Smith earned 3.5 million dollars, e.g. in stocks.",
        "Is that right?"]
    assert " ".join(c.text for c in chunks) == TEXT
    assert tts_chunks(sync_redis, keys, session) == chunks
    (request,) = server.requests
    assert request.body["stream"] is True
    assert request.body["messages"] == [{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": "Tell me about Dr. Smith."}]
    acked(sync_redis, keys)
    wait_for(lambda: "ttft " in workers.logs() and "tokens/s" in workers.logs(),
             what="the turn's metrics logged")


def test_first_chunk_goes_out_before_the_model_finishes(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    # The chunker decides a sentence end on the next non-space character (" Then"), so
    # the model's pause comes after it: the first sentence must not wait for the rest.
    server.scripts = [Script.reply(["The first sentence", " is here.", " Then", " the rest",
                                    " comes later."], pauses={3: 1.0})]
    keys = start_llm(workers, server)
    session, _ = ask(sync_redis, keys, "go")
    chunks = reply(sync_redis, keys, session)
    check_well_formed(chunks)
    assert [c.text for c in chunks] == ["The first sentence is here.", "Then the rest comes later."]
    assert (chunks[-1].created_ns - chunks[0].created_ns) / 1e9 >= 0.8


def test_hung_server_gets_the_apology_within_the_timeout(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    server.scripts = [Script.hang(30)]
    keys = start_llm(workers, server)
    sent = time.time_ns()
    session, _ = ask(sync_redis, keys, "are you there?")
    chunks = reply(sync_redis, keys, session)
    assert [(c.seq, c.text, c.last) for c in chunks] == [(0, APOLOGY, True)]
    # The timeout ended the wait, not the 30 s hang (a load-proof bound, not a speed test).
    assert TIMEOUT <= (chunks[0].created_ns - sent) / 1e9 < TIMEOUT + 5
    assert len(server.requests) == 1  # a timeout is not retried
    acked(sync_redis, keys)


def test_stream_dying_midway_keeps_what_was_spoken(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    pieces = ["One sentence. ", "Two sent", "ences here. ", "Three is nev", "er said."]
    server.scripts = [Script.die(pieces, after=4, delay=0.05)]
    keys = start_llm(workers, server)
    session, _ = ask(sync_redis, keys, "count")
    chunks = reply(sync_redis, keys, session)
    check_well_formed(chunks)
    texts = [c.text for c in chunks]
    # spoken: the two whole sentences; the partial one the model produced ends the reply
    assert texts == ["One sentence.", "Two sentences here.", "Three is nev"]
    assert len(set(texts)) == len(texts)
    assert len(server.requests) == 1  # something was spoken: no retry
    time.sleep(0.3)
    assert reply(sync_redis, keys, session) == chunks  # nothing more, nothing repeated
    acked(sync_redis, keys)
    wait_for(lambda: "broke off after" in workers.logs(), what="the break logged")


def test_stream_dying_before_anything_was_spoken_is_retried(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    server.scripts = [Script.die(["Half a sen", "tence"], after=1), Script.reply(["All good."])]
    keys = start_llm(workers, server)
    session, _ = ask(sync_redis, keys, "hello")
    chunks = reply(sync_redis, keys, session)
    assert [(c.seq, c.text, c.last) for c in chunks] == [(0, "All good.", True)]
    assert len(server.requests) == 2


def test_http_500_twice_gets_the_apology(workers: WorkerProcs, server: ScriptedOpenAI,
                                         sync_redis: redis.Redis) -> None:
    server.scripts = [Script.error(500), Script.error(500), Script.reply(["Never."])]
    keys = start_llm(workers, server)
    session, _ = ask(sync_redis, keys, "hello")
    chunks = reply(sync_redis, keys, session)
    assert [(c.seq, c.text, c.last) for c in chunks] == [(0, APOLOGY, True)]
    assert len(server.requests) == 2  # one retry, then the apology
    # one failure is retried away
    server.scripts = [Script.error(500), Script.reply(["Fine, thanks."])]
    server.requests.clear()
    session, _ = ask(sync_redis, keys, "hello again")
    assert [c.text for c in reply(sync_redis, keys, session)] == ["Fine, thanks."]
    assert len(server.requests) == 2


def test_failed_empty_and_partial_transcripts(workers: WorkerProcs, server: ScriptedOpenAI,
                                              sync_redis: redis.Redis) -> None:
    keys = start_llm(workers, server)
    partial, _ = ask(sync_redis, keys, "not yet", final=False)
    for session in (ask(sync_redis, keys, "", failed=True)[0],
                    ask(sync_redis, keys, "   ")[0]):
        chunks = reply(sync_redis, keys, session)
        assert [(c.seq, c.text, c.last) for c in chunks] == [(0, SAY_AGAIN, True)]
        assert tts_chunks(sync_redis, keys, session) == chunks
    acked(sync_redis, keys)
    assert read_all(sync_redis, keys.out(partial)) == []
    assert server.requests == []  # none of them asked the model


def test_cancel_mid_stream_stops_at_once(workers: WorkerProcs, server: ScriptedOpenAI,
                                         sync_redis: redis.Redis) -> None:
    pieces = [f"Sentence number {i}. " for i in range(40)]
    server.scripts = [Script.reply(pieces, delay=0.1)]
    keys = start_llm(workers, server)
    session, turn = ask(sync_redis, keys, "talk a lot")

    def out() -> list[TextChunk]:
        return [e for e in read_all(sync_redis, keys.out(session)) if isinstance(e, TextChunk)]

    wait_for(lambda: len(out()) >= 2, timeout=10, what="two chunks")
    cancel_turn(workers.url, keys, session, turn, "barge-in")
    at_cancel = len(out())
    acked(sync_redis, keys)
    time.sleep(0.6)  # six more tokens' worth
    after = out()
    assert len(after) <= at_cancel + 1  # at most the one in hand
    assert not any(c.last for c in after)
    assert [c.seq for c in after] == list(range(len(after)))
    wait_for(lambda: server.requests[0].aborted, timeout=5,
             what="the worker to close the HTTP stream")
    assert not server.requests[0].finished
    wait_for(lambda: "cancelled; stream closed" in workers.logs(), what="the cancel logged")


def test_word_mode_first_chunk_is_a_few_words(workers: WorkerProcs, server: ScriptedOpenAI,
                                              sync_redis: redis.Redis) -> None:
    pieces = ["Well", " I think", " the answer to your question is", " forty two. ",
              "That is all."]
    server.scripts = [Script.reply(pieces, delay=0.02)]
    keys = start_llm(workers, server, VOICEBUS_LLM__CHUNKING="word")
    session, _ = ask(sync_redis, keys, "what is it?")
    chunks = reply(sync_redis, keys, session)
    check_well_formed(chunks)
    assert 3 <= len(chunks[0].text.split()) <= 5
    assert " ".join(c.text for c in chunks) == " ".join("".join(pieces).split())


# -- the backend alone -----------------------------------------------------------------


async def _collect(backend: OpenAIChat | EchoLlm, text: str = "hi") -> list[str]:
    return [t async for t in backend.stream([{"role": "user", "content": text}],
                                            max_tokens=16, temperature=0.0)]


def _ask(server: ScriptedOpenAI) -> list[str]:
    """One request, with a client made inside the event loop that uses it."""
    async def go() -> list[str]:
        return await _collect(OpenAIChat(server.url, "key", "test-model", timeout=0.5))
    return asyncio.run(go())


def test_backend_streams_deltas_and_reports_failures() -> None:
    scripts = [Script.reply(["Hel", "lo. ", "Bye."]), Script.error(503),
               Script.die(["a", "b", "c"], after=2), Script.hang(10)]
    with ScriptedOpenAI(scripts) as server:
        assert _ask(server) == ["Hel", "lo. ", "Bye."]
        assert server.requests[0].body["model"] == "test-model"
        with pytest.raises(LlmError, match="HTTP 503"):
            _ask(server)
        with pytest.raises(LlmError, match="broke off"):
            _ask(server)
        with pytest.raises(LlmTimeout):
            _ask(server)
    assert "".join(asyncio.run(_collect(EchoLlm(), "how are you"))) == "You said: how are you"


PARTS = [f"Part {i} of the answer. " for i in range(12)]


def kill_mid_reply(workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis,
                   asked_again: Script) -> tuple[list[TextChunk], list[TextChunk]]:
    """One of two LLM workers is killed two sentences into its reply; the survivor,
    asked again, gets ``asked_again``. The chunks said before the kill, and the whole
    reply on the out stream."""
    # The first worker's reply stops after three pieces until the test is done with it
    # (never released: it dies mid-reply, however slow the machine is).
    mid_reply = threading.Event()
    server.scripts = [Script.reply(PARTS, hold=(3, mid_reply)), asked_again]
    # A long timeout: the held reply must not end as "stalled" before the kill.
    first = workers.start_cli("llm", VOICEBUS_LLM__BASE_URL=server.url,
                              VOICEBUS_LLM__TIMEOUT="120")
    keys = Keys(workers.prefix)
    session, _ = ask(sync_redis, keys, "tell me everything")

    def out() -> list[TextChunk]:
        return [e for e in read_all(sync_redis, keys.out(session)) if isinstance(e, TextChunk)]

    wait_for(lambda: len(out()) >= 2, timeout=10, what="the first worker answering")
    second = workers.start_cli("llm", VOICEBUS_LLM__BASE_URL=server.url,
                               VOICEBUS_LLM__TIMEOUT=str(TIMEOUT))
    first.kill()  # mid-reply: its entry stays pending until the survivor claims it
    first.wait()
    before = out()
    chunks = reply(sync_redis, keys, session, timeout=30)
    assert second.poll() is None
    check_well_formed(chunks)  # seq 0..n once each, one last chunk: nothing duplicated
    assert len(server.requests) == 2  # the survivor asked the model again
    acked(sync_redis, keys)
    assert len(tts_chunks(sync_redis, keys, session)) == len(chunks)  # the same, to speak
    return before, chunks


def test_killing_one_of_two_llm_workers_mid_reply_still_completes_the_turn(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    _, chunks = kill_mid_reply(workers, server, sync_redis, Script.reply(PARTS))
    assert [c.text for c in chunks] == [p.strip() for p in PARTS]  # the same reply, whole


def test_a_reply_asked_again_that_differs_ends_where_the_dead_worker_stopped(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    """A sampling model answers differently the second time: the user must not hear the
    start of one answer and the end of another."""
    other = ["Something else entirely. ", "It goes on and on. ", "And ends here."]
    before, chunks = kill_mid_reply(workers, server, sync_redis, Script.reply(other))
    said = [c.text for c in before]
    assert said == [p.strip() for p in PARTS[:len(said)]] and said
    assert [c.text for c in chunks] == [*said, ""]  # ended there, with an empty last chunk
    assert "differs from the" in workers.logs()

    def remembered() -> list[Message]:
        async def read() -> list[Message]:
            client = aioredis.Redis.from_url(workers.url)
            try:
                return await ConversationMemory(client, workers.prefix).history(
                    f"session:{chunks[0].session_id}")
            finally:
                await client.aclose()
        return asyncio.run(read())

    messages = wait_for(lambda: len(h := remembered()) >= 2 and h, timeout=10,
                        what="the turn stored")
    assert [(m.role, m.content) for m in messages] == [
        ("user", "tell me everything"), ("assistant", " ".join(said))]  # what was said


def test_a_reply_asked_again_goes_on_where_it_still_agrees(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    again = [*PARTS[:2], "But then a different ending. ", "The end."]
    before, chunks = kill_mid_reply(workers, server, sync_redis, Script.reply(again))
    assert [c.text for c in before] == [p.strip() for p in PARTS[:2]]
    assert [c.text for c in chunks] == [p.strip() for p in again]


def test_an_empty_reply_is_retried_then_apologised_for(
        workers: WorkerProcs, server: ScriptedOpenAI, sync_redis: redis.Redis) -> None:
    server.scripts = [Script.reply([]), Script.reply(["  ", "\n"])]
    keys = start_llm(workers, server)
    session, _ = ask(sync_redis, keys, "say something")
    chunks = reply(sync_redis, keys, session)
    assert [(c.seq, c.text, c.last) for c in chunks] == [(0, APOLOGY, True)]
    assert len(server.requests) == 2  # one retry: nothing had been spoken
    wait_for(lambda: "reply was empty" in workers.logs(), what="the reason logged")


def test_what_was_said_is_read_back_across_pages_to_the_turns_transcript(
        redis_url: str, sync_redis: redis.Redis) -> None:
    """``said_before`` reads the out stream newest first, a page at a time, past other
    turns' entries, and stops at this turn's transcript (an older turn with the same
    id in the stream before it is not read)."""
    stream = f"t{uuid.uuid4().hex[:8]}:{{s1}}:out"

    def chunk(turn: str, seq: int, text: str, last: bool = False) -> TextChunk:
        return TextChunk(session_id="s1", turn_id=turn, seq=seq, text=text, last=last)

    publish(sync_redis, stream, chunk("t1", 0, "From an older life of the stream.", True))
    publish(sync_redis, stream, Transcript(session_id="s1", turn_id="t1", text="hi"))
    for seq, text in enumerate(["One.", "Two.", "Three."]):
        publish(sync_redis, stream, chunk("t1", seq, text))
        for i in range(150):  # other entries between, more than a page (128)
            publish(sync_redis, stream, chunk("t0", i, "noise"))

    async def read() -> Said:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await said_before(client, stream, "t1")
        finally:
            await client.aclose()

    assert asyncio.run(read()) == Said(("One.", "Two.", "Three."), ended=False)

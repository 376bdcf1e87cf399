"""The local LLM voicebus starts itself: the GGUF assembled from its packages and
verified, a real llama.cpp server, and the LLM stage answering (and remembering)
with it through real Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from schemas import TextChunk, Transcript
from tests.busutil import publish, read_all
from tests.conftest import WorkerProcs, wait_for
from voicebus.local_llm import (
    GGUF_NAME,
    GGUF_PARTS,
    GGUF_SHA256,
    LocalLlmError,
    LocalLlmServer,
    gguf_path,
    llm_endpoint,
    needs_local_server,
)
from voicebus.processes import free_port
from workers.backends.model_files import ModelIntegrityError, assemble, packaged_path
from workers.config import LlmConfig, LocalLlmConfig
from workers.runtime.keys import Keys

# The real model on a busy 2-core box can take >10 s to its first token; these tests
# check what it says, not how fast (that is the benchmarks' job).
REAL_MODEL_TIMEOUT = "60"


def test_the_packaged_model_is_assembled_once_and_verified(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEBUS_CACHE", str(tmp_path))
    path = gguf_path(LlmConfig())
    assert path.name == GGUF_NAME and path.stat().st_size == 1_117_320_768
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert GGUF_SHA256 in (path.parent / ".verified").read_text()
    made = path.stat().st_mtime_ns
    assert gguf_path(LlmConfig()) == path  # reused, not rebuilt
    assert path.stat().st_mtime_ns == made
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.name]  # no temp left over


def test_parts_that_do_not_match_the_pinned_hash_are_refused(tmp_path: Path) -> None:
    parts = [packaged_path(p) for p in GGUF_PARTS[:2]]  # an incomplete model
    target = tmp_path / "model"
    with pytest.raises(ModelIntegrityError, match="sha256"):
        assemble(parts, [], {GGUF_NAME: GGUF_SHA256}, target, joined=GGUF_NAME, what="LLM")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_configured_model_path_must_exist(tmp_path: Path) -> None:
    config = LlmConfig(local=LocalLlmConfig(model_path=str(tmp_path / "nope.gguf")))
    with pytest.raises(LocalLlmError, match="not a file"):
        gguf_path(config)


def ask(r: redis.Redis, keys: Keys, user: str, text: str) -> list[TextChunk]:
    session, turn = f"s{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:8]}"
    publish(r, keys.queue("llm"), Transcript(session_id=session, turn_id=turn, text=text,
                                             user_id=user))

    def done() -> list[TextChunk] | None:
        got = [e for e in read_all(r, keys.out(session)) if isinstance(e, TextChunk)]
        return got if any(c.last for c in got) else None
    found: list[TextChunk] = wait_for(done, timeout=180, what="the reply")
    return found


def test_a_configured_endpoint_or_the_echo_backend_starts_no_server() -> None:
    mine = LlmConfig(base_url="http://llm.example:8000/v1")
    echo = LlmConfig(backend="echo")
    assert needs_local_server(LlmConfig()) and not needs_local_server(mine)
    assert not needs_local_server(echo)
    with llm_endpoint(mine) as url:
        assert url == "http://llm.example:8000/v1"
    with llm_endpoint(echo) as url:
        assert url is None


def test_a_server_that_dies_on_its_first_request_is_reported_not_retried() -> None:
    # As a llama.cpp built for instructions the CPU cannot run does (AMX in some VMs):
    # it answers /models, then dies on the first completion.
    server = LocalLlmServer(LlmConfig())
    server.port = free_port()  # nothing listens there any more
    server._proc = subprocess.Popen(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    try:
        with pytest.raises(LocalLlmError, match=r"(?s)died \(signal SIGSEGV\).*GGML_NATIVE=OFF"):
            server.warm_up()
    finally:
        server.stop()


def test_a_worker_without_an_endpoint_starts_the_local_model(
        workers: WorkerProcs, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOICEBUS_LLM__BASE_URL", raising=False)
    assert "VOICEBUS_LLM__BASE_URL" not in os.environ
    workers.start_cli("llm", VOICEBUS_LLM__TEMPERATURE="0",
                      VOICEBUS_LLM__TIMEOUT=REAL_MODEL_TIMEOUT)
    keys = Keys(workers.prefix)
    chunks = ask(sync_redis, keys, "u1", "What is the capital of France? One short sentence.")
    assert "paris" in " ".join(c.text for c in chunks).lower()
    logs = workers.logs()
    assert "starting the local LLM server" in logs and "local LLM server ready" in logs


def test_the_real_model_remembers_the_users_name(
        workers: WorkerProcs, sync_redis: redis.Redis, local_llm_url: str) -> None:
    workers.start_cli("llm", VOICEBUS_LLM__BASE_URL=local_llm_url,
                      VOICEBUS_LLM__TEMPERATURE="0", VOICEBUS_LLM__TIMEOUT=REAL_MODEL_TIMEOUT)
    keys = Keys(workers.prefix)
    ask(sync_redis, keys, "ada", "Hi! My name is Ada and I love green tea.")
    wait_for(lambda: sync_redis.llen(keys.user_messages("ada")) >= 2, timeout=10,
             what="the first turn stored")
    second = ask(sync_redis, keys, "ada", "What is my name?")
    assert "ada" in " ".join(c.text for c in second).lower()
    # Another user was never told.
    other = ask(sync_redis, keys, "bob", "What is my name?")
    assert "ada" not in " ".join(c.text for c in other).lower()


def test_concurrent_requests_are_queued_not_cut_short(local_llm_url: str) -> None:
    """Two sessions (or a live turn and a background summary) asking at once both get
    their whole reply: llama-cpp-python's server would cut the first one off."""
    from workers.backends.llm import OpenAIChat

    async def ask(question: str) -> str:
        chat = OpenAIChat(local_llm_url, "none", "qwen2.5-coder-1.5b-instruct", timeout=60)
        pieces = [p async for p in chat.stream(
            [{"role": "user", "content": question}], max_tokens=40, temperature=0.0)]
        return "".join(pieces)

    async def both() -> tuple[str, str]:
        first = asyncio.create_task(ask("Count from one to twenty in words."))
        await asyncio.sleep(0.3)  # the first is streaming when the second arrives
        second = await ask("Name three colours.")
        return await first, second

    first, second = asyncio.run(both())
    assert len(first.split()) >= 10, first  # not cut short by the second request
    assert second.strip(), second


def test_the_longest_prompt_and_reply_fit_the_servers_context(
        redis_url: str, prefix: str) -> None:
    # The prompt budget is an estimate; counted with the model's own tokenizer and chat
    # template, the fullest prompt voicebus builds (numbers, German, English) plus the
    # longest reply must fit n_ctx, or llama.cpp refuses the request.
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from workers.config import Config
    from workers.llm.memory import ConversationMemory
    from workers.runtime.connection import connect

    config = Config()
    model = llama_cpp.Llama(str(gguf_path(config.llm)), vocab_only=True, verbose=False)
    lines = ["My phone number is 415-555-0123 and my card is 4111 1111 1111 1111.",
             "Ich heiße Jürgen und wohne in München, Straße 12.",
             "Tell me more about the history of the Eiffel Tower, please."]

    async def conversation() -> list[list[dict[str, str]]]:
        client = connect(redis_url)
        try:
            memory = ConversationMemory(client, prefix, config.memory, config.context_window,
                                        config.prompt_budget())
            prompts = []
            for i in range(24):
                question = (lines[i % 3] + " ") * 2
                prompts.append(await memory.prompt("max", config.llm.system_prompt, question))
                await memory.append("max", "user", question)
                await memory.append("max", "assistant", (lines[(i + 1) % 3] + " ") * 3)
            return prompts
        finally:
            await client.aclose()

    template = model.metadata["tokenizer.chat_template"]
    render = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="")

    def tokens(messages: list[dict[str, str]]) -> int:
        text = render(messages=messages).prompt
        return len(model.tokenize(text.encode(), add_bos=False, special=True))

    counted = [tokens(p) for p in asyncio.run(conversation())]
    assert max(counted) > 0.6 * config.llm.local.n_ctx  # the window did fill up
    assert max(counted) + config.llm.max_tokens <= config.llm.local.n_ctx


def test_the_server_keeps_every_users_evaluated_prompt_when_asked() -> None:
    """``llm.local.prompt_cache_mb``: users taking turns on one server keep their
    evaluated prompts (deploy/SCALING.md: without it each turn evaluates its user's
    whole history again). Every flag must be one llama-cpp-python's server knows."""
    settings = pytest.importorskip("llama_cpp.server.settings")
    known = set(settings.ModelSettings.model_fields) | set(settings.ServerSettings.model_fields)

    def flags(mb: int) -> dict[str, str]:
        config = LlmConfig(local=LocalLlmConfig(prompt_cache_mb=mb))
        args = LocalLlmServer(config).command(Path("model.gguf"))[3:]  # after -m module
        pairs = dict(zip(args[::2], args[1::2], strict=True))
        assert {k.removeprefix("--") for k in pairs} <= known
        return pairs

    cached = flags(512)
    assert (cached["--cache"], cached["--cache_type"]) == ("true", "ram")
    assert cached["--cache_size"] == str(512 * 1024 * 1024)
    assert "--cache" not in flags(0)

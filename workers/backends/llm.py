"""Chat backends for the LLM stage: one small contract, streaming text deltas.

``ChatBackend.stream(messages, ...)`` is an async generator of text deltas (the
pieces of the reply, as the model produces them). Closing it (``aclose()``, or
cancelling the task that iterates it) closes the HTTP response at once, so a
cancelled turn stops the model's generation on the server too.

Errors are reported as ``LlmError`` (anything that went wrong talking to the
model) or its subclass ``LlmTimeout`` (the endpoint did not answer in time);
the worker decides about retries and apologies, the backend never retries.

* ``OpenAIChat``: any OpenAI-compatible ``/v1/chat/completions`` endpoint, through
  ``openai.AsyncOpenAI`` with ``stream=True`` and ``max_retries=0``.
* ``EchoLlm`` (``llm.backend: echo``): no model; repeats the user's words, streamed
  word by word through the same chunking and emitting path (for wiring tests and
  machines without the local model).

With ``llm.backend: openai`` and no ``llm.base_url``, the caller starts the local
server first (``voicebus.local_llm.llm_endpoint``) and passes its URL.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import Literal, Protocol, TypedDict, cast

import openai
from openai.types.chat import ChatCompletionMessageParam

from workers.config import LlmConfig

log = logging.getLogger(__name__)


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class LlmError(Exception):
    """The model could not be asked, or its answer broke off."""


class LlmTimeout(LlmError):
    """The endpoint did not answer within ``llm.timeout``."""


class ChatBackend(Protocol):
    name: str

    def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
               temperature: float) -> AsyncIterator[str]:
        """The reply's text deltas, as they arrive (an async generator)."""
        ...


class OpenAIChat:
    """A streaming chat client for an OpenAI-compatible endpoint."""

    def __init__(self, base_url: str, api_key: str, model: str, timeout: float) -> None:
        self.name = f"openai-compatible {base_url} ({model})"
        self.model = model
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                         max_retries=0)

    async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                     temperature: float) -> AsyncIterator[str]:
        try:
            response = await self.client.chat.completions.create(
                model=self.model, stream=True, max_tokens=max_tokens, temperature=temperature,
                messages=cast(list[ChatCompletionMessageParam], list(messages)))
        except openai.APITimeoutError as exc:
            raise LlmTimeout(f"no answer: {exc}") from exc
        except openai.APIStatusError as exc:
            raise LlmError(f"HTTP {exc.status_code}: {exc.message}") from exc
        except Exception as exc:  # openai's connection errors, or the transport's own
            raise LlmError(f"{type(exc).__name__}: {exc}") from exc
        try:
            finish = None
            async for chunk in response:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish = choice.finish_reason or finish
                if choice.delta and choice.delta.content:
                    yield choice.delta.content
            if finish not in (None, "stop"):
                log.info("the reply ended with finish_reason %r", finish)
        except openai.APITimeoutError as exc:
            raise LlmTimeout(f"stream stalled: {exc}") from exc
        except Exception as exc:  # a broken body surfaces as the transport's own error
            raise LlmError(f"stream broke off: {type(exc).__name__}: {exc}") from exc
        finally:
            await response.close()  # also on cancellation: the server stops generating


class EchoLlm:
    """No model: answers "You said: <the user's words>", streamed word by word."""

    name = "echo (no llm.base_url)"

    async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                     temperature: float) -> AsyncIterator[str]:
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        for piece in re.findall(r"\S+\s*", f"You said: {user}"):
            yield piece


def load_backend(config: LlmConfig) -> ChatBackend:
    if config.backend == "echo":
        log.warning("llm.backend is echo: replies repeat the user, no model is asked")
        return EchoLlm()
    if not config.base_url:
        raise ValueError("llm.base_url is unset: start the local server first "
                         "(voicebus worker llm and voicebus up do) or set an endpoint")
    return OpenAIChat(config.base_url, config.api_key, config.model, config.timeout)

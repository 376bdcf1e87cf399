"""The LLM stage's helpers: memory per user, the prompt window that keeps the
server's prefix cache, summaries, and the reply policy around the chat backend
(``reply``). The stage itself is ``workers.llm_worker``."""

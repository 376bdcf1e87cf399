"""The LLM stage's helpers: memory per user, the prompt window that keeps the
server's prefix cache, and summaries. The stage itself is ``workers.llm_worker``."""

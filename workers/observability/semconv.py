"""Every span and attribute name voicebus records, in one place.

OpenTelemetry conventions where they exist (``gen_ai.*`` for the LLM call,
``service.name`` for the process); ``voicebus.*`` for the rest. One trace is one
turn: the VAD starts it at speech start (``workers.vad_worker.new_traceparent``);
its span id is the root ``turn`` span, which the gateway records when the turn's
last audio byte was sent (or it was cut off). Every stage span is a child of it.

Transcripts and replies are personal data: they are recorded only with
``tracing.capture_content: true`` (``CONTENT_*`` attributes).
"""

from __future__ import annotations

from typing import Final

# -- span names -------------------------------------------------------------------
TURN: Final = "turn"  # root: speech start -> last audio byte sent (or the cancel)
TURN_DETECTION: Final = "vad.turn_detection"  # speech end -> the detector's decision
ASR: Final = "asr.transcribe"
LLM: Final = "chat"  # gen_ai convention: "{operation} {model}"; the model is appended
TTS: Final = "tts.synthesize"  # one per text chunk
PLAYBACK: Final = "gateway.playback"  # first audio byte sent -> last (or the flush)


# -- attributes ---------------------------------------------------------------------
SESSION_ID: Final = "voicebus.session.id"
TURN_ID: Final = "voicebus.turn.id"
USER_ID: Final = "enduser.id"
STAGE: Final = "voicebus.stage"
CONSUMER: Final = "voicebus.consumer"  # which worker process handled it
DELIVERIES: Final = "voicebus.deliveries"  # > 1: redelivered (a reclaim after a crash)
OUTCOME: Final = "voicebus.outcome"  # emitted, handled, cancelled, failed
INTERRUPTED: Final = "voicebus.turn.interrupted"

TURN_RULE: Final = "voicebus.turn.rule"  # which detector rule ended the turn
TURN_PROBABILITY: Final = "voicebus.turn.smart_turn_probability"
# The transcript's verdict at the deciding pause: complete, incomplete, question, unknown
# (the category only: the words it rests on are content).
TURN_TEXT_VERDICT: Final = "voicebus.turn.text_verdict"
TURN_CONTINUES: Final = "voicebus.turn.continues"  # the dropped turn this one continues
TURN_OUTCOME: Final = "voicebus.turn.outcome"  # answered, interrupted, continued
TURN_CONTINUED: Final = "turn.continued"  # a turn dropped because the user went on
TURN_COMMIT: Final = "turn.commit"  # a tentatively ended turn confirmed (its reply may play)
TURN_TENTATIVE: Final = "voicebus.turn.tentative"  # ended before the transcript's verdict
SPEECH_MS: Final = "voicebus.turn.speech_ms"
SPECULATIVE: Final = "voicebus.asr.speculative"

GEN_AI_OPERATION: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
LLM_TTFT_MS: Final = "voicebus.llm.time_to_first_token_ms"
LLM_CHUNKS: Final = "voicebus.llm.chunks"
# Estimated (workers.llm.memory.estimate_tokens): the prompt, and the part of it that
# extends the user's previous prompt (what a prefix-caching server need not evaluate).
LLM_PROMPT_TOKENS: Final = "voicebus.llm.prompt_tokens"
LLM_PROMPT_REUSED_TOKENS: Final = "voicebus.llm.prompt_reused_tokens"
LLM_TOKENS_PER_S: Final = "voicebus.llm.tokens_per_s"

TTS_SEQ: Final = "voicebus.tts.seq"
TTS_FIRST_AUDIO_MS: Final = "voicebus.tts.time_to_first_audio_ms"
TTS_RTF: Final = "voicebus.tts.real_time_factor"
TTS_BACKEND: Final = "voicebus.tts.backend"

LATENCY_PREFIX: Final = "voicebus.latency_ms."  # + end_of_speech_to_first_audio, asr, ...
PLAYED_SAMPLES: Final = "voicebus.playback.played_samples"
SENT_SAMPLES: Final = "voicebus.playback.sent_samples"

CONTENT_TRANSCRIPT: Final = "voicebus.content.transcript"  # only with capture_content
CONTENT_REPLY: Final = "voicebus.content.reply"

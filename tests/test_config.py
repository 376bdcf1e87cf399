"""Configuration loading: defaults, YAML file, environment overrides and error messages."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from workers.config import Config
from workers.config_load import ConfigError, load_config

ROOT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep ./config.yaml discovery away from the repo's own file.
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_root_config_yaml_is_exactly_the_defaults() -> None:
    assert load_config(ROOT_CONFIG, env={}) == Config()
    # Every section and key is spelled out, not just left to the defaults.
    assert yaml.safe_load(ROOT_CONFIG.read_text()) == Config().model_dump()


def test_no_file_gives_defaults() -> None:
    assert load_config(env={}) == Config()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_dump_yaml_round_trips(tmp_path: Path) -> None:
    cfg = Config().model_copy(update={"log": Config().log.model_copy(update={"level": "DEBUG"})})
    assert load_config(write(tmp_path, cfg.dump_yaml()), env={}) == cfg


def test_models_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Config().vad.fallback.silence_timeout = 2.0  # type: ignore[misc]


def test_cwd_config_yaml_is_found(tmp_path: Path) -> None:
    write(tmp_path, "asr:\n  beam_size: 3\n")
    assert load_config(env={}).asr.beam_size == 3


def test_precedence_path_over_env_var_over_cwd(tmp_path: Path) -> None:
    write(tmp_path, "asr:\n  beam_size: 2\n")
    via_env = write(tmp_path, "asr:\n  beam_size: 3\n", "env.yaml")
    explicit = write(tmp_path, "asr:\n  beam_size: 4\n", "explicit.yaml")
    env = {"VOICEBUS_CONFIG": str(via_env)}
    assert load_config(env=env).asr.beam_size == 3
    assert load_config(explicit, env=env).asr.beam_size == 4


def test_env_overrides_are_typed() -> None:
    cfg = load_config(
        env={
            "VOICEBUS_VAD__FALLBACK__SILENCE_TIMEOUT": "1.2",
            "VOICEBUS_VAD__SPECULATIVE_ASR": "false",
            "VOICEBUS_REDIS__MAXLEN__AUDIO": "8000",
            "voicebus_log__level": "debug",
            "VOICEBUS_TTS__VOICE": "null",
        }
    )
    assert cfg.vad.fallback.silence_timeout == 1.2
    assert cfg.vad.speculative_asr is False
    assert cfg.redis.maxlen.audio == 8000
    assert cfg.redis.maxlen.queue == 10000  # siblings keep their defaults
    assert cfg.log.level == "DEBUG"
    assert cfg.tts.voice is None


def test_env_string_keys_stay_text() -> None:
    # YAML would read these as False, an int and a mapping.
    cfg = load_config(
        env={
            "VOICEBUS_ASR__LANGUAGE": "no",
            "VOICEBUS_LLM__API_KEY": "12345",
            "VOICEBUS_LLM__SYSTEM_PROMPT": "Note: be brief",
        }
    )
    assert (cfg.asr.language, cfg.llm.api_key) == ("no", "12345")
    assert cfg.llm.system_prompt == "Note: be brief"


def test_env_beats_file(tmp_path: Path) -> None:
    p = write(tmp_path, "vad:\n  fallback:\n    silence_timeout: 2.0\n    enabled: false\n")
    cfg = load_config(p, env={"VOICEBUS_VAD__FALLBACK__SILENCE_TIMEOUT": "0.9"})
    assert cfg.vad.fallback.silence_timeout == 0.9
    assert cfg.vad.fallback.enabled is False


def test_unrelated_voicebus_variables_are_ignored() -> None:
    env = {"VOICEBUS_TEST_REDIS": "1", "VOICEBUS_SOMETHING": "x", "VOICEBUS_CONFIG": ""}
    assert load_config(env=env) == Config()


def test_unknown_key_in_yaml_names_dotted_key_and_file(tmp_path: Path) -> None:
    p = write(tmp_path, "vad:\n  smart_turm:\n    threshold: 0.4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert f"vad.smart_turm: unknown key (from {p})" in str(exc.value)


def test_unknown_key_in_env_names_dotted_key_and_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"VOICEBUS_VAD__SMART_TURM__THRESHOLD": "0.4"})
    assert "vad.smart_turm: unknown key (from VOICEBUS_VAD__SMART_TURM__THRESHOLD)" in str(
        exc.value
    )


@pytest.mark.parametrize(
    ("name", "dotted"),
    [
        ("VOICEBUS_VADD__TYPE", "vadd"),  # unknown section
        ("VOICEBUS_LOG__LEVEL__X", "log.level.x"),  # below a scalar key
        ("VOICEBUS_VAD", "vad"),  # a whole section
    ],
)
def test_bad_env_paths_are_errors(name: str, dotted: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={name: "1"})
    assert f"{dotted}:" in str(exc.value)
    assert name in str(exc.value)


def test_bad_value_is_named_with_value_and_source() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"VOICEBUS_VAD__FALLBACK__SILENCE_TIMEOUT": "-1"})
    msg = str(exc.value)
    assert "vad.fallback.silence_timeout: Input should be greater than 0" in msg
    assert "got -1, from VOICEBUS_VAD__FALLBACK__SILENCE_TIMEOUT" in msg


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    p = write(tmp_path, "vad:\n  type: neural\n  smart_turn:\n    threshold: 1.5\nasr: {}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={"VOICEBUS_REDIS__MAXLEN__AUDIO": "10", "VOICEBUS_ASR__NOPE": "1"})
    msg = str(exc.value)
    for expected in (
        f"vad.type: Input should be 'hybrid', 'silero' or 'smart_turn' (got 'neural', from {p})",
        f"vad.smart_turn.threshold: Input should be less than or equal to 1 (got 1.5, from {p})",
        "redis.maxlen.audio: Input should be greater than or equal to 100 (got 10, from "
        "VOICEBUS_REDIS__MAXLEN__AUDIO)",
        "asr.nope: unknown key (from VOICEBUS_ASR__NOPE)",
    ):
        assert expected in msg
    assert len(exc.value.problems) == 4


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("VOICEBUS_ASR__BEAM_SIZE", "0"),
        ("VOICEBUS_REDIS__KEY_PREFIX", "has space"),
        ("VOICEBUS_REDIS__CLAIM_IDLE_MS", "50"),
        ("VOICEBUS_WORKER__CONCURRENCY", "0"),
        ("VOICEBUS_TTS__BACKEND", "festival"),
        ("VOICEBUS_VAD__QUALITY_GATING__MIN_SNR", "-0.1"),
        ("VOICEBUS_LLM__WORD_CHUNK_MIN", "9"),
        ("VOICEBUS_TRACING__OTLP_PROTOCOL", "thrift"),
    ],
)
def test_out_of_range_values_fail(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(env={key: value})


def test_redis_url_mapping_and_precedence(tmp_path: Path) -> None:
    assert load_config(env={"REDIS_URL": "redis://a:6379/0"}).redis.url == "redis://a:6379/0"
    p = write(tmp_path, "redis:\n  url: redis://file:6379\n")
    assert load_config(p, env={"REDIS_URL": "redis://env:1"}).redis.url == "redis://env:1"
    both = {"REDIS_URL": "redis://conventional:1", "VOICEBUS_REDIS__URL": "redis://ours:1"}
    assert load_config(env=both).redis.url == "redis://ours:1"
    with pytest.raises(ConfigError, match=r"redis\.url: .*from REDIS_URL"):
        load_config(env={"REDIS_URL": "http://not-redis"})


def test_otel_endpoint_mapping_and_precedence() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert load_config(env=env).tracing.otlp_endpoint == "http://collector:4318"
    env["VOICEBUS_TRACING__OTLP_ENDPOINT"] = "http://ours:4318"
    assert load_config(env=env).tracing.otlp_endpoint == "http://ours:4318"


def test_missing_voicebus_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"not found.*nope\.yaml.*VOICEBUS_CONFIG"):
        load_config(env={"VOICEBUS_CONFIG": str(missing)})
    with pytest.raises(ConfigError, match="not found"):
        load_config(missing, env={})


def test_memory_cross_field_validation(tmp_path: Path) -> None:
    p = write(tmp_path, "memory:\n  max_messages_per_user: 30\n", "mem.yaml")
    with pytest.raises(ConfigError, match=rf"memory: .*trigger_at.*from {re.escape(str(p))}"):
        load_config(p, env={})
    with pytest.raises(ConfigError, match=r"memory: .*VOICEBUS_MEMORY__SUMMARIZATION__KEEP_RECENT"):
        load_config(env={"VOICEBUS_MEMORY__SUMMARIZATION__KEEP_RECENT": "40"})
    ok = {"VOICEBUS_MEMORY__SUMMARIZATION__TRIGGER_AT": "50"}  # equal to the cap is allowed
    assert load_config(env=ok).memory.summarization.trigger_at == 50
    off = {"VOICEBUS_MEMORY__MAX_MESSAGES_PER_USER": "20",
           "VOICEBUS_MEMORY__SUMMARIZATION__ENABLED": "false"}
    assert load_config(env=off).memory.max_messages_per_user == 20


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "vad:\n  type: [hybrid\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(p))}: invalid YAML"):
        load_config(p, env={})


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    p = write(tmp_path, "- vad\n- asr\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p, env={})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_adaptive_tuning_bounds_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"VOICEBUS_VAD__ADAPTIVE__MAX_STRETCH": "0.5"})
    assert "vad.adaptive.max_stretch" in str(err.value)
    assert load_config(env={"VOICEBUS_VAD__ADAPTIVE__ENABLED": "false"}).vad.adaptive.enabled \
        is False


def test_vad_thresholds_must_be_ordered() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"VOICEBUS_VAD__SMART_TURN__CONFIDENCE_THRESHOLD": "0.3"})
    assert "vad.smart_turn" in str(err.value)


def test_the_prompt_budget_follows_the_local_servers_context() -> None:
    cfg = Config()  # the local server: n_ctx 2048, replies of at most 256 tokens
    assert cfg.prompt_budget() == int((2048 - 256) * 0.85)
    bigger = load_config(env={"VOICEBUS_LLM__LOCAL__N_CTX": "8192"})
    assert bigger.prompt_budget() == int((8192 - 256) * 0.85)
    capped = load_config(env={"VOICEBUS_LLM__LOCAL__N_CTX": "8192",
                              "VOICEBUS_CONTEXT_WINDOW__MAX_TOKENS": "3000"})
    assert capped.prompt_budget() == 3000
    remote = load_config(env={"VOICEBUS_LLM__BASE_URL": "http://llm:8000/v1"})
    assert remote.prompt_budget() == 4000  # its context is not ours to know


def test_a_context_too_small_for_the_reply_is_refused() -> None:
    with pytest.raises(ConfigError, match="n_ctx 512 leaves"):
        load_config(env={"VOICEBUS_LLM__LOCAL__N_CTX": "512"})
    with pytest.raises(ConfigError, match="trim_block must be"):
        load_config(env={"VOICEBUS_CONTEXT_WINDOW__TRIM_BLOCK": "60"})


def test_the_out_stream_must_outlast_a_turn() -> None:
    """A VAD that takes a session over reads the open turn back from the out stream,
    so the stream must keep at least the longest turn (or everything: 0)."""
    with pytest.raises(ConfigError, match="out_keep_s must be 0 or above"):
        load_config(env={"VOICEBUS_REDIS__OUT_KEEP_S": "30"})
    with pytest.raises(ConfigError, match="out_keep_s must be 0 or above"):
        load_config(env={"VOICEBUS_VAD__FALLBACK__MAX_TURN_DURATION": "300"})
    assert load_config(env={"VOICEBUS_REDIS__OUT_KEEP_S": "0"}).redis.out_keep_s == 0
    assert load_config(env={}).redis.out_keep_s > load_config(env={}).vad.fallback.max_turn_duration

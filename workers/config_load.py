"""Reading the configuration: built-in defaults < YAML file < environment, validated
into a ``workers.config.Config``; every bad key is reported with where its value came
from (the file, or the ``VOICEBUS_*`` variable)."""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from workers.config import Config

ENV_PREFIX = "VOICEBUS_"
# Conventional variables other tools already set; the VOICEBUS_ form still wins.
CONVENTIONAL_ENV = {
    "REDIS_URL": "redis.url",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "tracing.otlp_endpoint",
}


class ConfigError(ValueError):
    """Invalid configuration; each problem names a dotted key and where its value came from."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))



def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load defaults, then the YAML file (if any), then environment overrides.

    File: `path`, else $VOICEBUS_CONFIG, else ./config.yaml if present, else none.
    Raises ConfigError listing every bad key with its source.
    """
    env = os.environ if env is None else env
    data: dict[Any, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> where its value came from
    file = _find_file(path, env)
    if file is not None:
        data = _read_yaml(file)
        _record(data, (), str(file), sources)
    problems = _apply_env(data, sources, env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems += [_describe(dict(e), sources) for e in exc.errors()]
    else:
        if not problems:
            return config
    raise ConfigError(problems)


def _find_file(path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    if path is not None:
        p, origin = Path(path).expanduser(), "load_config argument"
    elif env.get("VOICEBUS_CONFIG"):
        p, origin = Path(env["VOICEBUS_CONFIG"]).expanduser(), "VOICEBUS_CONFIG"
    else:
        p = Path("config.yaml")
        return p if p.is_file() else None
    if not p.is_file():
        raise ConfigError([f"config file not found: {p} (from {origin})"])
    return p


def _read_yaml(p: Path) -> dict[Any, Any]:
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: invalid YAML: {exc}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping, got {type(data).__name__}"])
    return data


def _record(value: object, prefix: tuple[str, ...], source: str, sources: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _record(v, (*prefix, str(k)), source, sources)
    elif prefix:
        sources[".".join(prefix)] = source


def _apply_env(data: dict[Any, Any], sources: dict[str, str], env: Mapping[str, str]) -> list[str]:
    problems: list[str] = []
    overrides = [
        (tuple(key.split(".")), env[name], name) for name, key in CONVENTIONAL_ENV.items()
        if env.get(name)
    ]
    for name in sorted(env):  # sorted: deterministic when names differ only by case
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        if parts[0] not in Config.model_fields and len(parts) == 1:
            continue  # VOICEBUS_CONFIG and friends: not a config key
        overrides.append((parts, env[name], name))
    for parts, raw, name in overrides:
        info = _field_at(parts)
        if isinstance(info, str):
            problems.append(f"{info} (from {name})")
            continue
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_value(raw, info)
        dotted = ".".join(parts)
        for key in [k for k in sources if f"{k}.".startswith(f"{dotted}.")]:
            del sources[key]
        sources[dotted] = name
    return problems


def _field_at(parts: tuple[str, ...]) -> FieldInfo | str:
    """The leaf field `parts` names, or a problem description."""
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            return f"{'.'.join(parts[: i + 1])}: unknown key"
        info = model.model_fields[part]
        ann = info.annotation
        if i == len(parts) - 1:
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                return f"{'.'.join(parts)}: is a section; set its keys one by one"
            return info
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return f"{'.'.join(parts[: i + 2])}: unknown key"
        model = ann
    raise AssertionError("unreachable")


def _parse_value(raw: str, info: FieldInfo) -> object:
    optional = type(None) in get_args(info.annotation)
    if raw.strip().lower() in ("", "null", "~", "none") and optional:
        return None
    if info.annotation is str or str in get_args(info.annotation):
        return raw  # keep "no", "1.0" or "a: b" as text for string keys
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # let pydantic report it as a bad value


def _describe(err: dict[str, Any], sources: dict[str, str]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    src = _source_of(loc, sources)
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (from {src})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    got = "" if isinstance(value, dict | list) else f"got {_short(value)}, "
    return f"{loc}: {msg} ({got}from {src})"


def _source_of(loc: str, sources: dict[str, str]) -> str:
    if loc in sources:
        return sources[loc]
    below = dict.fromkeys(s for k, s in sources.items() if k.startswith(loc + "."))
    if below:
        return ", ".join(below)
    parents = [k for k in sources if loc.startswith(f"{k}.")]
    return sources[max(parents, key=len)] if parents else "defaults"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

"""Structured logs: every line names the component, the session and the turn.

Ids live in contextvars, so each asyncio task sees the ids of the context it was
created in, and a `log_context` inside one task never leaks into another.
"""

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO, Any

session_id: ContextVar[str | None] = ContextVar("voicebus_session_id", default=None)
turn_id: ContextVar[str | None] = ContextVar("voicebus_turn_id", default=None)
# log_context's parameters shadow the names above.
_SESSION, _TURN = session_id, turn_id

FORMATS = ("text", "json")
# Libraries that log per request or per chunk at INFO/DEBUG.
NOISY_LOGGERS = (
    "httpx", "httpcore", "openai", "urllib3", "redis", "faster_whisper", "ctranslate2",
    "onnxruntime", "huggingface_hub", "filelock", "numba", "matplotlib", "websockets",
    "aiohttp.access", "opentelemetry", "hpack", "PIL",
)
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName", "session_id", "turn_id",
}


@contextmanager
def log_context(session_id: str | None = None, turn_id: str | None = None) -> Iterator[None]:
    """Tag every log line in this block (and tasks started in it) with these ids.

    An id left as None keeps the enclosing value, so a turn nests inside a session.
    """
    tokens: list[tuple[ContextVar[str | None], Token[str | None]]] = []
    if session_id is not None:
        tokens.append((_SESSION, _SESSION.set(session_id)))
    if turn_id is not None:
        tokens.append((_TURN, _TURN.set(turn_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _ContextFilter(logging.Filter):
    """Stamps the ids at emit time, in the caller's context.

    A record that already carries `session_id`/`turn_id` (passed via `extra=`, for
    code acting on behalf of a session outside its context) keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = _SESSION.get()
        if getattr(record, "turn_id", None) is None:
            record.turn_id = _TURN.get()
        return True


class _Formatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    @staticmethod
    def timestamp(record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, tz=UTC)
        return f"{when:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z"

    @staticmethod
    def extras(record: logging.LogRecord) -> dict[str, Any]:
        return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}

    def exception_text(self, record: logging.LogRecord) -> str | None:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        parts = [p for p in (record.exc_text, record.stack_info) if p]
        return "\n".join(parts) if parts else None


class TextFormatter(_Formatter):
    """`<ts> <LEVEL> <component> session=<id> turn=<id> <message> key=value...`"""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{self.timestamp(record)} {record.levelname:<5} {self.component} "
            f"session={getattr(record, 'session_id', None) or '-'} "
            f"turn={getattr(record, 'turn_id', None) or '-'} {record.getMessage()}"
        )
        for key, value in self.extras(record).items():
            line += f" {key}={_text_value(value)}"
        exc = self.exception_text(record)
        return f"{line}\n{exc}" if exc else line


class JsonFormatter(_Formatter):
    """One JSON object per line; `extra=` fields are added but never replace the core keys."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": self.timestamp(record),
            "level": record.levelname,
            "component": self.component,
            "logger": record.name,
            "session": getattr(record, "session_id", None),
            "turn": getattr(record, "turn_id", None),
            "msg": record.getMessage(),
        }
        exc = self.exception_text(record)
        if exc:
            obj["exc"] = exc
        for key, value in self.extras(record).items():
            obj.setdefault(key, value)
        return json.dumps(obj, default=str, ensure_ascii=False)


class _VoicebusHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler setup_logging owns, so a second call replaces it."""


def setup_logging(
    level: str, fmt: str, *, component: str, stream: IO[str] | None = None
) -> logging.Handler:
    """Send all logs to one handler on `stream` (default: stderr) and return it.

    Safe to call again (e.g. after reloading config): the previous handler is replaced.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {FORMATS}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _VoicebusHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _VoicebusHandler(sys.stderr if stream is None else stream)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        TextFormatter(component) if fmt == "text" else JsonFormatter(component)
    )
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))
    return handler


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # Quote anything that would break `key=value` splitting.
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class Throttled:
    """At most ``burst`` lines per ``window_s`` from one kind of event that anyone on the
    network can cause (a refused token): the rest are counted and said in one line when
    the next window opens, so the log cannot be flooded."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10,
                 window_s: float = 60.0) -> None:
        self.logger, self.burst, self.window_s = logger, burst, window_s
        self._opened = -window_s  # the first event opens a window
        self._logged = 0
        self._suppressed = 0

    def info(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._opened >= self.window_s:
            if self._suppressed:
                self.logger.info("... and %d more like it in %.0f s, not logged",
                                 self._suppressed, now - self._opened)
            self._opened, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.burst:
            self._logged += 1
            self.logger.info(msg, *args)
        else:
            self._suppressed += 1

"""Structured logging: ids from log_context on every line, in both formats."""

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Iterator

import pytest

from workers.observability.logs import (
    Throttled,
    log_context,
    session_id,
    setup_logging,
    turn_id,
)

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>[A-Z]+) +(?P<component>\S+) "
    r"session=(?P<session>\S+) turn=(?P<turn>\S+) (?P<rest>.*)$"
)


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def capture(fmt: str, level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level, fmt, component="asr-worker", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_text_line_carries_ids_and_extras() -> None:
    stream = capture("text")
    log = logging.getLogger("voicebus.test")
    log.info("outside")
    with log_context(session_id="s1", turn_id="t1"):
        log.info("transcribed %d words", 3, extra={"ms": 12, "text": "hi there"})
    outside, inside = (TEXT_LINE.match(line) for line in lines(stream))
    assert outside and inside
    assert (outside["session"], outside["turn"]) == ("-", "-")
    assert (inside["level"], inside["component"]) == ("INFO", "asr-worker")
    assert (inside["session"], inside["turn"]) == ("s1", "t1")
    assert inside["rest"] == 'transcribed 3 words ms=12 text="hi there"'
    assert re.match(r"^\S+ INFO  asr-worker ", lines(stream)[0])


def test_json_line_carries_ids_extras_and_exception() -> None:
    stream = capture("json")
    log = logging.getLogger("voicebus.test")
    with log_context(session_id="s1", turn_id="t1"):
        log.warning("slow", extra={"stage": "asr", "ms": 412.5})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    log.info("after")
    first, second, third = _json_objects(stream)
    assert first["session"] == "s1" and first["turn"] == "t1"
    assert first["level"] == "WARNING" and first["component"] == "asr-worker"
    assert first["logger"] == "voicebus.test" and first["msg"] == "slow"
    assert first["stage"] == "asr" and first["ms"] == 412.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert "exc" not in first
    assert "RuntimeError: boom" in second["exc"] and second["level"] == "ERROR"
    assert third["session"] is None and third["turn"] is None


def _json_objects(stream: io.StringIO) -> list[dict[str, object]]:
    # One object per physical line, even when the record has a multi-line traceback.
    return [json.loads(line) for line in lines(stream)]


def test_extra_cannot_overwrite_core_fields() -> None:
    stream = capture("json")
    with log_context(session_id="real"):
        logging.getLogger("x").info("m", extra={"level": "fake", "session": "fake"})
    (obj,) = _json_objects(stream)
    assert obj["level"] == "INFO" and obj["session"] == "real"


def test_nested_context_keeps_outer_session_and_restores() -> None:
    stream = capture("json")
    log = logging.getLogger("x")
    with log_context(session_id="s1"):
        with log_context(turn_id="t2"):
            log.info("inner")
        log.info("outer")
    assert session_id.get() is None and turn_id.get() is None
    inner, outer = _json_objects(stream)
    assert (inner["session"], inner["turn"]) == ("s1", "t2")
    assert (outer["session"], outer["turn"]) == ("s1", None)


def test_setup_logging_is_idempotent_and_levels_apply() -> None:
    first = io.StringIO()
    setup_logging("INFO", "text", component="c", stream=first)
    stream = capture("text", level="WARNING")
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_VoicebusHandler"]
    assert len(ours) == 1
    logging.getLogger("x").info("dropped")
    logging.getLogger("x").warning("kept")
    assert first.getvalue() == ""
    assert len(lines(stream)) == 1 and "kept" in stream.getvalue()
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING


def test_bad_level_or_format_raise() -> None:
    with pytest.raises(ValueError):
        setup_logging("LOUD", "text", component="c")
    with pytest.raises(ValueError):
        setup_logging("INFO", "xml", component="c")


async def test_contexts_do_not_leak_between_tasks() -> None:
    stream = capture("json")
    log = logging.getLogger("x")
    both_inside = asyncio.Barrier(2)

    async def turn(sid: str) -> None:
        with log_context(session_id=sid, turn_id=f"{sid}-t"):
            await both_inside.wait()  # the other task has entered its own context by now
            log.info("working", extra={"who": sid})
            await asyncio.sleep(0)
            log.info("done", extra={"who": sid})

    with log_context(session_id="parent"):
        await asyncio.gather(turn("a"), turn("b"))
        log.info("parent")
    objs = _json_objects(stream)
    assert len(objs) == 5
    for obj in objs[:4]:
        assert obj["session"] == obj["who"] and obj["turn"] == f"{obj['who']}-t"
    assert objs[4]["session"] == "parent" and objs[4]["turn"] is None


async def test_task_inherits_context_it_was_created_in() -> None:
    stream = capture("text")
    with log_context(session_id="s9", turn_id="t9"):
        task = asyncio.create_task(asyncio.sleep(0, result=None))
        child = asyncio.create_task(_log_later())
    await task
    await child
    (line,) = lines(stream)
    m = TEXT_LINE.match(line)
    assert m and (m["session"], m["turn"]) == ("s9", "t9")


async def _log_later() -> None:
    await asyncio.sleep(0)
    logging.getLogger("x").info("from child task")


def test_throttled_logs_a_burst_then_counts_the_rest() -> None:
    logger = logging.getLogger("voicebus.test.throttled")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        throttled = Throttled(logger, burst=3, window_s=0.2)
        for i in range(50):
            throttled.info("refused %d", i)
        assert seen == ["refused 0", "refused 1", "refused 2"]
        time.sleep(0.25)
        throttled.info("refused %d", 50)
        assert seen[3].startswith("... and 47 more like it in") and seen[4] == "refused 50"
    finally:
        logger.removeHandler(handler)

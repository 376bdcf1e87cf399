"""The rules the tree keeps (ARCHITECTURE.md), checked on the code's own imports.

Every ``import``/``from ... import`` of every module is read with ``ast`` — at module
level and inside functions (a lazy import is still a dependency) — and resolved to
the project module it names. Fast: no module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

OURS = ("schemas", "workers", "edge", "voicebus")
STAGES = ("workers.vad_worker", "workers.asr_worker", "workers.llm_worker", "workers.tts_worker")
# What each stage's own helpers are; another stage must not use them.
STAGE_HELPERS = {"workers.vad_worker": "workers.vad", "workers.llm_worker": "workers.llm"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in OURS for p in (ROOT / top).rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` counts as ``a.b`` when
    ``a.b`` is a module, else as ``a``)."""
    known = modules()
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
    return {name for name in out if name.split(".")[0] in OURS}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(selected: list[str], forbidden: object) -> list[str]:
    found = []
    for name in selected:
        for target in sorted(imports(modules()[name])):
            if forbidden(name, target):  # type: ignore[operator]
                found.append(f"{name} imports {target}")
    return found


def test_schemas_import_nothing_of_ours() -> None:
    mods = [m for m in modules() if within(m, "schemas")]
    assert offenders(mods, lambda _, t: not within(t, "schemas")) == []


def test_the_runtime_imports_no_stage_and_no_backend() -> None:
    mods = [m for m in modules() if within(m, "workers.runtime")]
    assert len(mods) >= 8

    def bad(_: str, target: str) -> bool:
        return target in STAGES or within(target, "workers.backends") or any(
            within(target, helpers) for helpers in STAGE_HELPERS.values())
    assert offenders(mods, bad) == []


def test_stages_never_import_each_other_or_each_others_helpers() -> None:
    def bad(stage: str, target: str) -> bool:
        if target in STAGES and target != stage:
            return True
        return any(within(target, helpers) for owner, helpers in STAGE_HELPERS.items()
                   if owner != stage)
    assert offenders(list(STAGES), bad) == []


def test_stages_use_backends_through_their_contracts() -> None:
    # One contract module per model family, which loads the implementation by name.
    contracts = {"workers.backends." + m for m in ("vad", "asr", "llm", "tts", "audio")}
    assert offenders(list(STAGES), lambda _, t: within(t, "workers.backends")
                     and t not in contracts) == []


def test_the_stage_helpers_import_no_stage() -> None:
    mods = [m for m in modules() if any(within(m, h) for h in (*STAGE_HELPERS.values(),
                                                                 "workers.text"))]
    assert offenders(mods, lambda _, t: t in STAGES) == []


@pytest.mark.parametrize("module", ["edge.client", "edge.client_session", "edge.audio_io"])
def test_the_device_side_imports_only_schemas_the_protocol_and_itself(module: str) -> None:
    device = {"edge.client", "edge.client_session", "edge.audio_io", "edge.protocol",
              "edge.errors"}
    assert offenders([module], lambda _, t: not (t in device or within(t, "schemas"))) == []


def test_the_gateway_uses_no_stage_or_stage_helper() -> None:
    # It talks to the stages through streams only (what was heard is a Heard event).
    mods = [m for m in modules() if within(m, "edge")]

    def bad(_: str, target: str) -> bool:
        return target in STAGES or any(within(target, h) for h in STAGE_HELPERS.values())
    assert offenders(mods, bad) == []


def test_observability_and_the_runtime_use_no_launcher() -> None:
    mods = [m for m in modules() if within(m, "workers")]
    assert offenders(mods, lambda _, t: within(t, "voicebus")) == []


def test_no_module_outside_bench_and_tests_is_over_the_size_limit() -> None:
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_the_checker_sees_lazy_and_module_imports(tmp_path: Path) -> None:
    # A stage that imported another inside a function, and a helper by package: found.
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom workers import llm_worker\n"
                   "def f():\n    from workers.vad.turn_text import judge_text\n")
    assert imports(bad) == {"workers.llm_worker", "workers.vad.turn_text"}


def test_the_stage_registry_names_each_stage_module_and_how_it_consumes() -> None:
    from workers.stages import REGISTRY

    assert set(REGISTRY) == {"vad", "asr", "llm", "tts"}
    for name, spec in REGISTRY.items():
        source = modules()[spec.module].read_text()
        made = "JobStage(" if spec.kind == "job" else "SessionStage("
        assert f'{made}"{name}"' in source, (name, spec)
        assert (spec.span is None) == (spec.kind == "session")

"""A device installs only the base package (no "server" extra): the client commands work
and the bus commands say what to install. Simulated by hiding the server packages."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

HIDE = """
import importlib.abc, sys
SERVER = {"redis", "msgspec", "onnxruntime", "faster_whisper", "ctranslate2", "openai",
          "piper", "soxr", "llama_cpp", "pipecat", "hiredis"}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in SERVER:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Hide())
import importlib.util
_find = importlib.util.find_spec
def _hidden(name, *a):
    return None if name.split(".")[0] in SERVER else _find(name, *a)
importlib.util.find_spec = _hidden
from voicebus.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HIDE, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60,
                          env={"VOICEBUS_GATEWAY__SECRET": "s" * 32, "PATH": "/usr/bin"})


def test_device_commands_work_without_the_server_packages() -> None:
    token = run("token", "--user", "alice")
    assert token.returncode == 0, token.stderr
    assert token.stdout.count(".") == 1
    talk = run("talk", "--help")
    assert talk.returncode == 0 and "--wav" in talk.stdout


def test_bus_commands_name_the_missing_install() -> None:
    for command in (["worker", "vad"], ["up"], ["gateway"], ["demo"]):
        result = run(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert "pip install 'voicebus[server]'" in result.stderr

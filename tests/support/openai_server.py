"""A scripted OpenAI-compatible chat server for tests: a real HTTP server on 127.0.0.1.

``POST /v1/chat/completions`` answers with Server-Sent Events in the OpenAI format
(``data: {chat.completion.chunk}`` ... ``data: [DONE]``), sent with chunked transfer
encoding, as llama.cpp's and vLLM's servers do. What each request gets is scripted:
the n-th request gets ``scripts[n]`` (the last script repeats).

* ``Script.reply(pieces, delay=..., pauses={i: s})``: the reply split into the given
  token pieces, ``delay`` before each, ``pauses[i]`` more before piece ``i``;
* ``Script.hang()``: no answer at all (not even headers) for ``seconds``;
* ``Script.die(pieces, after=n)``: ``n`` pieces, then the connection is closed in the
  middle of the body (no ``[DONE]``, no chunked terminator: the client sees a broken
  stream);
* ``Script.error(500)``: an HTTP error with an OpenAI-style JSON body;
* ``Script.reply(pieces, hold=(n, gate))``: ``n`` pieces, then nothing until the test
  sets ``gate`` (a ``threading.Event``), the server stops or the client hangs up: a
  reply that is "mid-way" for as long as the test needs, whatever the machine's load.

Every request is recorded (its JSON body, when it came, whether the client hung up
before the reply was complete).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Script:
    pieces: Sequence[str] = ()
    delay: float = 0.0  # seconds before every piece
    pauses: Mapping[int, float] = field(default_factory=dict)  # extra seconds before piece i
    hang_s: float = 0.0  # > 0: answer nothing for this long, then close
    die_after: int | None = None  # close the connection after this many pieces
    status: int = 200
    hold: tuple[int, threading.Event] | None = None  # after n pieces, wait for the event

    @classmethod
    def reply(cls, pieces: Sequence[str], delay: float = 0.0,
              pauses: Mapping[int, float] | None = None,
              hold: tuple[int, threading.Event] | None = None) -> Script:
        return cls(pieces=tuple(pieces), delay=delay, pauses=dict(pauses or {}), hold=hold)

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Script:
        return cls(hang_s=seconds)

    @classmethod
    def die(cls, pieces: Sequence[str], after: int, delay: float = 0.0) -> Script:
        return cls(pieces=tuple(pieces), die_after=after, delay=delay)

    @classmethod
    def error(cls, status: int = 500) -> Script:
        return cls(status=status)


@dataclass
class Request:
    body: dict[str, Any]
    at: float  # time.time() when it arrived
    finished: bool = False  # the scripted answer was sent completely
    aborted: bool = False  # the client hung up while we were sending

    @property
    def user_text(self) -> str:
        users = [m["content"] for m in self.body.get("messages", []) if m["role"] == "user"]
        return users[-1] if users else ""


class ScriptedOpenAI:
    """``with ScriptedOpenAI([Script.reply(...)]) as server: server.url`` (ends in /v1)."""

    def __init__(self, scripts: Sequence[Script] = ()) -> None:
        self.scripts = list(scripts) or [Script.reply(["OK."])]
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True,
                                        name="scripted-openai")

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> ScriptedOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # wakes hanging handlers
        self._http.shutdown()
        self._http.server_close()

    def _next(self, body: dict[str, Any]) -> tuple[Request, Script]:
        with self._lock:
            request = Request(body, time.time())
            script = self.scripts[min(len(self.requests), len(self.scripts) - 1)]
            self.requests.append(request)
            return request, script

    def sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def wait_for(self, gate: threading.Event, peer: socket.socket) -> None:
        """Until the test sets ``gate``, the server stops or the client hangs up.

        A hang-up is seen here, while nothing is written: a write after it can still
        succeed (the kernel buffers it before the client's reset comes back), so
        checking only on write would miss it at random.
        """
        while not (gate.is_set() or self._stop.is_set()):
            readable, _, _ = select.select([peer], [], [], 0.05)
            # The client sends nothing while it reads a reply: readable means it closed.
            if readable and not peer.recv(1, socket.MSG_PEEK):
                raise ConnectionResetError("the client hung up while the reply was held")


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _chunks(model: str, pieces: Sequence[str]) -> Iterator[dict[str, Any]]:
    base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}
    for i, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _handler(server: ScriptedOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._json(404, {"error": {"message": f"no route {self.path}"}})
                return
            request, script = server._next(body)
            try:
                self._answer(request, script, body)
            except (BrokenPipeError, ConnectionResetError):
                request.aborted = True
                self.close_connection = True

        def _answer(self, request: Request, script: Script, body: dict[str, Any]) -> None:
            if script.hang_s > 0:
                server.sleep(script.hang_s)
                self.close_connection = True
                return
            if script.status != 200:
                self._json(script.status, {"error": {"message": "scripted failure",
                                                     "type": "server_error", "code": None}})
                request.finished = True
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            model = str(body.get("model", "scripted"))
            for i, chunk in enumerate(_chunks(model, script.pieces)):
                if script.die_after is not None and i >= script.die_after:
                    self.close_connection = True  # mid-body: no terminator, no [DONE]
                    return
                if script.hold is not None and i == script.hold[0]:
                    server.wait_for(script.hold[1], self.connection)
                server.sleep(script.delay + script.pauses.get(i, 0.0))
                self._write(_sse(chunk))
            if script.die_after is not None:
                self.close_connection = True
                return
            done = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            self._write(_sse(done) + _sse("[DONE]"))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            request.finished = True

        def _write(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

    return Handler

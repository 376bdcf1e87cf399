"""The browser client: the gateway serves the page in ``edge/web/`` on its own port.

Browsers talk to the gateway like any device (``edge.protocol``, the token in
``?token=`` since a browser's WebSocket cannot set headers); what they also need is
plain HTTP, answered here from the gateway's handshake hook:

* ``GET /`` and ``GET /<file>``: the page's static files (``edge/web/``, shipped as
  package data), read once at start. Only those names are served: no path is ever
  joined from the request, so nothing else on disk can be reached.
* ``GET /v1/token`` with ``Authorization: Bearer <token>``: ``200 {"user_id": U}`` or
  ``401 {"reason": R}``. A browser never sees why a WebSocket handshake failed (the
  HTTP 401 and its text are hidden from scripts, only a close with 1006 shows), so the
  page asks here to tell the user that the token expired, say, instead of retrying.
"""

from __future__ import annotations

import http
import json
from collections.abc import Callable
from email.utils import formatdate
from importlib.resources import files
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

TOKEN_CHECK_PATH: Final = "/v1/token"
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
    ".ico": "image/x-icon"}
# The page loads only its own files and talks only to its own origin (the WebSocket
# included: CSP's 'self' covers ws:/wss: to the same host). No inline script.
PAGE_POLICY: Final = ("default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                      "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

# Checks a token for this connection: the user id, or TokenError with the reason.
CheckToken = Callable[[ServerConnection, str | None], str]


def load_files() -> dict[str, bytes]:
    """``/name`` -> contents of every file of ``edge/web/`` (``/`` is index.html)."""
    root = files("edge") / "web"
    found = {f"/{entry.name}": entry.read_bytes() for entry in root.iterdir()
             if entry.is_file() and _suffix(entry.name) in CONTENT_TYPES}
    if "/index.html" in found:
        found["/"] = found["/index.html"]
    return found


class WebPage:
    """Answers the HTTP requests that are not the WebSocket of ``edge.protocol``."""

    def __init__(self, check_token: CheckToken, ws_path: str) -> None:
        self.check_token = check_token
        self.ws_path = ws_path
        self.files = load_files()

    def respond(self, connection: ServerConnection, request: Request,
                path: str) -> Response:
        if path == TOKEN_CHECK_PATH:
            return self._token_check(connection, request)
        body = self.files.get(path)
        if body is None:
            return _response(http.HTTPStatus.NOT_FOUND,
                             f"no such path; devices use {self.ws_path}\n".encode(),
                             "text/plain; charset=utf-8")
        name = "/index.html" if path == "/" else path
        extra = {"Content-Security-Policy": PAGE_POLICY} if name.endswith(".html") else {}
        return _response(http.HTTPStatus.OK, body, CONTENT_TYPES[_suffix(name)], extra)

    def _token_check(self, connection: ServerConnection, request: Request) -> Response:
        from edge.auth import TokenError

        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            user = self.check_token(connection, token.strip() if scheme.lower() == "bearer"
                                    else None)
        except TokenError as exc:
            return _json(http.HTTPStatus.UNAUTHORIZED, {"reason": str(exc)})
        return _json(http.HTTPStatus.OK, {"user_id": user})


def _suffix(name: str) -> str:
    return name[name.rfind("."):] if "." in name else ""


def _json(status: http.HTTPStatus, body: dict[str, str]) -> Response:
    return _response(status, json.dumps(body).encode(), "application/json",
                     {"Cache-Control": "no-store"})


def _response(status: http.HTTPStatus, body: bytes, content_type: str,
              extra: dict[str, str] | None = None) -> Response:
    headers = {
        "Date": formatdate(usegmt=True), "Connection": "close",
        "Content-Type": content_type, "Content-Length": str(len(body)),
        # Always revalidate: a page cached across an upgrade would speak an old protocol.
        "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        # The page's address may still hold a token (until its script removes it).
        "Referrer-Policy": "no-referrer"}
    headers.update(extra or {})
    return Response(status.value, status.phrase, Headers(headers), body)

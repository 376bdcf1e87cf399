"""Short-lived device tokens: ``<payload>.<signature>``, HMAC-SHA256, URL-safe.

The payload is base64url JSON ``{"v": 1, "sub": user_id, "iat": unix_s, "exp": unix_s}``;
the signature is base64url HMAC-SHA256 of the payload's base64 text under the
gateway's secret. The gateway verifies the signature (constant-time), the version,
the expiry (with a small allowance for clock skew between machines) and the user id
before the WebSocket handshake completes; the user id is then taken from the token,
never from anything the device sends.

The secret is ``gateway.secret``, else the contents of ``gateway.secret_file``,
created with a random key (mode 0600) the first time it is needed, so that
``voicebus up`` and ``voicebus token`` on one machine agree with no set-up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Final

VERSION: Final = 1
CLOCK_SKEW_S: Final = 30  # a token from a machine whose clock is a little ahead still works
MAX_TOKEN_BYTES: Final = 1024
USER_ID_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")  # as schemas.events.Id


class TokenError(ValueError):
    """The token is refused; the message says why (safe to show to the device)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest())


def mint(secret: bytes, user_id: str, ttl_s: float, *, now: float | None = None) -> str:
    """A token naming ``user_id``, valid for ``ttl_s`` seconds."""
    if USER_ID_RE.fullmatch(user_id) is None:
        raise ValueError(f"invalid user id {user_id!r}: 1-128 of A-Z a-z 0-9 . _ : @ -")
    if ttl_s <= 0:
        raise ValueError("a token's lifetime must be positive")
    issued = int(now if now is not None else time.time())
    body = {"v": VERSION, "sub": user_id, "iat": issued, "exp": issued + int(ttl_s)}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_sign(secret, payload)}"


def verify(secret: bytes, token: str | None, *, now: float | None = None) -> str:
    """The user id the token names, or ``TokenError`` saying why it is refused."""
    if not token:
        raise TokenError("no token")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("token too long")
    if not token.isascii():  # ours are base64url; HMAC compares ASCII text only
        raise TokenError("malformed token")
    payload, dot, signature = token.partition(".")
    if not dot or not payload or not signature:
        raise TokenError("malformed token")
    if not hmac.compare_digest(_sign(secret, payload), signature):
        raise TokenError("bad signature")
    try:
        body = json.loads(_unb64(payload))
    except ValueError:
        raise TokenError("malformed token") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise TokenError("unsupported token version")
    user, exp = body.get("sub"), body.get("exp")
    if not isinstance(user, str) or USER_ID_RE.fullmatch(user) is None:
        raise TokenError("token names no valid user")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise TokenError("token has no expiry")
    if (now if now is not None else time.time()) > exp + CLOCK_SKEW_S:
        raise TokenError("token expired")
    return user


def load_secret(secret: str | None, secret_file: str) -> bytes:
    """The signing key: the configured one, else the key file (created if missing)."""
    if secret:
        return secret.encode()
    path = Path(secret_file).expanduser()
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        key = _create_key(path)
    if len(key) < 16:
        raise ValueError(f"the gateway secret in {path} is too short (need 16+ characters)")
    return key.encode()


def _create_key(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it between our read and now
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key)
    return key

"""The gateway: edge devices speak WebSocket (``edge.protocol``); the bus speaks Redis.

One connection is one session. The handshake is refused (HTTP 401) unless the
device shows a valid token (``edge.auth``); the token's user becomes the
session's ``user_id`` (memory is keyed by it), whatever the device says later.

* **In**: ``start`` declares the device's sample rate -> ``SessionStarted`` on the
  sessions stream; every binary frame -> an ``AudioFrame`` (``seq`` in arrival
  order) on the session's audio stream; the end of the connection ->
  ``SessionEnded``.
* **Out**: one task tails the out streams of every session of this process in a
  single ``XREAD`` and hands each event to its session (``edge.bus_tap``). Reply audio is released
  to the device in ``(seq, part)`` order, each part once (duplicates dropped,
  early parts held until the gap fills), preceded by an ``audio`` message naming
  the turn; transcripts and reply text go out as JSON for the device to show; at
  the end of a turn, ``turn_done`` carries the latency breakdown.
* **Barge-in**: another task tails the cancel lane. When a turn of a session is
  cancelled (the VAD cancels the live turn when the user starts speaking), the
  gateway stops sending its audio at once, tells the device to ``flush``, waits
  briefly for the device's ``played`` report, and reports the text the user heard
  (a ``Heard`` event on the LLM queue: the LLM stage's memory keeps only that). The
  time from the cancel to the last audio byte sent is logged.
* **Continuation**: the first audio byte of a turn sent to the device is marked in
  ``keys.audible`` (turn and time), so the VAD can tell speech that came before the
  user heard anything (the turn goes on: the agent turn is cancelled with reason
  ``continued``) from a barge-in. A continued turn is flushed like a barge-in but
  stores nothing, reports ``turn_done`` with ``continued: true``, and its trace root
  is recorded by the turn that continues it (same trace, whole utterance).
* **Tentative turns**: a ``TurnEnded(tentative=True)`` (the VAD ended the turn
  before the transcript's verdict) holds the turn's audio until the turn's second,
  committing ``TurnEnded``; a continued turn never plays.
* When a turn has been played out completely, its ``active_turn`` marker is
  removed, so the user's next words are a new turn, not a barge-in.
* **Limits** (``gateway.*``): frame size (1009), frames per second (4008),
  session length (4002), idle time (4003); a bad message closes with 1008. Each
  close names the reason. A misbehaving device never affects other sessions.
* **Teardown**: on disconnect the session's live turn is cancelled, its audio
  stream gets ``SessionEnded`` (the VAD releases the session and lets its keys
  expire), its out stream and cancel hash expire, its ``active_turn`` is deleted,
  and its tasks end. Nothing of it stays in this process.

The gateway never exposes Redis: devices see only the protocol. Any other path on its
port is plain HTTP for browsers: the web page and its token check (``edge.web_page``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import signal
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edge import protocol
from edge.auth import TokenError, load_secret, verify
from edge.bus_tap import OUT_BLOCK_MS, BusTap
from edge.device_session import Closing, DeviceSession, TurnCancelledNotice
from edge.web_page import WebPage
from schemas import SessionStarted
from workers.config import Config
from workers.observability.logs import Throttled, log_context
from workers.runtime.bus import DELETE_IF_EQUAL, Bus
from workers.runtime.cancel import CancelLane
from workers.runtime.connection import connect
from workers.runtime.keys import Keys

log = logging.getLogger("voicebus.gateway")

START_TIMEOUT_S = 10.0  # a device must say ``start`` this soon after connecting


class Gateway:
    """The WebSocket server and the bus tasks shared by its sessions."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.keys = Keys.of(config.redis)
        self.redis = connect(redis_url)
        self.reader = connect(redis_url, blocking_ms=OUT_BLOCK_MS)
        self.control_reader = connect(redis_url, blocking_ms=1000)
        self.bus = Bus(self.redis, self.keys, maxlen=config.redis.maxlen.model_dump(),
                       out_keep_ms=int(config.redis.out_keep_s * 1000))
        self.cancel = CancelLane(self.bus, config.redis.session_ttl_s)
        self.cancel.listeners.append(self._on_cancel)
        self.secret = load_secret(config.gateway.secret, config.gateway.secret_file)
        self.refusals = Throttled(log)  # a refused token is anyone's to send, many times
        self.web = WebPage(self.check_token, protocol.PATH)  # the browser page, plain HTTP
        self.sessions: dict[str, DeviceSession] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop = asyncio.Event()
        self.tap = BusTap(self.reader, self.control_reader, self.cancel, self.stop)
        self.server: Server | None = None
        self._unset = self.redis.register_script(DELETE_IF_EQUAL)

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        cfg = self.config.gateway
        self.server = await serve(
            self.handle, cfg.host, cfg.port, process_request=self.authenticate,
            max_size=cfg.max_frame_bytes, ping_interval=20, ping_timeout=20, close_timeout=3)
        host, port = self.server.sockets[0].getsockname()[:2] if self.server.sockets else (
            cfg.host, cfg.port)
        self.spawn(self.tap.read_out_streams())
        self.spawn(self.tap.watch_cancels())
        return str(host), int(port)

    async def close(self) -> None:
        self.stop.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in (self.redis, self.reader, self.control_reader):
            await client.aclose()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def unset_if(self, key: str, value: str) -> None:
        await self._unset(keys=[key], args=[value])

    # -- handshake ----------------------------------------------------------
    def authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path)
        if path.path != protocol.PATH:  # the browser page, its files, its token check
            return self.web.respond(connection, request, path.path)
        token = _bearer(request.headers) or next(iter(parse_qs(path.query).get("token", [])),
                                                 None)
        try:
            user = self.check_token(connection, token)
        except TokenError as exc:
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, f"token refused: {exc}\n")
        connection.user_id = user  # type: ignore[attr-defined]
        return None

    def check_token(self, connection: ServerConnection, token: str | None) -> str:
        """The token's user, or ``TokenError`` (logged, throttled) saying why not."""
        try:
            return verify(self.secret, token)
        except TokenError as exc:
            self.refusals.info("refused a device from %s: %s", connection.remote_address, exc)
            raise

    # -- one connection -----------------------------------------------------
    async def handle(self, ws: ServerConnection) -> None:
        user: str = getattr(ws, "user_id", "")
        cfg = self.config.gateway
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                first = await ws.recv()
            if isinstance(first, bytes):
                raise Closing(protocol.Close.POLICY, "the first message must be start")
            start = protocol.parse_device_message(first)
            if not isinstance(start, protocol.Start) or not 8000 <= start.sample_rate <= 48000:
                raise Closing(protocol.Close.POLICY,
                              "the first message must be start with 8000 <= sample_rate <= 48000")
        except TimeoutError:
            await ws.close(protocol.Close.POLICY, "no start message")
            return
        except protocol.ProtocolError as exc:
            await ws.close(protocol.Close.POLICY, str(exc)[:120])
            return
        except Closing as exc:
            await ws.close(exc.code, exc.reason)
            return
        except ConnectionClosed:
            return
        session = DeviceSession(self, ws, user, start.sample_rate)
        sid = session.session_id
        self.sessions[sid] = session
        self.tap.follow(self.keys.out(sid), session.inbox.put_nowait)
        pump = self.spawn(session.pump())
        watchdog = self.spawn(self._watchdog(session))
        reason = "device disconnected"
        with log_context(session_id=sid):
            try:
                await session.publish_through_outage(self.keys.sessions(), SessionStarted(
                    session_id=sid, user_id=user, sample_rate=session.rate))
                log.info("device connected: user %s, %d Hz", user, session.rate)
                await session.send(protocol.Ready(
                    session_id=sid, user_id=user, out_rate=self.config.tts.sample_rate,
                    limits={"max_frame_bytes": cfg.max_frame_bytes,
                            "max_frames_per_s": cfg.max_frames_per_s,
                            "max_session_s": cfg.max_session_s,
                            "idle_timeout_s": cfg.idle_timeout_s}))
                async for message in ws:
                    if isinstance(message, bytes):
                        await session.on_frame(message)
                        continue
                    parsed = protocol.parse_device_message(message)
                    if isinstance(parsed, protocol.Played):
                        session.on_played(parsed.turn_id, parsed.samples)
                    elif isinstance(parsed, protocol.Stop):
                        reason = "device said stop"
                        await ws.close(protocol.Close.NORMAL, "bye")
                        break
                    else:
                        raise Closing(protocol.Close.POLICY, "start was already sent")
            except Closing as exc:
                reason = exc.reason
                log.info("closing the connection: %s (%d)", exc.reason, exc.code)
                # Keep reading (and dropping) what the device still sends: a flooding
                # device is blocked on a full socket and would never see our close.
                drain = self.spawn(_drain(ws))
                await session.send(protocol.Error(exc.reason))
                await ws.close(exc.code, exc.reason)
                drain.cancel()
            except protocol.ProtocolError as exc:
                reason = f"protocol error: {exc}"
                await session.send(protocol.Error(reason))
                await ws.close(protocol.Close.POLICY, reason[:120])
            except ConnectionClosed:
                pass
            except (RedisError, OSError) as exc:
                reason = f"bus unavailable: {exc}"
                log.warning("closing the connection: %s", reason)
                await ws.close(protocol.Close.SERVER_ERROR, "bus unavailable")
            finally:
                watchdog.cancel()
                pump.cancel()
                self.sessions.pop(sid, None)
                self.tap.unfollow(self.keys.out(sid))
                await session.teardown(reason)
                log.info("session ended: %s", reason)

    async def _watchdog(self, session: DeviceSession) -> None:
        cfg = self.config.gateway
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now - session.started > cfg.max_session_s:
                code, reason = protocol.Close.SESSION_TOO_LONG, "session too long"
            elif (now - session.last_frame > cfg.idle_timeout_s
                  and not session.publishes_waiting):  # held back by Redis, not idle
                code, reason = protocol.Close.IDLE, "idle too long"
            else:
                continue
            log.info("closing session %s: %s", session.session_id, reason)
            await session.send(protocol.Error(reason))
            await session.ws.close(code, reason)
            return

    def _on_cancel(self, session_id: str, turn_id: str, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.inbox.put_nowait(TurnCancelledNotice(turn_id, reason))


async def _drain(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


def _bearer(headers: Headers) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def run(config: Config, redis_url: str, ready: asyncio.Event | None = None,
              install_signals: bool = True) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); then close every connection
    (1001, going away: their sessions are torn down as on any disconnect)."""
    gateway = Gateway(config, redis_url)
    host, port = await gateway.start()
    log.info("gateway listening on ws://%s:%d%s (redis %s)", host, port, protocol.PATH,
             redis_url)
    stop = asyncio.Event()
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("stopping: closing %d device connection(s)", len(gateway.sessions))
    finally:
        await gateway.close()
        log.info("gateway stopped")

"""Guards in front of the app against slow, idle and malicious clients: a request body is read whole,
within a deadline (408) and a size limit (413), and refused if its JSON nests deeper than a limit (400)
before any parser recurses into it; a connection that sends no complete request head in time is closed."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from arbiter.gateway.errors import ApiError, error_response

_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')   # strings are skipped whole; brackets counted
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def json_depth_over(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than `limit` (brackets inside strings ignored)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for m in _TOKEN.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif c in (b"]", b"}"):
            depth -= 1
    return False


class BodyGuard:
    """ASGI middleware: buffers the body of POST/PUT/PATCH requests under the three limits, then hands the
    app a `receive` that replays it (and afterwards reports the client's disconnect as usual)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, max_depth: int) -> None:
        self.app, self.max_bytes, self.timeout_s, self.max_depth = app, max_bytes, timeout_s, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if b"content-type" not in headers:   # a body sent with no type (`curl -d` sets one) is read as JSON
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send, 413, f"request body is {int(length)} bytes; at most "
                                                                 f"{self.max_bytes} are accepted")
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_bytes:
                        return await self._refuse(scope, receive, send, 413, f"request body is over "
                                                                             f"{self.max_bytes} bytes")
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await self._refuse(scope, receive, send, 408, f"request body not received within "
                                                                 f"{self.timeout_s:g} s")
        body = b"".join(chunks)
        if json_depth_over(body, self.max_depth):
            return await self._refuse(scope, receive, send, 400, f"request body nests deeper than "
                                                                 f"{self.max_depth} levels")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        response = error_response(ApiError(status, message, code="request_too_large" if status == 413 else None))
        response.headers["Connection"] = "close"   # the rest of the body is never read
        await response(scope, receive, send)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection must send a complete request head within
    `head_timeout_s` of opening (or of its previous response), else it is closed. uvicorn alone keeps an
    idle new connection, or one dribbling its headers, open forever."""

    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_cycle: Any = None

    def _arm(self) -> None:
        self._disarm()
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.cycle is self._head_cycle and not self.transport.is_closing():   # no new request began
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._head_cycle:
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()                      # before: a pipelined request handled inside disarms it again
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

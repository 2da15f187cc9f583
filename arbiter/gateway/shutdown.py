"""The gateway told to stop (SIGTERM: a rolling update, scale-in; Ctrl-C). uvicorn then stops accepting
connections and waits for the open ones, and an event stream of a long job would hold it there until the pod's
grace period runs out and the stream is cut with no word. Instead, each open stream ends at once with a last
event saying why (`event: error`, reason `gateway shutting down`), a non-streaming request waiting for its job
answers 503 `gateway_shutting_down` with Retry-After (`context.Ctx.wait`), and /healthz answers 503: the job
goes on, and the client reads its events again from another gateway (GET /v1/jobs/{id}/events replays them).

Signals are the process's, so the flag is too (`closing`): the app's lifespan wraps the handlers uvicorn installed
(the flag is set, then uvicorn's own shutdown runs as before)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

REASON = "gateway shutting down"


def last_event() -> bytes:
    """The event a stream closed by the gateway's shutdown ends with: readable by the native API's clients
    (`type`, `message`, `reason`) and by OpenAI's SDK (an `error` object: it raises APIError)."""
    message = (f"{REASON}: the job goes on; read its events again (GET /v1/jobs/{{id}}/events) or its status "
               "from another gateway")
    data = {"type": "error", "reason": REASON, "message": message,
            "error": {"message": message, "type": "server_error", "param": None, "code": "gateway_shutting_down"}}
    return f"event: error\ndata: {json.dumps(data)}\n\n".encode()


class Shutdown:
    """Set when this process is told to stop; awaited by its open streams."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def install(self) -> None:
        """On the server's event loop, once uvicorn has installed its signal handlers (the app's lifespan): wrap
        them. Outside the main thread (a test client) there are no signals to wrap; `set()` still works."""
        self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def on_signal(signum: int, frame: Any, previous: Any = previous) -> None:
                self.set()
                if callable(previous):
                    previous(signum, frame)

            signal.signal(sig, on_signal)

    def set(self) -> None:
        """Safe from a signal handler or another thread."""
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    def is_set(self) -> bool:
        return self._event is not None and self._event.is_set()

    async def wait(self) -> None:
        if self._event is None:
            await anyio.sleep_forever()
        else:
            await self._event.wait()


closing = Shutdown()


class ClosingStream(StreamingResponse):
    """An event stream that ends with `last_event()` when the gateway stops, instead of holding its shutdown.
    The body's generators are cancelled (their `finally` blocks run: the stream slot is given back)."""

    def __init__(self, content: AsyncIterator[bytes], shutdown: Shutdown = closing, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.shutdown = shutdown

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = closed = False
        async with anyio.create_task_group() as tg:
            async def close_on_shutdown() -> None:
                nonlocal closed
                await self.shutdown.wait()
                closed = True
                tg.cancel_scope.cancel()

            tg.start_soon(close_on_shutdown)
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ended = True
            tg.cancel_scope.cancel()
        if closed and not ended:
            await send({"type": "http.response.body", "body": last_event(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

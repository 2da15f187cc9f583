"""A small real OpenAI-compatible chat server for tests (stdlib HTTP/1.1, chunked SSE streaming).

Its "model" is deterministic: piece i of the answer depends only on (user prompt, i), so continuing an
assistant message of k pieces (`continue_final_message`) yields pieces k, k+1, ... and a resumed run ends
with the same text as an uninterrupted one. The prompt picks failure modes: "FAIL" -> HTTP 500, "BADREQ"
-> HTTP 400, "DIE" -> the connection drops after 3 pieces, "CUT" -> the response body ends cleanly
after 3 pieces (no finish_reason, no [DONE]), "SHORT" -> the answer ends (finish_reason
"stop") after 4 pieces."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango")
SHORT_ANSWER = 4
DIE_AFTER = 3


def piece(prompt: str, i: int) -> str:
    """Piece i of the answer to `prompt`: a word, with a leading space after the first."""
    word = WORDS[int.from_bytes(hashlib.sha256(f"{prompt}|{i}".encode()).digest()[:8], "big") % len(WORDS)]
    return (" " if i else "") + word


def answer(prompt: str, n: int, start: int = 0) -> str:
    return "".join(piece(prompt, i) for i in range(start, n))


class FakeOpenAIServer:
    """`with FakeOpenAIServer() as srv:` serves on a free port; `srv.base_url` ends in /v1. `requests`
    holds every chat request body, `headers` their headers, `aborted` counts streams the client left."""

    def __init__(self, model: str = "fake-model", delay_s: float = 0.005, metrics: bool = True) -> None:
        self.model, self.delay_s, self.serve_metrics = model, delay_s, metrics
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.aborted = 0
        self.active = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.root = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.base_url = f"{self.root}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="fake-openai",
                                        daemon=True)
        self._thread.start()
        self._stopped = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop listening and drop every open connection (kept-alive ones included)."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()

    def metrics_text(self) -> str:
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{self.model}"}} {self.active}\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="{self.model}"}} 1\n'
            f'vllm:num_requests_waiting{{engine="1",model_name="{self.model}"}} 2\n'
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{self.model}"}} 0.25\n'
            'vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="a b"} 7\n'
        )


def _handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with server._lock:
                server._conns.add(self.connection)

        def finish(self) -> None:
            with server._lock:
                server._conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode())

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
            elif self.path == "/metrics" and server.serve_metrics:
                self._send(200, server.metrics_text().encode(), "text/plain; version=0.0.4")
            else:
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            server.requests.append(body)
            server.headers.append(dict(self.headers))
            messages = body.get("messages") or []
            prompt = next((m["content"] for m in messages if m.get("role") == "user"), "")
            if "FAIL" in prompt:
                return self._json(500, {"error": {"message": "model exploded", "type": "server_error"}})
            if "BADREQ" in prompt:
                return self._json(400, {"error": {"message": "max_tokens is too large",
                                                  "type": "invalid_request_error"}})
            start = 0
            if body.get("continue_final_message") and messages and messages[-1].get("role") == "assistant":
                start = len(messages[-1]["content"].split())
            limit = start + int(body.get("max_tokens") or 16)
            end = min(limit, SHORT_ANSWER) if "SHORT" in prompt else limit
            finish = "length" if end == limit else "stop"
            if not body.get("stream"):
                message = {"role": "assistant", "content": answer(prompt, end, start)}
                return self._json(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": server.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": {"completion_tokens": max(0, end - start)}})
            self._stream(prompt, start, end, finish)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        def _event(self, delta: dict[str, Any], finish: str | None = None) -> None:
            obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": server.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def _stream(self, prompt: str, start: int, end: int, finish: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with server._lock:
                server.active += 1
            try:
                self._event({"role": "assistant", "content": ""})
                for i in range(start, end):
                    if "DIE" in prompt and i - start == DIE_AFTER:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if "CUT" in prompt and i - start == DIE_AFTER:
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    time.sleep(server.delay_s)
                    self._event({"content": piece(prompt, i)})
                self._event({}, finish)
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client went away (a preempted job closes its stream)
                with server._lock:
                    server.aborted += 1
                self.close_connection = True
            finally:
                with server._lock:
                    server.active -= 1

    return Handler

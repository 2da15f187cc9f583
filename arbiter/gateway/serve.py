"""`arbiter gateway`: uvicorn serving `arbiter.gateway.server:app` with the guards against idle and slow
connections (a request head within `gateway_header_timeout_s`, kept-alive connections closed after 5 s
idle; request bodies are timed by the app's BodyGuard)."""

from __future__ import annotations

from broker.settings import Settings


def serve(settings: Settings, host: str | None = None, port: int | None = None, workers: int = 1) -> None:
    import uvicorn

    from arbiter.gateway.guards import HeadTimeoutProtocol

    HeadTimeoutProtocol.head_timeout_s = settings.gateway_header_timeout_s
    uvicorn.run("arbiter.gateway.server:app", host=host or settings.gateway_host, port=port or settings.gateway_port,
                workers=workers, log_level="info", proxy_headers=True, http=HeadTimeoutProtocol,
                timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
                # told to stop, streams and waits answer at once (`shutdown.py`); a request still open after this
                # is closed rather than cut by the pod's SIGKILL (grace 30 s in compose/kubernetes)
                timeout_graceful_shutdown=20)

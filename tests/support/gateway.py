"""`arbiter gateway` as a process for tests: started on a free port, waited for, stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from broker.redis_server import free_port
from broker.settings import Settings


class Gateway:
    def __init__(self, settings: Settings, log: Path, **env: str) -> None:
        """`env`: extra environment for the process (e.g. a skewed clock)."""
        from tests.conftest import ROOT, wait_until, worker_env

        self.base = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-m", "arbiter", "gateway", "--port", self.base.rsplit(":", 1)[1]],
                                     env=worker_env(settings, **env), cwd=ROOT, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_until(self.up, timeout_s=30)

    def up(self) -> bool:
        try:
            return httpx.get(self.base + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

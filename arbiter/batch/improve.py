"""`arbiter batch --improve`: after the batch, wait while the arbiter redoes its degraded outputs at full
quality (improvement runs, `workers/improve.py`), and rewrite each one as it is replaced: the file
atomically, then a new manifest line for the same id with `version: 2` (the manifest is append-only; its last
line per id wins). Interrupted? A rerun with --improve picks up the lines still at version 1."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pending(manifest: Path) -> dict[str, dict[str, Any]]:
    """id -> last manifest entry, for the finished lines that asked to improve and are still below 1.0."""
    last: dict[str, dict[str, Any]] = {}
    if not manifest.exists():
        return {}
    for raw in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(raw)
            last[str(entry["id"])] = entry
        except (ValueError, KeyError, TypeError):
            continue
    return {k: e for k, e in last.items() if e.get("state") == "finished" and e.get("improve")
            and (e.get("version") or 1) < 2 and (e.get("quality") or 0.0) < 1.0}


def wait(client: Any, todo: dict[str, dict[str, Any]], out_dir: Path, append: Callable[[dict[str, Any]], None],
         write: Callable[[Path, bytes], None], deadline: float | None, stop: dict[str, str],
         tick: Callable[[int, int], None], poll_s: float = 0.5) -> int:
    """Rewrite each pending line's output once its job is improved; returns how many were. Stops at the
    deadline or when `stop["why"]` is set (improvement runs go on in the broker)."""
    done = 0
    total = len(todo)
    while todo and not stop["why"] and (deadline is None or time.monotonic() < deadline):
        pipe = client.redis.pipeline(transaction=False)
        ids = list(todo)
        for ident in ids:
            pipe.hmget(client.keys.job(todo[ident]["job_id"]), "improved_at", "improvement", "state")
        for ident, (improved_at, run, state) in zip(ids, pipe.execute(), strict=False):
            entry = todo[ident]
            if state is None or run is None:        # the record expired, or no run was queued (quality 1.0)
                todo.pop(ident)
                continue
            if improved_at is None:
                continue
            res = client.store.result(entry["job_id"])
            if res is None or res.version < 2:
                continue
            name = entry["file"] or (f"{ident}.png" if res.image_png is not None else f"{ident}.txt")
            write(out_dir / name, res.image_png if res.image_png is not None else (res.text or "").encode())
            append({**entry, "quality": res.quality, "params": res.params, "version": res.version,
                    "improved_at": res.improved_at, "improved_by": res.improved_by, "file": name})
            todo.pop(ident)
            done += 1
        tick(done, total)
        if todo:
            time.sleep(poll_s)
    return done

"""The output folder, durable: one writer at a time (a lock), the batch key that makes a rerun re-attach,
the append-only manifest (each line fsync'ed; a line cut short by a crash is ignored and ended), and
outputs written atomically."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import typer

MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
STATE_FILE = ".batch.json"
LOCK_FILE = ".batch.lock"


def lock(out_dir: Path) -> Any:
    import fcntl

    f = (out_dir / LOCK_FILE).open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise typer.BadParameter(f"another `arbiter batch` is writing to {out_dir}", param_hint="--out") from None
    return f


def batch_key(out_dir: Path, src: Path) -> str:
    """The uuid of this (input file, output folder) pair: made on the first run, read back on a resume."""
    path = out_dir / STATE_FILE
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("input") != str(src):
            raise typer.BadParameter(
                f"{out_dir} holds the batch of {state.get('input')}, not {src}: use another folder (deleting "
                f"{path.name} starts over there and submits every line not in the manifest again)",
                param_hint="--out")
        return str(state["batch_key"])
    state = {"batch_key": uuid.uuid4().hex, "input": str(src), "out": str(out_dir), "created_at": time.time()}
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(out_dir)
    return state["batch_key"]


def read_manifest(path: Path) -> tuple[set[str], dict[str, int]]:
    """Ids finished in earlier runs, and how many times each id without a finished run failed. A line cut
    short by a crash is ignored (its job is re-attached and written again)."""
    finished: set[str] = set()
    failed: Counter = Counter()
    if not path.exists():
        return finished, {}
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(raw)
            ident, state = str(entry["id"]), entry["state"]
        except (ValueError, KeyError, TypeError):
            continue
        if state == "finished":
            finished.add(ident)
        else:
            failed[ident] += 1
    return finished, {k: v for k, v in failed.items() if k not in finished}


def append(f: Any, entry: dict[str, Any]) -> None:
    f.write(json.dumps(entry) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_manifest(path: Path) -> Any:
    """Open for appending; a last line cut short by a crash is ended first, so the next entry stays whole."""
    f = path.open("a+b")
    if f.tell():
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    f.close()
    return path.open("a", encoding="utf-8")

"""What every command group shares: the consoles, a client, a job's result printed, one-line errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    """A terminal gets rich's usual output; a pipe or file gets lines that never wrap mid-line and tables
    as wide as their content (rich would otherwise wrap everything at 80 columns)."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, soft_wrap=not tty, width=None if tty or os.environ.get("COLUMNS") else 250)


console = make_console()
err = make_console(stderr=True)


def open_client():
    from broker.client import Client

    return Client.from_settings()


def print_result(result, out: Path | None, as_json: bool, quiet: bool = False) -> None:
    if out is not None:
        out.write_bytes(result.image_png) if result.image_png is not None else out.write_text(result.text or "")
    if as_json:
        console.print_json(json.dumps(result.summary()))
    elif not quiet:
        if result.text is not None:
            print(result.text)
        console.print(f"[dim]job {result.job_id}: quality {result.quality:.2f}, {result.params}, "
                      f"queued {result.queue_wait_s:.3f} s, total {result.latency_s:.3f} s, "
                      f"preemptions {result.preemptions}{', written to ' + str(out) if out else ''}[/dim]")


def fail(message: str, code: int) -> None:
    if message:
        err.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)
    sys.exit(code)

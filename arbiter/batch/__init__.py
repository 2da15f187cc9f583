"""`arbiter batch PROMPTS.jsonl --out DIR`: run a file of prompts through the broker, resumably.

Every line is submitted with the idempotency key `batch:<batch key>:<id>`, where the batch key is a uuid
kept in DIR/.batch.json: a rerun after Ctrl-C, a crash or SIGKILL re-attaches to the jobs it already
submitted instead of submitting them again, and skips the lines DIR/manifest.jsonl says are done.

Outputs are written as they finish (DIR/<id>.png or DIR/<id>.txt, then one fsync'ed manifest line), and
waiting polls the state of every job in flight with one Redis pipeline per tick, not a call per job.

The package: `parse` (the input file into lines, bad lines reported), `output` (the folder, durable: lock,
batch key, manifest, atomic writes), `run` (submit, poll, collect), `ui` (progress bar and summary),
`improve` (--improve: rewrite the outputs redone at full quality). This module imports typer and the
broker's schemas only (both already loaded by the CLI); the client, rich's progress display and the rest
are imported when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker.schemas import Priority, Workload


def batch_command(
    prompts: Annotated[Path, typer.Argument(help="JSONL file: one job per line, e.g. {\"id\": \"fox\", \"prompt\": "
                                                 "\"a red fox\", \"steps\": 30}. `prompt` is required; `id` defaults "
                                                 "to the line number; any job field (workload, model, priority, "
                                                 "tenant, min_quality, deadline_s, seed, max_new_tokens, steps, "
                                                 "width, height) may be set per line and wins over the options.",
                                            exists=True, dir_okay=False, readable=True)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: <id>.png / <id>.txt, manifest.jsonl, "
                                                    "errors.jsonl. Rerun with the same file and folder to resume.")],
    priority: Annotated[Priority, typer.Option(help="Default priority of the lines.")] = Priority.BACKGROUND,
    workload: Annotated[Workload, typer.Option(help="Default workload of the lines.")] = Workload.DIFFUSION,
    model: Annotated[str | None, typer.Option(help="Default model for the lines of the default workload.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Default tenant of the lines (who the jobs are for: tenants "
                                                    "of a band are served in turn; default: 'default').")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Most jobs in flight at once.")] = 64,
    timeout: Annotated[float | None, typer.Option(min=0, help="Stop waiting after this many seconds (jobs in "
                                                                 "flight keep running; rerun to collect them).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Submit again the lines whose job failed or was cancelled in "
                                                    "an earlier run.")] = False,
    improve: Annotated[bool, typer.Option(help="Lines that finish below full quality are redone at full quality "
                                               "when the GPU would otherwise idle; wait for that and rewrite their "
                                               "output and manifest line (version 2).")] = False,
) -> None:
    """Run every line of a JSONL file as a job; write each output as it finishes, with a progress bar.

    Bad lines (not JSON, no prompt, a field the job validation refuses, a duplicate id) are reported with
    their line number, also in OUT/errors.jsonl, and skipped.

    Interrupted (Ctrl-C, a crash, even SIGKILL)? Run the same command again: it re-attaches to the jobs
    already submitted, never submitting a line twice, and skips the lines already in OUT/manifest.jsonl.

    Jobs that fail or are cancelled get a manifest line with their error and are NOT retried
    automatically, not even by a rerun; --retry-failed submits them again.

    Exit status: 0 when every valid line finished (bad lines are reported, not counted), 1 otherwise,
    130 on Ctrl-C."""
    from arbiter.batch.run import run_batch

    run_batch(prompts, out, priority, workload, model, concurrency, timeout, retry_failed, improve, tenant)


# typer keeps a docstring's line breaks: one line per paragraph reads better in --help
batch_command.__doc__ = "\n\n".join(" ".join(p.split()) for p in (batch_command.__doc__ or "").split("\n\n"))

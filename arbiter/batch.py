"""`arbiter batch PROMPTS.jsonl --out DIR`: run a file of prompts through the broker, resumably.

Every line is submitted with the idempotency key `batch:<batch key>:<id>`, where the batch key is a uuid
kept in DIR/.batch.json: a rerun after Ctrl-C, a crash or SIGKILL re-attaches to the jobs it already
submitted instead of submitting them again, and skips the lines DIR/manifest.jsonl says are done.

Outputs are written as they finish (DIR/<id>.png or DIR/<id>.txt, then one fsync'ed manifest line), and
waiting polls the state of every job in flight with one Redis pipeline per tick, not a call per job.

This module imports typer and the broker's schemas only (both already loaded by the CLI); the client, rich's
progress display and the rest are imported when the command runs."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from arbiter import batch_improve
from broker.schemas import Priority, Workload

MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
STATE_FILE = ".batch.json"
LOCK_FILE = ".batch.lock"
POLL_S = 0.2
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SPEC_FIELDS = ("workload", "prompt", "model", "priority", "min_quality", "deadline_s", "seed", "max_new_tokens",
               "steps", "width", "height", "improve")
TERMINAL_STATES = ("finished", "failed", "cancelled")


@dataclass
class Line:
    lineno: int
    id: str
    spec: dict[str, Any]
    key: str = ""
    job_id: str = ""


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    qualities: list[float] = field(default_factory=list)
    preemptions: int = 0           # of the jobs finished (or failed) in this run
    inflight_preemptions: int = 0  # of the jobs still in flight, as last polled
    states: Counter = field(default_factory=Counter)
    reattached: int = 0            # lines whose job an earlier run had submitted
    improved: int = 0              # outputs rewritten at full quality (--improve)

    def quality_text(self) -> str:
        if not self.qualities:
            return "quality -"
        mix = Counter(round(q, 2) for q in self.qualities)
        parts = " ".join(f"{q:.2f}×{n}" for q, n in sorted(mix.items(), reverse=True)[:5])
        return f"quality {sum(self.qualities) / len(self.qualities):.2f} ({parts})"


def batch_command(
    prompts: Annotated[Path, typer.Argument(help="JSONL file: one job per line, e.g. {\"id\": \"fox\", \"prompt\": "
                                                 "\"a red fox\", \"steps\": 30}. `prompt` is required; `id` defaults "
                                                 "to the line number; any job field (workload, model, priority, "
                                                 "min_quality, deadline_s, seed, max_new_tokens, steps, width, "
                                                 "height) may be set per line and wins over the options.",
                                            exists=True, dir_okay=False, readable=True)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: <id>.png / <id>.txt, manifest.jsonl, "
                                                    "errors.jsonl. Rerun with the same file and folder to resume.")],
    priority: Annotated[Priority, typer.Option(help="Default priority of the lines.")] = Priority.BACKGROUND,
    workload: Annotated[Workload, typer.Option(help="Default workload of the lines.")] = Workload.DIFFUSION,
    model: Annotated[str | None, typer.Option(help="Default model for the lines of the default workload.")] = None,
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
    from rich.console import Console

    from broker.client import Client, validate_spec
    from broker.errors import InvalidJob

    console = Console(highlight=False)
    src = prompts.expanduser().resolve()
    out_dir = out.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_dir)   # held until the process ends; SIGKILL releases it too
    batch_key = _batch_key(out_dir, src)

    with Client.from_settings() as client:
        lines, bad = _parse(src, workload.value, priority.value, model,
                            lambda spec: validate_spec(spec, client.settings), improve)
        finished_before, failed_before = _read_manifest(out_dir / MANIFEST)
        todo: deque[Line] = deque()
        not_retried = 0
        for ln in lines:
            if ln.id in finished_before:
                continue
            attempts = failed_before.get(ln.id, 0)
            if attempts and not retry_failed:
                not_retried += 1
                continue
            ln.key = f"batch:{batch_key}:{ln.id}" + (f":retry{attempts}" if attempts else "")
            todo.append(ln)
        already = sum(1 for ln in lines if ln.id in finished_before)
        errors_file = (out_dir / ERRORS).open("w", encoding="utf-8")
        for lineno, ident, reason in bad:
            _report_bad(console, errors_file, lineno, ident, reason)
        if bad:
            console.print(f"{len(bad)} bad line(s) skipped; see {out_dir / ERRORS}", style="yellow", markup=False,
                          soft_wrap=True)
        if not_retried:
            console.print(f"[yellow]{not_retried} line(s) failed in an earlier run and are not retried "
                          "(--retry-failed submits them again)[/yellow]")
        if already:
            console.print(f"[dim]{already} line(s) already done in an earlier run[/dim]")

        tally = Tally()
        manifest = _open_manifest(out_dir / MANIFEST)
        stop = {"why": ""}
        old_int = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if stop["why"]:      # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            stop["why"] = "interrupted"

        signal.signal(signal.SIGINT, on_sigint)
        inflight: dict[str, Line] = {}
        started = time.monotonic()
        try:
            with _progress(console) as progress:
                task = progress.add_task("batch", total=already + len(todo), completed=already)
                progress.stats = _extra(tally, inflight)
                while (todo or inflight) and not stop["why"]:
                    while todo and len(inflight) < concurrency and not stop["why"]:
                        ln = todo.popleft()
                        try:
                            ln.job_id, reattached = _submit(client, ln)
                        except InvalidJob as exc:   # e.g. the line changed since its first run
                            bad.append((ln.lineno, ln.id, str(exc)))
                            _report_bad(progress.console, errors_file, ln.lineno, ln.id, str(exc))
                            progress.update(task, total=progress.tasks[0].total - 1)
                            continue
                        inflight[ln.job_id] = ln
                        tally.reattached += reattached
                    ended = _poll(client, inflight, tally)
                    for job_id in ended:
                        ln = inflight.pop(job_id)
                        entry = _collect(client, ln, out_dir)
                        _append(manifest, entry)
                        if entry["state"] == "finished":
                            tally.done += 1
                            tally.qualities.append(entry["quality"])
                        else:
                            tally.failed += 1
                            progress.console.print(f"line {ln.lineno} (id {ln.id}): {entry['state']}: "
                                                   f"{entry['error']}", style="red", markup=False, soft_wrap=True)
                        tally.preemptions += entry["preemptions"] or 0
                    progress.stats = _extra(tally, inflight)
                    progress.update(task, advance=len(ended))
                    if timeout is not None and time.monotonic() - started > timeout:
                        stop["why"] = f"--timeout {timeout:g} s passed"
                    elif not ended and (todo or inflight):
                        time.sleep(POLL_S)
                if improve and not stop["why"] and not todo and not inflight:
                    waiting = batch_improve.pending(out_dir / MANIFEST)
                    if waiting:
                        job = progress.add_task("improving", total=len(waiting))
                        tally.improved = batch_improve.wait(
                            client, waiting, out_dir, lambda e: _append(manifest, e), _write_atomic,
                            None if timeout is None else started + timeout, stop,
                            lambda n, _total: progress.update(job, completed=n))
        except KeyboardInterrupt:
            stop["why"] = "interrupted"
        except Exception:   # Redis gone, disk full...: what is written stands, a rerun goes on from there
            console.print("stopped by the error below; once it is fixed, run the same command again to resume:",
                          style="red", soft_wrap=True)
            console.print("  " + _again(src, out_dir, workload, priority, model), markup=False, soft_wrap=True)
            raise
        finally:
            signal.signal(signal.SIGINT, old_int)
            manifest.close()
            errors_file.close()

        remaining = len(todo) + len(inflight)
        console.print(f"done {tally.done}, failed {tally.failed}, bad lines skipped {len(bad)}, "
                      f"already done before this run {already}"
                      + (f", re-attached to {tally.reattached} job(s) submitted before" if tally.reattached else "")
                      + (f", failed before (not retried) {not_retried}" if not_retried else "")
                      + (f"; {tally.quality_text()}, preemptions {tally.preemptions}" if tally.qualities else "")
                      + (f"; improved to full quality {tally.improved}" if improve else ""),
                      soft_wrap=True)
        lock.close()
        if stop["why"]:
            console.print(f"[yellow]{stop['why']}: {remaining} line(s) not done ({len(inflight)} job(s) still "
                          "in the broker, not cancelled). To resume, run the same command again:[/yellow]",
                          soft_wrap=True)
            console.print("  " + _again(src, out_dir, workload, priority, model), markup=False, soft_wrap=True)
            raise typer.Exit(130 if stop["why"] == "interrupted" else 1)
        raise typer.Exit(0 if tally.failed == 0 and not not_retried and not remaining else 1)


# typer keeps a docstring's line breaks: one line per paragraph reads better in --help
batch_command.__doc__ = "\n\n".join(" ".join(p.split()) for p in (batch_command.__doc__ or "").split("\n\n"))


# -- input --------------------------------------------------------------------------------------------
def _parse(src: Path, workload: str, priority: str, model: str | None,
           validate: Any, improve: bool = False) -> tuple[list[Line], list[tuple[int, str | None, str]]]:
    """The valid lines, and (line number, id, reason) of each bad one."""
    from broker.errors import InvalidJob

    lines: list[Line] = []
    bad: list[tuple[int, str | None, str]] = []
    seen: dict[str, int] = {}
    with src.open(encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.strip())
            except json.JSONDecodeError as exc:
                bad.append((lineno, None, f"not JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                bad.append((lineno, None, f"not a JSON object but {type(obj).__name__}"))
                continue
            ident = obj.pop("id", lineno)
            if isinstance(ident, bool) or not isinstance(ident, (str, int)) or not ID_RE.fullmatch(str(ident)):
                reason = (f"id {ident!r}: must be 1 to 128 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (it names the output file)")
                bad.append((lineno, None, reason))
                continue
            ident = str(ident)
            if ident in seen:
                bad.append((lineno, ident, f"duplicate id {ident!r} (first on line {seen[ident]})"))
                continue
            seen[ident] = lineno
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                reason = "missing prompt" if "prompt" not in obj else "prompt must be a non-empty string"
                bad.append((lineno, ident, reason))
                continue
            spec = {"workload": workload, "priority": priority, **({"improve": True} if improve else {}), **obj}
            if model is not None and "model" not in obj and spec["workload"] == workload:
                spec["model"] = model
            try:
                validate(spec)
            except InvalidJob as exc:
                bad.append((lineno, ident, str(exc)))
                continue
            lines.append(Line(lineno, ident, spec))
    return lines, bad


def _report_bad(console: Any, errors_file: Any, lineno: int, ident: str | None, reason: str) -> None:
    where = f"line {lineno}" + (f" (id {ident})" if ident is not None and ident != str(lineno) else "")
    console.print(f"{where}: {reason}", style="red", markup=False, soft_wrap=True)
    _append(errors_file, {"line": lineno, "id": ident, "error": reason})


# -- the output folder -------------------------------------------------------------------------------
def _lock(out_dir: Path) -> Any:
    import fcntl

    f = (out_dir / LOCK_FILE).open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise typer.BadParameter(f"another `arbiter batch` is writing to {out_dir}", param_hint="--out") from None
    return f


def _batch_key(out_dir: Path, src: Path) -> str:
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


def _read_manifest(path: Path) -> tuple[set[str], dict[str, int]]:
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


def _append(f: Any, entry: dict[str, Any]) -> None:
    f.write(json.dumps(entry) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
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


def _open_manifest(path: Path) -> Any:
    """Open for appending; a last line cut short by a crash is ended first, so the next entry stays whole."""
    f = path.open("a+b")
    if f.tell():
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    f.close()
    return path.open("a", encoding="utf-8")


# -- submitting and waiting ------------------------------------------------------------------------


def _submit(client: Any, ln: Line) -> tuple[str, bool]:
    """Submit the line with its idempotency key; returns (job id, whether an earlier run had submitted it).
    `Client.submit` also repairs what an earlier run killed inside a submit left behind (a key without a
    record, a record whose message was never sent)."""
    earlier = client.redis.exists(client.keys.idempotency(ln.key))
    return client.submit(ln.spec, idempotency_key=ln.key).id, bool(earlier)


# -- waiting ----------------------------------------------------------------------------------------
def _poll(client: Any, inflight: dict[str, Line], tally: Tally) -> list[str]:
    """One pipeline of HMGET state, preemptions over every job in flight; returns the ids that ended."""
    if not inflight:
        return []
    ids = list(inflight)
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(client.keys.job(job_id), "state", "preemptions")
    ended, states, preempt = [], Counter(), 0
    for job_id, (state, pre) in zip(ids, pipe.execute()):
        state = state.decode() if state is not None else "missing"
        preempt += int(pre or 0)
        if state in TERMINAL_STATES or state == "missing":
            ended.append(job_id)
        else:
            states[state] += 1
    tally.states, tally.inflight_preemptions = states, preempt
    return ended


def _collect(client: Any, ln: Line, out_dir: Path) -> dict[str, Any]:
    """Write the ended job's output (if any) and return its manifest entry."""
    from broker.errors import JobNotFound

    entry: dict[str, Any] = {"id": ln.id, "line": ln.lineno, "job_id": ln.job_id, "state": None,
                             "workload": ln.spec["workload"], "model": ln.spec.get("model"), "quality": None,
                             "params": None, "preemptions": None, "queued_at": None, "started_at": None,
                             "finished_at": None, "latency_s": None, "file": None, "error": None}
    try:
        st = client.store.status(ln.job_id)
    except JobNotFound:
        entry.update(state="failed", error="the job record is gone (expired, or Redis lost it); "
                                           "--retry-failed submits the line again")
        return entry
    entry.update(state=st.state.value, preemptions=st.preemptions, queued_at=st.queued_at,
                 started_at=st.started_at, finished_at=st.finished_at,
                 latency_s=None if st.finished_at is None else round(st.finished_at - st.queued_at, 4))
    if st.state.value != "finished":
        entry["error"] = st.error or st.state.value
        return entry
    res = client.store.result(ln.job_id)
    if res is None:
        entry.update(state="failed", error="finished without a result")
        return entry
    if res.image_png is not None:
        name, data = f"{ln.id}.png", res.image_png
    else:
        name, data = f"{ln.id}.txt", (res.text or "").encode()
    _write_atomic(out_dir / name, data)
    entry.update(quality=res.quality, params=res.params, preemptions=res.preemptions, queued_at=res.queued_at,
                 started_at=res.started_at, finished_at=res.finished_at, latency_s=round(res.latency_s, 4),
                 file=name, version=res.version, improve=bool(ln.spec.get("improve")))
    return entry


# -- display ------------------------------------------------------------------------------------------
def _progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            rate = "-/min" if not speed else f"{speed:.1f}/s" if speed >= 1 else f"{speed * 60:.1f}/min"
            return Text(rate, style="progress.data.speed")

    class BatchProgress(Progress):
        """The bar on one line; quality mix, preemptions and job states on the next."""

        stats = ""

        def get_renderables(self) -> Any:
            yield self.make_tasks_table(self.tasks)
            if self.stats:
                yield Text(self.stats, no_wrap=True, overflow="ellipsis")

    return BatchProgress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                         MofNCompleteColumn(), RateColumn(), TextColumn("eta"), TimeRemainingColumn(),
                         TimeElapsedColumn(), console=console, refresh_per_second=4)


def _extra(t: Tally, inflight: dict[str, Line]) -> str:
    states = ", ".join(f"{n} {s}" for s, n in sorted(t.states.items()))
    return (f"{t.quality_text()} · preemptions {t.preemptions + t.inflight_preemptions}"
            + (f" · failed {t.failed}" if t.failed else "")
            + (f" · {states}" if states else ""))


def _again(src: Path, out_dir: Path, workload: Workload, priority: Priority, model: str | None) -> str:
    """The command that resumes this batch (the options that shape the jobs included: a line whose job
    changed would be refused by its idempotency key)."""
    import shlex

    args = ["arbiter", "batch", str(src), "--out", str(out_dir), "--workload", workload.value,
            "--priority", priority.value, *(["--model", model] if model else [])]
    return " ".join(shlex.quote(a) for a in args)

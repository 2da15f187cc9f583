"""The run: submit the lines (at most --concurrency in flight), poll every job in flight with one pipeline
per tick, collect each ended job's output into the folder, then (--improve) wait for the improved ones."""

from __future__ import annotations

import signal
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import typer

from arbiter.batch import improve as improvement
from arbiter.batch import output, ui
from arbiter.batch import waiting as waiting_jobs
from arbiter.batch.parse import Line, parse_lines, report_bad
from broker.schemas import Priority, Workload

POLL_S = 0.2
TERMINAL_STATES = ("finished", "failed", "cancelled")


def run_batch(prompts: Path, out: Path, priority: Priority, workload: Workload, model: str | None,
              concurrency: int, timeout: float | None, retry_failed: bool, improve: bool,
              tenant: str | None = None) -> None:
    """`arbiter batch`'s run (see `batch_command`); ends by raising `typer.Exit` with the exit status."""
    from rich.console import Console

    from broker.client import Client
    from broker.errors import InvalidJob, Overloaded
    from broker.validation import validate_spec

    console = Console(highlight=False)
    src = prompts.expanduser().resolve()
    out_dir = out.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = output.lock(out_dir)   # held until the process ends; SIGKILL releases it too
    batch_key = output.batch_key(out_dir, src)
    resume = ui.resume_command(src, out_dir, workload, priority, model, tenant)

    with Client.from_settings() as client:
        lines, bad = parse_lines(src, workload.value, priority.value, model,
                                 lambda spec: validate_spec(spec, client.settings), improve, tenant)
        finished_before, failed_before = output.read_manifest(out_dir / output.MANIFEST)
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
        errors_file = (out_dir / output.ERRORS).open("w", encoding="utf-8")
        for lineno, ident, reason in bad:
            report_bad(console, errors_file, lineno, ident, reason)
        if bad:
            console.print(f"{len(bad)} bad line(s) skipped; see {out_dir / output.ERRORS}", style="yellow",
                          markup=False, soft_wrap=True)
        if not_retried:
            console.print(f"[yellow]{not_retried} line(s) failed in an earlier run and are not retried "
                          "(--retry-failed submits them again)[/yellow]")
        if already:
            console.print(f"[dim]{already} line(s) already done in an earlier run[/dim]")

        tally = ui.Tally()
        manifest = output.open_manifest(out_dir / output.MANIFEST)
        stop = {"why": ""}
        old_int = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if stop["why"]:      # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            stop["why"] = "interrupted"

        signal.signal(signal.SIGINT, on_sigint)
        inflight: dict[str, Line] = {}
        started = time.monotonic()
        positions_at = 0.0   # when the waiting jobs' positions were last read (monotonic)
        hold_until = 0.0   # no submit before this (monotonic): the band shed a line (Overloaded)
        try:
            with ui.progress(console) as progress:
                task = progress.add_task("batch", total=already + len(todo), completed=already)
                progress.stats = ui.stats_line(tally, inflight)
                while (todo or inflight) and not stop["why"]:
                    while (todo and len(inflight) < concurrency and not stop["why"]
                           and time.monotonic() >= hold_until):
                        ln = todo.popleft()
                        try:
                            ln.job_id, reattached = _submit(client, ln)
                        except Overloaded as exc:   # shed, nothing written: the line goes back, retried later
                            todo.appendleft(ln)
                            hold_until = time.monotonic() + exc.retry_after_s
                            progress.console.print(f"line {ln.lineno} (id {ln.id}): {exc}; holding submits",
                                                   style="yellow", markup=False, soft_wrap=True)
                            break
                        except InvalidJob as exc:   # e.g. the line changed since its first run
                            bad.append((ln.lineno, ln.id, str(exc)))
                            report_bad(progress.console, errors_file, ln.lineno, ln.id, str(exc))
                            progress.update(task, total=progress.tasks[0].total - 1)
                            continue
                        inflight[ln.job_id] = ln
                        tally.reattached += reattached
                    ended = _poll(client, inflight, tally)
                    for job_id in ended:
                        ln = inflight.pop(job_id)
                        entry = _collect(client, ln, out_dir)
                        output.append(manifest, entry)
                        if entry["state"] == "finished":
                            tally.done += 1
                            tally.qualities.append(entry["quality"])
                        else:
                            tally.failed += 1
                            progress.console.print(f"line {ln.lineno} (id {ln.id}): {entry['state']}: "
                                                   f"{entry['error']}", style="red", markup=False, soft_wrap=True)
                        tally.preemptions += entry["preemptions"] or 0
                    if tally.queued and time.monotonic() - positions_at >= waiting_jobs.EVERY_S:
                        positions_at = time.monotonic()
                        tally.waiting = waiting_jobs.read_waiting(
                            client, tally.queued, {j: inflight[j].spec for j in tally.queued})
                    progress.stats = ui.stats_line(tally, inflight)
                    progress.update(task, advance=len(ended))
                    if timeout is not None and time.monotonic() - started > timeout:
                        stop["why"] = f"--timeout {timeout:g} s passed"
                    elif not ended and (todo or inflight):
                        time.sleep(POLL_S)
                if improve and not stop["why"] and not todo and not inflight:
                    waiting = improvement.pending(out_dir / output.MANIFEST)
                    if waiting:
                        job = progress.add_task("improving", total=len(waiting))
                        tally.improved = improvement.wait(
                            client, waiting, out_dir, lambda e: output.append(manifest, e), output.write_atomic,
                            None if timeout is None else started + timeout, stop,
                            lambda n, _total: progress.update(job, completed=n))
        except KeyboardInterrupt:
            stop["why"] = "interrupted"
        except Exception:   # Redis gone, disk full...: what is written stands, a rerun goes on from there
            console.print("stopped by the error below; once it is fixed, run the same command again to resume:",
                          style="red", soft_wrap=True)
            console.print("  " + resume, markup=False, soft_wrap=True)
            raise
        finally:
            signal.signal(signal.SIGINT, old_int)
            manifest.close()
            errors_file.close()

        remaining = len(todo) + len(inflight)
        console.print(ui.summary(tally, len(bad), already, not_retried, improve), soft_wrap=True)
        lock.close()
        if stop["why"]:
            console.print(f"[yellow]{stop['why']}: {remaining} line(s) not done ({len(inflight)} job(s) still "
                          "in the broker, not cancelled). To resume, run the same command again:[/yellow]",
                          soft_wrap=True)
            console.print("  " + resume, markup=False, soft_wrap=True)
            raise typer.Exit(130 if stop["why"] == "interrupted" else 1)
        raise typer.Exit(0 if tally.failed == 0 and not not_retried and not remaining else 1)


def _submit(client: Any, ln: Line) -> tuple[str, bool]:
    """Submit the line with its idempotency key; returns (job id, whether an earlier run had submitted it).
    `Client.submit` also repairs what an earlier run killed inside a submit left behind (a key without a
    record, a record whose message was never sent)."""
    earlier = client.redis.exists(client.keys.idempotency(ln.spec.get("tenant") or "default", ln.key))
    return client.submit(ln.spec, idempotency_key=ln.key).id, bool(earlier)


def _poll(client: Any, inflight: dict[str, Line], tally: ui.Tally) -> list[str]:
    """One pipeline of HMGET state, preemptions over every job in flight; returns the ids that ended."""
    if not inflight:
        return []
    ids = list(inflight)
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(client.keys.job(job_id), "state", "preemptions")
    ended, states, preempt, queued = [], Counter(), 0, []
    for job_id, (state, pre) in zip(ids, pipe.execute(), strict=False):
        state = state.decode() if state is not None else "missing"
        preempt += int(pre or 0)
        if state in TERMINAL_STATES or state == "missing":
            ended.append(job_id)
        else:
            states[state] += 1
            if state == "queued":
                queued.append(job_id)
    tally.states, tally.inflight_preemptions, tally.queued = states, preempt, queued
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
    output.write_atomic(out_dir / name, data)
    entry.update(quality=res.quality, params=res.params, preemptions=res.preemptions, queued_at=res.queued_at,
                 started_at=res.started_at, finished_at=res.finished_at, latency_s=round(res.latency_s, 4),
                 file=name, version=res.version, improve=bool(ln.spec.get("improve")))
    return entry

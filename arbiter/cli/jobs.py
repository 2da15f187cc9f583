"""One job's life from the command line: submit, result, cancel, status; and this node's GPUs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from arbiter.cli.common import console, err, fail, open_client, print_result
from broker.clock import server_now
from broker.errors import Overloaded
from broker.position import describe, job_queue
from broker.schemas import Priority, Workload
from broker.settings import get_settings
from broker.states import RUNNING_STATES, JobState

OVERLOADED_EXIT = 75   # sysexits EX_TEMPFAIL: the band is overloaded now; the same submit later should pass


def submit(
    workload: Annotated[Workload, typer.Argument(help="llm or diffusion")],
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    priority: Annotated[Priority, typer.Option(help="Queue priority.")] = Priority.STANDARD,
    tenant: Annotated[str, typer.Option(help="Who the job is for: tenants of a band are served in turn.")] = "default",
    model: Annotated[str | None, typer.Option(help="Model to run (default: the workload's first).")] = None,
    min_quality: Annotated[float | None, typer.Option(help="Never run below this quality.")] = None,
    deadline_s: Annotated[float | None, typer.Option(help="Must finish within this many seconds.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="llm: tokens to generate.")] = None,
    steps: Annotated[int | None, typer.Option(help="diffusion: denoising steps at full quality.")] = None,
    width: Annotated[int | None, typer.Option(help="diffusion: width in px at full quality.")] = None,
    height: Annotated[int | None, typer.Option(help="diffusion: height in px at full quality.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    wait: Annotated[bool, typer.Option(help="Wait for the result.")] = False,
    stream: Annotated[bool, typer.Option(help="llm: print tokens as they come (implies --wait).")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the output (PNG or text) here (implies --wait).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 600.0,
    improve: Annotated[bool, typer.Option(help="If it finishes below full quality, re-run it at full quality "
                                               "when the GPU would otherwise idle and replace its result.")] = False,
) -> None:
    """Submit a job; print its id (or, with --wait/--stream/--out, its result)."""
    fields = {"workload": workload.value, "prompt": prompt, "priority": priority.value, "tenant": tenant, "model": model,
              "min_quality": min_quality, "improve": improve or None,
              "deadline_s": deadline_s, "max_new_tokens": max_new_tokens, "steps": steps, "width": width,
              "height": height, "seed": seed}
    if stream and workload is not Workload.LLM:   # before anything is queued
        fail(f"--stream: streaming is for llm jobs (tokens as they come); a {workload.value} job's output is a "
             "file: use --out FILE (e.g. --out image.png)", 2)
    with open_client() as client:
        try:
            handle = client.submit({k: v for k, v in fields.items() if v is not None})
        except Overloaded as exc:   # shed at submit: nothing was queued; 75 = EX_TEMPFAIL (try again later)
            fail(str(exc), OVERLOADED_EXIT)
        if not (wait or stream or out):
            console.print_json(json.dumps({"job_id": handle.id})) if as_json else print(handle.id)
            return
        if stream:
            err.print(f"job {handle.id}", highlight=False)   # to cancel or look it up; stdout stays the text
            for token in handle.stream(timeout=timeout):
                print(token, end="", flush=True)
            print()
        print_result(handle.result(timeout=timeout), out, as_json, quiet=stream)


def result(
    job_id: str,
    out: Annotated[Path | None, typer.Option(help="Write the output (PNG or text) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
) -> None:
    """Wait for a job and print its result."""
    with open_client() as client:
        print_result(client.get(job_id).result(timeout=timeout), out, as_json)


def cancel(job_id: str) -> None:
    """Cancel a job: at once if queued, at its next step if running; a finished job's improvement run too. Exit 0
    when it is (or already was) cancelled; 1 when it had already finished or failed with nothing left to stop
    (its result stands)."""
    with open_client() as client:
        job = client.get(job_id)
        state = job.cancel()
        st = job.status() if state is JobState.FINISHED else None
    if st is not None and st.improvement == "cancelled":   # the job had finished; its improvement run stops
        print(f"{job_id}: finished; its improvement run {st.improvement_run} is cancelled (the result stays version 1)")
        return
    if state in (JobState.FINISHED, JobState.FAILED):
        fail(f"{job_id}: already {state.value}, nothing to cancel"
             + (f" (its result: `arbiter result {job_id}`)" if state is JobState.FINISHED else ""), 1)
    print(f"{job_id}: {state.value}" + (" (stops at its next step)" if state in RUNNING_STATES else ""))


def status_cmd(
    job_id: Annotated[str | None, typer.Argument(help="A job id; without it, the whole system.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one job, or every GPU, queue and running job."""
    from arbiter.status import collect, render

    with open_client() as client:
        if job_id:
            st = client.get(job_id).status()
            console.print_json(st.model_dump_json()) if as_json else console.print(_job_table(st, server_now(client.redis)))
            return
        data = collect(client)
        console.print_json(json.dumps(data)) if as_json else render(console, data)


def _job_table(st, now: float):
    """One job's status as a two-column table (field, value); `now` on Redis' clock, as the record's stamps."""
    from datetime import datetime

    from rich.table import Table

    def at(ts: float | None) -> str:
        return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    progress = f"{st.step}/{st.total}" if st.total else "-"
    rows = [("job", st.job_id), ("state", st.state.value), ("workload", st.workload.value),
            ("priority", st.priority.value), ("progress", progress),
            ("quality", "-" if st.quality is None else f"{st.quality:.2f}"),
            ("worker", st.worker or "-"), ("gpu", st.gpu_id or "-"), ("runs", str(st.runs)),
            ("preemptions", str(st.preemptions)), ("queued", at(st.queued_at)), ("started", at(st.started_at)),
            ("finished", at(st.finished_at))]
    if st.started_at is not None:
        end = st.finished_at if st.finished_at is not None else now
        rows.append(("waited / ran", f"{st.started_at - st.queued_at:.3f} s / {end - st.started_at:.3f} s"))
    if st.waiting_for:
        rows.insert(2, ("waiting for", st.waiting_for))
    if st.ahead is not None:   # queued: "queued: 3rd in llm.standard, 12 jobs ahead, ETA ~40 s"
        band = job_queue(st.workload, st.priority, st.improves, get_settings())
        rows[1] = ("state", f"{st.state.value}: {describe(st.position, st.ahead, st.eta_s, band, bool(st.waiting_for))}")
    if st.improvement:
        said = {"done": "done: the result is version 2, at full quality",
                "cancelled": "cancelled with the job: the result stays version 1"}
        queued = "queued: redone at full quality when the GPU would otherwise idle"
        rows.append(("improvement", f"{said.get(st.improvement, queued)} (run {st.improvement_run})"))
    if st.improves:
        rows.append(("improves", f"{st.improves}: this run's result replaces that job's at full quality"))
    if st.error:
        rows.append(("error", st.error))
    for name, value in rows:
        t.add_row(name, value)
    return t


def gpus(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List this node's CUDA devices as NVML sees them (total, used and usable VRAM)."""
    from workers.nvml import detect_gpus

    s = get_settings()
    found = [g.snapshot() for g in detect_gpus(s.node, s.vram_reserve_fraction)]
    if as_json:
        console.print_json(json.dumps([{**g.model_dump(mode="json"), "usable_mib": g.usable_mib} for g in found]))
    elif not found:
        console.print("no CUDA device visible through NVML on this node; workers use a simulated GPU (--gpu sim:SIZE)")
    for g in found if not as_json else []:
        console.print(f"{g.gpu_id}: {g.total_mib} MiB total, {g.used_mib} used, {g.usable_mib} usable "
                      f"({s.vram_reserve_fraction:.0%} reserve), utilization {g.utilization}")

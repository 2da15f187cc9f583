"""`arbiter queue` and `arbiter job`: operators' controls. Pause, drain or resume a queue
(`broker.controls`); move a queued job to the front of its band or to another band (`broker.reorder`)."""

from __future__ import annotations

import getpass
import json
from dataclasses import asdict
from typing import Annotated

import typer

from arbiter.cli.common import console, open_client
from arbiter.cli.help import App
from broker.clock import server_now
from broker.schemas import Priority

app = App(no_args_is_help=True, help="Pause, drain and resume queues (`<workload>.<priority|improve>`).")
job_app = App(no_args_is_help=True, help="Move a queued job: to the front of its band, or to another band.")

QueueArg = Annotated[str, typer.Argument(help="A queue, e.g. diffusion.background (`arbiter queue list`).")]
By = Annotated[str | None, typer.Option(help="Who asks (shown in `arbiter queue list`; default: your user name).")]
Reason = Annotated[str, typer.Option(help="Why (shown in `arbiter queue list` and in refusals).")]


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


@app.command("list")
def queue_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every queue with its depth (messages on it), its jobs held for fair share (waiting their tenant's turn)
    and state: running, paused or draining (since when, by whom, why)."""
    from arbiter.world import read as read_world

    with open_client() as client:
        seen = read_world(client.redis, client.keys, server_now(client.redis), gpu_ids=[])
    rows = [{"queue": q, "depth": n, "held": seen.held.get(q, 0), "state": c.state if (c := seen.queue_controls.get(q)) else "running",
             **({k: v for k, v in asdict(c).items() if k != "state"} if c else {})}
            for q, n in seen.queues.items()]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    from rich.table import Table

    t = Table("queue", "depth", "held", "state", "since", "by", "reason", title="Queues")
    for row in rows:
        since = f"{seen.now - row['since']:.0f} s ago" if "since" in row else ""
        state = row["state"] + (" (running jobs preempted)" if row.get("preempt") else "")
        t.add_row(row["queue"], str(row["depth"]), str(row["held"]), state, since, row.get("by", ""), row.get("reason", ""))
    console.print(t)


@app.command("pause")
def queue_pause(
    queue: QueueArg,
    preempt: Annotated[bool, typer.Option(help="Also checkpoint and requeue its running jobs (they resume, "
                                               "with no work lost, after `arbiter queue resume`).")] = False,
    by: By = None,
    reason: Reason = "",
) -> None:
    """Nothing new starts from the queue; its running jobs finish (or, with --preempt, checkpoint and wait)."""
    from broker.controls import check_queue, pause

    with open_client() as client:
        pause(client.redis, client.keys, client.app, check_queue(queue), _who(by), reason, preempt)
    print(f"{queue}: paused" + (" (its running jobs are checkpointed and requeued)" if preempt else
                                " (its running jobs finish)"))


@app.command("drain")
def queue_drain(queue: QueueArg, by: By = None, reason: Reason = "") -> None:
    """New submits to the queue are refused; what is queued and running goes on. A paused queue starts its
    queued jobs again (drain means "finish what you have, take nothing new"): the pause ends, and this says so."""
    from broker.controls import check_queue, drain, read_control

    with open_client() as client:
        was = read_control(client.redis, client.keys, check_queue(queue))
        drain(client.redis, client.keys, client.app, queue, _who(by), reason)
        now = server_now(client.redis)
    print(f"{queue}: draining (new submits refused until `arbiter queue resume {queue}`)")
    if was is not None and was.state == "paused":
        print(f"{queue}: its pause ({_described(was, now)}) has ended: its queued jobs start again; "
              f"`arbiter queue pause {queue}` to hold them")


def _described(control, now: float) -> str:
    """`by ops, 40 s ago: moving racks` for a control record (`now` on Redis' clock, as its `since`)."""
    text = f"by {control.by or 'someone'}, {now - control.since:.0f} s ago"
    return text + (f": {control.reason}" if control.reason else "")


@app.command("resume")
def queue_resume(queue: QueueArg) -> None:
    """End a pause or a drain: the queue takes and starts jobs again, in the order they wait."""
    from broker.controls import resume

    with open_client() as client:
        was = resume(client.redis, client.keys, client.app, queue)
    print(f"{queue}: running" + ("" if was else " (it was not paused or draining)"))


@job_app.command("bump")
def job_bump(job_id: Annotated[str, typer.Argument(help="A queued job's id.")]) -> None:
    """Move a queued job to the front of its band: it starts next from its queue."""
    from broker.position import ordinal
    from broker.reorder import bump

    with open_client() as client:
        moved = bump(client.redis, client.keys, client.settings, job_id)
    print(f"{job_id}: front of {moved.queue} (it was {ordinal(moved.place_before)} in line)")


@job_app.command("reprioritize")
def job_reprioritize(job_id: Annotated[str, typer.Argument(help="A queued job's id.")],
                     priority: Annotated[Priority, typer.Argument(help="Its new priority.")]) -> None:
    """Move a queued job to another band (the back of it); its record and its message change together."""
    from broker.reorder import reprioritize

    with open_client() as client:
        moved = reprioritize(client.redis, client.keys, client.settings, client.app, job_id, priority)
    print(f"{job_id}: already {priority.value}" if moved is None else f"{job_id}: now {priority.value}, in {moved.queue}")

"""What a person sees: the run's tally, the progress bar with its line of stats, the summary, the command
that resumes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arbiter.batch.parse import Line
    from broker.schemas import Priority, Workload


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
    queued: list[str] = field(default_factory=list)   # ids of the jobs in flight still queued, in submit order
    waiting: Any = None            # where the queued ones stand (`arbiter.batch.waiting.Waiting`), as last read

    def quality_text(self) -> str:
        if not self.qualities:
            return "quality -"
        mix = Counter(round(q, 2) for q in self.qualities)
        parts = " ".join(f"{q:.2f}×{n}" for q, n in sorted(mix.items(), reverse=True)[:5])
        return f"quality {sum(self.qualities) / len(self.qualities):.2f} ({parts})"


def progress(console: Any) -> Any:
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


def stats_line(t: Tally, inflight: dict[str, Line]) -> str:
    """`quality 0.82 (...) · preemptions 3 · 2 running · queued 180 (next 3rd in diffusion.background, ETA ~42 s;
    last ETA ~400 s)`: the waiting jobs' place and ETA as last read (`arbiter.batch.waiting`)."""
    from dataclasses import replace

    from arbiter.batch.waiting import waiting_text

    n = t.states.get("queued", 0)
    queued = waiting_text(replace(t.waiting, queued=n)) if n and t.waiting is not None else ""
    states = ", ".join(f"{n} {s}" for s, n in sorted(t.states.items()) if not (queued and s == "queued"))
    states = ", ".join(x for x in (states, queued) if x)
    return (f"{t.quality_text()} · preemptions {t.preemptions + t.inflight_preemptions}"
            + (f" · failed {t.failed}" if t.failed else "")
            + (f" · {states}" if states else ""))


def summary(t: Tally, bad: int, already: int, not_retried: int, improve: bool) -> str:
    """The line printed when the run ends."""
    return (f"done {t.done}, failed {t.failed}, bad lines skipped {bad}, "
            f"already done before this run {already}"
            + (f", re-attached to {t.reattached} job(s) submitted before" if t.reattached else "")
            + (f", failed before (not retried) {not_retried}" if not_retried else "")
            + (f"; {t.quality_text()}, preemptions {t.preemptions}" if t.qualities else "")
            + (f"; improved to full quality {t.improved}" if improve else ""))


def resume_command(src: Path, out_dir: Path, workload: Workload, priority: Priority, model: str | None,
                   tenant: str | None = None) -> str:
    """The command that resumes this batch (the options that shape the jobs included: a line whose job
    changed would be refused by its idempotency key)."""
    import shlex

    args = ["arbiter", "batch", str(src), "--out", str(out_dir), "--workload", workload.value,
            "--priority", priority.value, *(["--model", model] if model else []),
            *(["--tenant", tenant] if tenant else [])]
    return " ".join(shlex.quote(a) for a in args)

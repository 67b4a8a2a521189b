"""One Rich console for the whole tool, and the progress bar every long stage uses."""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slower than one a second)."""

    def render(self, task) -> Text:
        # Rich's own speed estimate needs several updates; whole batches finish at once,
        # so the average since the start is the honest rate.
        elapsed = task.finished_time or task.elapsed
        speed = task.completed / elapsed if elapsed and task.completed else None
        if not speed:
            return Text("  -- it/s", style="progress.data.speed")
        text = f"{speed:5.2f} it/s" if speed >= 1 else f"{1 / speed:5.1f} s/it"
        return Text(text, style="progress.data.speed")


def progress() -> Progress:
    """Items done / total, rate, elapsed and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def tracker(bar: Progress | None, description: str, total: int) -> Callable[[int], None]:
    """A task on `bar` (if any) and the function that advances it by n items."""
    if bar is None:
        return lambda n: None
    task = bar.add_task(description, total=total)
    return lambda n: bar.advance(task, n)

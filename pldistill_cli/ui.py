"""Terminal output: one rich console (stderr) and progress bars for long work."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
_active: Progress | None = None  # rich allows one live display: nested bars join it
# seconds spent under each kind of progress bar (its description's first word: train, validate, ...),
# for the benchmark's stage-time table (`PLDISTILL_TIMINGS`); nested bars count in both
TIMINGS: dict[str, float] = {}


@contextmanager
def _timed(description: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        key = description.split()[0]
        TIMINGS[key] = TIMINGS.get(key, 0.0) + time.perf_counter() - start


class Bar:
    """One task of the live progress display."""

    def __init__(self, progress: Progress, task: TaskID):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, info: str | None = None) -> None:
        self._progress.update(self._task, advance=n, **({"info": info} if info is not None else {}))

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        fields = {"info": info} if info is not None else {}
        self._progress.update(self._task, **({"completed": completed} if completed is not None else {}), **fields)


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Bar]:
    global _active
    if _active is not None:
        task = _active.add_task(description, total=total, info="")
        try:
            with _timed(description):
                yield Bar(_active, task)
        finally:
            _active.remove_task(task)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    # Under torchrun / accelerate launch only the first process draws bars (one display, not N).
    with Progress(*columns, console=console, disable=os.environ.get("RANK", "0") != "0") as live, _timed(description):
        _active = live
        try:
            yield Bar(live, live.add_task(description, total=total, info=""))
        finally:
            _active = None

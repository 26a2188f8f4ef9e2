"""Terminal output: one rich console (stderr) and progress for long work: live bars on a terminal;
off one (a log file, a pipe) plain whole lines: one per finished epoch (Bar.report), or one when the
work is done, never a partial line."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
# Set by Ctrl-C (on_ctrl_c, installed by the CLI). The KeyboardInterrupt the handler raises can land in code
# that swallows it (a finalizer, a library's own signal handling during a read), so the training loop also
# checks this flag before every batch.
interrupted = threading.Event()


def on_ctrl_c(signum, frame) -> None:
    interrupted.set()
    raise KeyboardInterrupt
_active: Progress | None = None  # rich allows one live display: nested bars join it
_lines: Lines | None = None  # off a terminal: the outermost piece of work; nested ones print nothing
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


def _print(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)  # soft_wrap: never cut or wrapped


class Bar:
    """One task of the live progress display."""

    def __init__(self, progress: Progress, task: TaskID):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, info: str | None = None) -> None:
        self._progress.update(self._task, advance=n, **({"info": info} if info is not None else {}))

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        fields = {"info": info} if info is not None else {}
        self._progress.update(self._task, **({"completed": completed} if completed is not None else {}), **fields)

    def report(self, text: str) -> None:
        """A finished step of the work (an epoch): shown beside the bar."""
        self.update(info=text)


class Lines(Bar):
    """The same calls off a terminal: `report` prints `<description> <text>` as one line; work that
    reported nothing prints one line when it is done. Nested or non-first-process work prints nothing."""

    def __init__(self, description: str, total: int | None, shown: bool):
        self.description, self.total, self.shown = description, total, shown
        self.completed, self.reported, self.start = 0.0, False, time.perf_counter()

    def advance(self, n: float = 1, info: str | None = None) -> None:
        self.completed += n

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        self.completed = self.completed if completed is None else completed

    def report(self, text: str) -> None:
        self.reported = True
        if self.shown:
            _print(f"{self.description} {text}")

    def done(self) -> None:
        if self.shown and not self.reported:
            count = f"{self.completed:g}" + (f"/{self.total}" if self.total is not None else "")
            _print(f"{self.description}: {count} in {time.perf_counter() - self.start:.1f} s")


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Bar]:
    global _active, _lines
    # Under torchrun / accelerate launch only the first process draws bars (one display, not N).
    first = os.environ.get("RANK", "0") == "0"
    if _lines is not None or not console.is_terminal:
        lines = Lines(description, total, shown=first and _lines is None)
        outer, _lines = _lines, _lines or lines
        try:
            with _timed(description):
                yield lines
            lines.done()
        finally:
            _lines = outer
        return
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
    with Progress(*columns, console=console, disable=not first) as live, _timed(description):
        _active = live
        try:
            yield Bar(live, live.add_task(description, total=total, info=""))
        finally:
            _active = None

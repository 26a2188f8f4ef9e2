"""Time to an error: every bad-input case of tests/test_early_errors.py (one row per kind), each run several
times as a user runs it (a fresh `pldistill` process, wall time to its exit), the median per case; the
section "## Time to an error" at the end of BENCHMARKS.md is replaced by the table (every other section is
left as it is).

    python scripts/bench_errors.py [--runs 5] [--print-only]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_early_errors import CASES, cli, make_tree  # noqa: E402  (the cases are defined once, with their tests)

HEADING = "## Time to an error"


def time_case(root: Path, case: tuple, runs: int) -> tuple[float, bool]:
    """Median wall seconds of `runs` runs, and whether torch or transformers was imported before the error."""
    _, args, code, _, setup, *env = case
    times, heavy = [], False
    for _ in range(runs):
        restore = setup(root) if setup else None
        try:
            began = time.perf_counter()
            status, lines, imported = cli(root, *args, env=env[0] if env else None)
            times.append(time.perf_counter() - began)
        finally:
            if restore:
                restore()
        assert status == code and len(lines) == 1, (args, lines)
        heavy |= bool(imported)
    return statistics.median(times), heavy


def import_time(runs: int) -> float:
    """For scale: what a process that imports torch and transformers pays before it can do anything."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def section(rows: list[tuple[str, int, float, float, bool]], runs: int, imports: float) -> str:
    lines = [HEADING, "",
             f"Measured by `python scripts/bench_errors.py` on {date.today()} ({platform.machine()}, {os.cpu_count()} "
             f"cores, load average {os.getloadavg()[0]:.1f} at the end, python {platform.python_version()}): each bad "
             f"input of `tests/test_early_errors.py`, run {runs} times as a fresh `pldistill` process, wall time to "
             "its exit (interpreter start included); per kind, the median over its cases of each case's median, and "
             "the slowest case's median. None of these errors needs a model: each comes before torch and "
             f"transformers are imported (the tests assert it), which alone takes {imports:.1f} s here.", "",
             "| kind of error | cases | median s | slowest case s | torch imported |", "|---|---|---|---|---|"]
    lines += [f"| {kind} | {n} | {median:.2f} | {slowest:.2f} | {'yes' if heavy else 'no'} |"
              for kind, n, median, slowest, heavy in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--print-only", action="store_true", help="print the section; leave BENCHMARKS.md alone")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(Path(tmp))
        timed: dict[str, list[tuple[float, bool]]] = {}
        for case in CASES:
            timed.setdefault(case[0], []).append(time_case(root, case, options.runs))
            print(f"{case[0]}: {' '.join(case[1])}: {timed[case[0]][-1][0]:.2f} s", file=sys.stderr)
    rows = [(kind, len(t), statistics.median(s for s, _ in t), max(s for s, _ in t), any(h for _, h in t))
            for kind, t in timed.items()]
    text = section(rows, options.runs, import_time(options.runs))
    if options.print_only:
        print(text)
        return
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text()
    start = old.find("\n" + HEADING + "\n")
    if start < 0:  # a new section, at the end
        path.write_text(old.rstrip("\n") + "\n\n" + text)
    else:  # this section only, wherever it is
        end = old.find("\n## ", start + 1)
        path.write_text(old[: start + 1] + text + (old[end:] if end >= 0 else ""))
    print(text)


if __name__ == "__main__":
    main()

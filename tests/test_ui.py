"""Progress output reads whole anywhere: off a terminal (a log file, a pipe) the training loop prints
one plain line per epoch and other work one line when done, nothing cut and no blank lines; on a
terminal rich draws its bars."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCORES = [0.3, 0.6, 0.5, 0.65]  # validation UA per epoch
# longer than the 40 columns the run gets: a line cut to the width would lose its end
STAGE = "train teacher a-corpus-with-a-rather-long-name fold 1"
OTHER = "cache teacher a-corpus-with-a-rather-long-name fold 1"

TRAIN = f"""
import torch
from pldistill_cli.training import LoopSettings, TrainingStep, train_with_validation
from pldistill_cli.ui import progress

torch.manual_seed(0)
model, x = torch.nn.Linear(3, 1), torch.randn(8, 3)
step = TrainingStep({{"m": model}}, lambda i: {{"loss": model(x[i]).square().mean(), "ce": model(x[i]).abs().mean()}})
epoch = []

def batches(e):
    epoch.append(e)
    return [torch.arange(4), torch.arange(4, 8)]

def validate():
    with progress("validate", 2) as bar:  # nested work, as distill's validation is
        bar.advance(2)
    return {SCORES}[epoch[-1]]

train_with_validation(step, batches, validate, LoopSettings({len(SCORES)}, 0.01, 0.0, 1.0), 2,
                      __import__("pathlib").Path(__import__("sys").argv[1]), "fp", {STAGE!r})
with progress({OTHER!r}, 3) as bar:  # work without epochs, as cache-teacher's
    for _ in range(3):
        bar.advance(1, info="clip")
"""


def run_training(tmp_path: Path, **env: str) -> str:
    """The loop's whole output (stdout and stderr into one pipe), in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "RANK")}
    result = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / "work")], cwd=ROOT,
                            env={**environ, "COLUMNS": "40", "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    return result.stdout


def test_off_a_terminal_each_epoch_is_one_whole_plain_line(tmp_path):
    out = run_training(tmp_path)
    lines = out.splitlines()
    assert "" not in (line.strip() for line in lines), out  # no blank lines
    assert not re.search("[…━╸\x1b\r]", out), out  # no ellipsis, bar, escape code or carriage return
    epochs = [line for line in lines if line.startswith(STAGE)]
    assert len(epochs) == len(SCORES) == len(lines) - 1, out  # one line per epoch, then the other work's
    assert re.fullmatch(rf"{re.escape(OTHER)}: 3/3 in \d+\.\d s", lines[-1]), out  # one line when done
    best = [max(SCORES[: i + 1]) for i in range(len(SCORES))]
    for i, line in enumerate(epochs):
        number = r"\d+\.\d{3}"
        assert re.fullmatch(rf"{re.escape(STAGE)} epoch {i + 1} loss {number} ce {number} "
                            rf"validation_ua {SCORES[i]:.3f} \(best {best[i]:.3f}\)", line), line


def test_under_a_later_process_of_a_launcher_nothing_is_printed(tmp_path):
    assert run_training(tmp_path, RANK="1") == ""


def test_on_a_terminal_rich_draws_its_bars(tmp_path):
    out = run_training(tmp_path, TTY_COMPATIBLE="1", TTY_INTERACTIVE="1", COLUMNS="160")
    assert "━" in out and "\x1b[" in out  # a live bar, drawn with escape codes

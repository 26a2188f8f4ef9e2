"""`pldistill`: a thin Typer CLI over the library; each command is one pipeline stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .config import Params, load_params
from .errors import PldistillError
from .layout import Layout
from .ui import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil a large audio-language model into a small speech-emotion recogniser (PL-Distill).",
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="Settings file.")
DATASET = typer.Option("synthetic", "--dataset", "-d", help="Dataset name (see params.yaml `datasets`).")
FOLD = typer.Option(1, "--fold", "-k", help="Fold number (1-based).")
DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda (overrides params.yaml).")


def _params(path: Path, device: Optional[str] = None, section: Optional[str] = None) -> Params:
    params = load_params(path)
    import torch

    torch.set_num_threads(max(1, params.cpu_threads))
    if device is not None and section is not None:
        import dataclasses

        if device not in ("auto", "cpu", "cuda"):
            raise PldistillError(f"--device must be auto, cpu or cuda, got `{device}`")
        params = dataclasses.replace(params, **{section: dataclasses.replace(getattr(params, section), device=device)})
    return params


@app.command()
def preprocess(
    dataset: str = DATASET,
    root: Optional[Path] = typer.Option(None, "--root", help="Folder holding the corpus as distributed."),
    params: Path = PARAMS,
) -> None:
    """Corpus -> 16 kHz mono wavs and a manifest with speaker-independent folds."""
    from .preprocess import preprocess as run

    result = run(dataset, _params(params), Layout(), root)
    console.print(f"[green]{result.n_utterances} utterances[/] -> {result.manifest} "
                  f"({len(result.quarantine)} skipped); labels: {result.label_counts}")


@app.command("train-teacher")
def train_teacher(dataset: str = DATASET, fold: int = FOLD, params: Path = PARAMS,
                  device: Optional[str] = DEVICE) -> None:
    """Train the teacher on the fold's training split; keep the best on validation."""
    from .teacher import train_teacher as run

    run(dataset, fold, _params(params, device, "train_teacher"), Layout())


@app.command("cache-teacher")
def cache_teacher(dataset: str = DATASET, fold: int = FOLD, params: Path = PARAMS,
                  device: Optional[str] = DEVICE) -> None:
    """Run the teacher once over train + validation and cache its targets to Parquet."""
    from .teacher_cache import build_cache

    build_cache(dataset, fold, _params(params, device, "cache"), Layout())


@app.command()
def distill(dataset: str = DATASET, fold: int = FOLD, params: Path = PARAMS,
            device: Optional[str] = DEVICE) -> None:
    """Train the student from the teacher cache: CE + lambda_P (1 - AW-CKA) + lambda_L KL."""
    from .distill import distill as run

    run(dataset, fold, _params(params, device, "distill"), Layout())


@app.command()
def evaluate(
    dataset: str = DATASET,
    fold: int = FOLD,
    model: str = typer.Option("student", "--model", "-m", help="teacher | student | references"),
    params: Path = PARAMS,
    device: Optional[str] = DEVICE,
) -> None:
    """Score a model (or the shortcut references) on the fold's test split."""
    from .evaluation import evaluate_model, evaluate_references

    settings = _params(params, device, "evaluate")
    if model == "references":
        result = evaluate_references(dataset, fold, settings, Layout())
        for name in ("duration", "prosody"):
            console.print(f"{name}: UA {result[name]['ua']:.3f} WA {result[name]['wa']:.3f}")
        return
    if model not in ("teacher", "student"):
        raise PldistillError(f"--model must be teacher, student or references, got `{model}`")
    result = evaluate_model(dataset, fold, model, settings, Layout())
    console.print(f"{model}: WA {result['wa']:.3f} UA {result['ua']:.3f} macro-F1 {result['macro_f1']:.3f}")


@app.command()
def report(params: Path = PARAMS) -> None:
    """Markdown report: teacher vs student table, reference rows, confusion matrices."""
    from .report import write_report

    path = write_report(_params(params), Layout())
    console.print(f"report -> {path}")


def main() -> None:
    try:
        app()
    except PldistillError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: re-run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()

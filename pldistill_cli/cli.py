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
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Corpus format: ravdess, savee, iemocap, emobox, folder."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="emobox: the corpus's fold-file folder."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="folder: CSV of path,label[,speaker][,fold]."),
    speaker_pattern: Optional[str] = typer.Option(None, "--speaker-pattern", help="Regex; group 1 is the speaker."),
    params: Path = PARAMS,
) -> None:
    """Corpus -> 16 kHz mono wavs and a manifest with speaker-independent folds.

    Options left out come from `corpora.<dataset>` in params.yaml."""
    from .preprocess import preprocess as run

    result = run(dataset, _params(params), Layout(), root, adapter=adapter,
                 metadata=metadata and str(metadata), csv=csv and str(csv), speaker_pattern=speaker_pattern)
    console.print(f"[green]{result.n_utterances} utterances[/] -> {result.manifest}; {len(result.quarantine)} "
                  f"skipped, {sum(result.excluded.values())} left out by design; labels: {result.label_counts}",
                  highlight=False)


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


METHOD = typer.Option(None, "--method", help="ce | kd | ldist | pdist | fitnets | cka | pl-distill "
                                               "(default: distill.method in params.yaml).")


SEED = typer.Option(None, "--seed", help="Student seed (default: seed in params.yaml).")


@app.command()
def distill(dataset: str = DATASET, fold: int = FOLD, method: Optional[str] = METHOD, seed: Optional[int] = SEED,
            params: Path = PARAMS, device: Optional[str] = DEVICE) -> None:
    """Train the student from the teacher cache: CE + lambda_P (1 - AW-CKA) + lambda_L KL (pl-distill)."""
    from .distill import distill as run

    run(dataset, fold, _params(params, device, "distill"), Layout(), method, seed)


@app.command()
def evaluate(
    dataset: str = DATASET,
    fold: int = FOLD,
    model: str = typer.Option("student", "--model", "-m", help="teacher | student | references"),
    method: Optional[str] = METHOD,
    seed: Optional[int] = SEED,
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
    result = evaluate_model(dataset, fold, model, settings, Layout(), method, seed)
    console.print(f"{result['model']}: WA {result['wa']:.3f} UA {result['ua']:.3f} macro-F1 {result['macro_f1']:.3f}")


def _default_student(settings: Params, dataset: Optional[str], fold: Optional[int], method: Optional[str],
                     seed: Optional[int]) -> tuple[Path, Path]:
    from .layout import student_name

    layout = Layout()
    dataset, fold = dataset or settings.datasets[0], fold or settings.folds[0]
    name = student_name(method or settings.distill.method, settings.seed if seed is None else seed)
    return layout.student(dataset, fold, name), layout.metrics(dataset, fold, name)


@app.command()
def predict(
    audio: list[Path] = typer.Argument(..., help="Audio files (any format soundfile reads)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the pipeline's student)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    params: Path = PARAMS,
    device: Optional[str] = DEVICE,
) -> None:
    """Emotion and class probabilities per file, from the distilled student."""
    import json

    from rich.table import Table

    from .inference import predict_files

    settings = _params(params)
    folder = model or _default_student(settings, None, None, None, None)[0]
    results = predict_files(audio, folder, device or "auto")
    for r in results:
        if r.error:
            console.print(f"[red]error:[/] {r.path}: {r.error}", highlight=False)
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        good = [r for r in results if not r.error]
        if good:
            table = Table("file", "emotion", "p", "next most likely", "windows")
            for r in good:
                ranked = sorted(r.probabilities.items(), key=lambda kv: -kv[1])
                table.add_row(Path(r.path).name, r.label, f"{ranked[0][1]:.2f}",
                              ", ".join(f"{l} {v:.2f}" for l, v in ranked[1:4]), str(r.windows))
            console.print(table)
    if any(r.error for r in results):
        raise typer.Exit(1)


@app.command()
def export(
    out: Optional[Path] = typer.Option(None, "--out", help="Destination folder (default export/<dataset>-fold<k>-<method>)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d"),
    fold: Optional[int] = typer.Option(None, "--fold", "-k"),
    method: Optional[str] = METHOD,
    seed: Optional[int] = SEED,
    params: Path = PARAMS,
) -> None:
    """The student (LoRA merged, fp32) with its processor, prompt, labels and a model card, for plain transformers."""
    from .inference import export_student

    settings = _params(params)
    folder, metrics = _default_student(settings, dataset, fold, method, seed)
    out = out or Path("export") / f"{folder.parent.parent.name}-{folder.parent.name}-{folder.name}"
    export_student(folder, out, metrics)
    console.print(f"exported {folder} -> {out}")


@app.command()
def report(params: Path = PARAMS) -> None:
    """The comparison across methods, datasets and folds, as report/report.md and a self-contained report.html."""
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

"""`pldistill`: a thin Typer CLI over the library; each pipeline command is one stage (graph.py).

Before a stage's module (and torch) is imported, the CLI validates params.yaml, checks the stage's
data dependencies exist and are whole (inputs.py), checks the device and the launcher's process count,
takes the stage's lock, and hands the stage only the params it declares: bad input is reported in well
under a second, as one `error:` line (exit 1; usage errors exit 2)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal, Optional

import typer

from . import __version__
from .adapter_names import ADAPTER_NAMES
from .config import Params, Restricted, check_dataset_name, load_params, params_file
from .errors import PldistillError
from .files import exclusive
from .graph import CACHE, STAGES
from .inputs import (METADATA_FILE, MIN_SECONDS, audio_problem, check_cache_settings, check_device,
                     check_encoder_store, check_export_destination, check_files, check_world_size, expand_inputs,
                     how_to_make, unusable_input)
from .layout import Layout, student_name
from .methods import MethodName
from .ui import console, on_ctrl_c

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil a large audio-language model into a small speech-emotion recogniser (PL-Distill).",
)

Device = Optional[Literal["auto", "cpu", "cuda"]]
Method = Optional[MethodName]
Adapter = Optional[Literal[ADAPTER_NAMES]]
PARAMS = typer.Option(Path("params.yaml"), "--params", help="Settings file.")
DATASET = typer.Option("synthetic", "--dataset", "-d", help="Dataset name (a key of `corpora` in params.yaml).")
FOLD = typer.Option(1, "--fold", "-k", min=1, help="Fold number (1-based).")
DEVICE = typer.Option(None, "--device", help="Overrides the stage's `device` in params.yaml (auto = CUDA if present).")
METHOD = typer.Option(None, "--method", help="Distillation method (default: distill.method in params.yaml).")
SEED = typer.Option(None, "--seed", min=0, help="Student seed (default: seed in params.yaml).")
_interrupted = "nothing was kept; re-run the same command"  # what Ctrl-C reports; stages that resume set it
_timings: dict = {}  # where a stage's time went (PLDISTILL_TIMINGS=FILE appends it there as a JSON line)
_params_file = "params.yaml"  # the --params given: stage errors about a setting say `params.yaml:`; they mean it


def _version(value: bool) -> None:
    if value:
        print(f"pldistill {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _load(path: Path) -> Params:
    global _params_file
    _params_file = str(path)
    return load_params(path)


def _check_deps(stage: str, values: dict) -> None:
    """Every data dependency of the stage exists and its files are whole; a missing or truncated one names
    the command that makes it."""
    for template in STAGES[stage].deps:
        path = Path(STAGES[stage].fill(template, values))
        if not path.exists():
            made = how_to_make(path)
            raise PldistillError(f"{path}: not found" + (f"; run `{made}` (or `dvc repro`) first" if made else ""))
        if stage != "report":  # the report reads a few files of whole trees: those it checks itself
            check_files(path)
        if template == CACHE:
            check_encoder_store(path)


def _check_setup(stage: str, params: Params, device: Optional[str], section: str) -> None:
    """The device the stage would use exists, and the launcher started the processes params.yaml expects."""
    source = params_file(params)
    if section:
        check_device(device or getattr(params, section).device,
                     "--device" if device else f"{source}: {section}.device")
    if STAGES[stage].launcher:
        check_world_size(params.world_size, source)


def _run(stage: str, values: dict, params: Path, call: Callable[[Params], object], device: Optional[str] = None,
         section: str = "", resumes: str = "", check: Optional[Callable[[Params], None]] = None) -> object:
    """Run one stage: validate, check inputs, take the stage's lock, then import torch and call the library."""
    global _interrupted
    if "dataset" in values:
        check_dataset_name(values["dataset"])
    full = _load(params)
    if device is not None:
        full = dataclasses.replace(full, **{section: dataclasses.replace(getattr(full, section), device=device)})
        object.__setattr__(full, "source", str(params))
    settings = Restricted.of(full, STAGES[stage].param_keys(values), stage)
    _check_deps(stage, values)
    _check_setup(stage, full, device, section)
    if check is not None:
        check(full)
    if "dataset" in values and "fold" in values:  # reads the manifest (pyarrow): the slowest check, last
        from .manifest import check_fold

        check_fold(Layout().manifest(values["dataset"]), values["fold"])
    # under torchrun the first process holds the stage's lock; a second run stops here, before the imports
    lock = exclusive(Path(resumes), f"`pldistill {STAGES[stage].command}` for these outputs") \
        if resumes and os.environ.get("RANK", "0") == "0" else nullcontext()
    with lock:
        began = time.perf_counter()
        import_module(f".{STAGES[stage].module}", __package__)  # torch, transformers: after the cheap checks
        _timings.update(stage=stage, startup=time.perf_counter() - began, started=began)
        if "cpu_threads" in {k.split(".")[0] for k in STAGES[stage].params}:
            import torch

            torch.set_num_threads(settings.cpu_threads)
        if resumes:
            _interrupted = f"progress kept in {resumes}; re-run the same command to resume"
        return call(settings)


@app.command()
def preprocess(
    dataset: str = DATASET,
    root: Optional[Path] = typer.Option(None, "--root", help="Folder holding the corpus as distributed."),
    adapter: Adapter = typer.Option(
        None, "--adapter", help="Corpus format (default: corpora.<dataset>.adapter, else the dataset name)."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="emobox: the corpus's fold-file folder."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="folder: CSV of path,label[,speaker][,fold]."),
    speaker_pattern: Optional[str] = typer.Option(None, "--speaker-pattern", help="Regex; group 1 is the speaker."),
    params: Path = PARAMS,
) -> None:
    """Corpus -> 16 kHz mono wavs and a manifest with speaker-independent folds.

    Options left out come from `corpora.<dataset>` in params.yaml."""
    from .datasets import check_corpus, ignored, resolve

    overrides = dict(adapter=adapter, metadata=metadata and str(metadata), csv=csv and str(csv),
                     speaker_pattern=speaker_pattern)

    def check(settings: Params) -> None:  # before torch: option conflicts, unknown dataset, root, the CSV
        configured = settings.corpora.get(dataset)
        name = adapter or (configured.adapter if configured is not None else "") or dataset
        unread = ignored(name, metadata=metadata, csv=csv, speaker_pattern=speaker_pattern)
        if unread:
            option = "--" + unread[0].replace("_", "-")
            raise typer.BadParameter(f"the {name} adapter does not read {option}; leave it out, or pass the adapter "
                                     "that reads it (`--adapter folder` reads --csv, emobox --metadata)",
                                     param_hint=f"'{option}'")
        check_corpus(dataset, *resolve(dataset, settings, root, **overrides))

    def call(settings: Params):
        from .preprocess import preprocess as run

        return run(dataset, settings, Layout(), root, **overrides)

    result = _run("preprocess", {"dataset": dataset}, params, call,
                  resumes=str(Layout().work(dataset, None, "preprocess")), check=check)
    console.print(f"[green]{result.n_utterances} utterances[/] -> {result.manifest}; {len(result.quarantine)} "
                  f"skipped, {sum(result.excluded.values())} left out by design; labels: {result.label_counts}",
                  highlight=False)


def _pretrain(stage: str, params: Path, device: Optional[str]) -> None:
    """A pretraining stage: no matrix axes; its function is named as its module (pretrain_encoder.pretrain_encoder)."""
    module = STAGES[stage].module

    def call(settings: Params):
        return getattr(import_module(f".{module}", __package__), module)(settings, Layout())

    _run(stage, {}, params, call, device, module, resumes=str(Layout().work(None, None, stage)))


@app.command("pretrain-encoder")
def pretrain_encoder(params: Path = PARAMS, device: Device = DEVICE) -> None:
    """Pretrain the preset's audio encoder to hear prosody in emotion-free synthetic speech (hub: record the checkpoint's)."""
    _pretrain("pretrain-encoder", params, device)


@app.command("pretrain-teacher")
def pretrain_teacher(params: Path = PARAMS, device: Device = DEVICE) -> None:
    """Pretrain the preset's teacher on labelled emotional speech in voices and sentences no fold uses (hub: record the checkpoint's)."""
    _pretrain("pretrain-teacher", params, device)


@app.command("train-teacher")
def train_teacher(dataset: str = DATASET, fold: int = FOLD, params: Path = PARAMS, device: Device = DEVICE) -> None:
    """Train the teacher on the fold's training split; keep the best on validation."""

    def call(settings: Params):
        from .train_teacher import train_teacher as run

        return run(dataset, fold, settings, Layout())

    _run("train-teacher", {"dataset": dataset, "fold": fold}, params, call, device, "train_teacher",
         resumes=str(Layout().work(dataset, fold, "train-teacher")))


@app.command("cache-teacher")
def cache_teacher(dataset: str = DATASET, fold: int = FOLD, params: Path = PARAMS, device: Device = DEVICE) -> None:
    """Run the teacher once over train + validation and cache its targets to Parquet."""

    def call(settings: Params):
        from .cache_teacher import build_cache

        return build_cache(dataset, fold, settings, Layout())

    def check(settings: Params) -> None:  # top_k and attention_layer fit the teacher: before anything is written
        check_cache_settings(Layout().teacher(dataset, fold), settings.cache.top_k, settings.cache.attention_layer,
                             params_file(settings))

    _run("cache-teacher", {"dataset": dataset, "fold": fold}, params, call, device, "cache",
         resumes=str(Layout().work(dataset, fold, "cache-teacher")), check=check)


def _student(params: Path, method: Optional[str], seed: Optional[int]) -> tuple[str, int]:
    """--method and --seed, or their defaults from params.yaml."""
    settings = _load(params)
    return method or settings.distill.method, settings.seed if seed is None else seed


@app.command()
def distill(dataset: str = DATASET, fold: int = FOLD, method: Method = METHOD, seed: Optional[int] = SEED,
            params: Path = PARAMS, device: Device = DEVICE) -> None:
    """Train the student from the teacher cache: CE + lambda_P (1 - AW-CKA) + lambda_L KL (pl-distill)."""
    method, seed = _student(params, method, seed)

    def call(settings: Params):
        from .distill import distill as run

        return run(dataset, fold, settings, Layout(), method, seed)

    _run("distill", {"dataset": dataset, "fold": fold, "method": method, "seed": seed}, params, call, device,
         "distill", resumes=str(Layout().work(dataset, fold, student_name(method, seed))))


@app.command()
def evaluate(
    dataset: str = DATASET,
    fold: int = FOLD,
    model: Literal["teacher", "student", "references"] = typer.Option("student", "--model", "-m",
                                                                     help="What to score."),
    method: Method = METHOD,
    seed: Optional[int] = SEED,
    params: Path = PARAMS,
    device: Device = DEVICE,
    on: Optional[str] = typer.Option(None, "--on", help="Cross-corpus: score on this dataset's test split of the fold "
                                                        "instead, on the labels the two share (see `cross_corpus`)."),
) -> None:
    """Score a model (or the shortcut references) on the fold's test split."""
    values: dict = {"dataset": dataset, "fold": fold}
    if on is not None:
        if model == "references":
            raise PldistillError("--on scores a model on another corpus; the references have nothing to carry over")
        check_dataset_name(on)
        values = {"pair": SimpleNamespace(train=dataset, test=on), "fold": fold}
    if model == "references":
        def call(settings: Params):
            from .evaluate import evaluate_references

            return evaluate_references(dataset, fold, settings, Layout())

        for name, result in _run("evaluate-references", values, params, call).items():
            console.print(f"{name}: UA {result['ua']:.3f} WA {result['wa']:.3f}")
        return
    if model == "student":
        method, seed = _student(params, method, seed)
        values.update(method=method, seed=seed)

    def call(settings: Params):
        from .evaluate import evaluate_model

        return evaluate_model(dataset, fold, model, settings, Layout(), method, seed, on)

    def folds_exist(_: Params) -> None:
        from .manifest import check_fold

        for name in (dataset, on):
            check_fold(Layout().manifest(name), fold)

    stage = f"evaluate-{model}" if on is None else f"evaluate-cross-{model}"
    result = _run(stage, values, params, call, device, "evaluate", check=folds_exist if on else None)
    console.print(f"{result['model']}: WA {result['wa']:.3f} UA {result['ua']:.3f} macro-F1 {result['macro_f1']:.3f}")


def _default_student(params: Path, dataset: Optional[str], fold: Optional[int], method: Optional[str],
                     seed: Optional[int]) -> tuple[Path, Path]:
    settings = _load(params)
    dataset, fold = dataset or settings.datasets[0], fold or settings.folds[0]
    name = student_name(method or settings.distill.method, settings.seed if seed is None else seed)
    return Layout().student(dataset, fold, name), Layout().metrics(dataset, fold, name)


@app.command()
def predict(
    audio: list[Path] = typer.Argument(..., help="Audio files (any format soundfile reads), folders (every audio file "
                                                 "under them, sorted) or quoted glob patterns ('clips/*.wav')."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the pipeline's student)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of one line per file."),
    params: Path = PARAMS,
    device: Device = DEVICE,
) -> None:
    """Emotion and class probabilities per file, from the distilled student (a folder: every audio file in it)."""
    folder = model or _default_student(params, None, None, None, None)[0]
    if not (folder / "config.json").exists() and not (folder / METADATA_FILE).exists():
        raise PldistillError(f"{folder}: no model here; run `dvc repro` (or `pldistill distill`) first, or pass --model")
    check_files(folder)
    check_device(device or "auto", "--device")
    made_by = json.loads((folder / METADATA_FILE).read_text()) if (folder / METADATA_FILE).exists() else {}
    shortest = (made_by.get("params") or {}).get("preprocess", {}).get("min_seconds", MIN_SECONDS)

    files = expand_inputs(audio)
    early = [unusable_input(path) or audio_problem(path, shortest) for path in files]  # before the model loads
    for path, problem in zip(files, early):
        if problem:
            console.print(f"[red]error:[/] {path}: {problem}", highlight=False, soft_wrap=True)
    results = [{"path": str(path), "label": None, "probabilities": {}, "windows": 0, "error": problem}
               for path, problem in zip(files, early)]
    if not all(early):
        from .models import ModelMeta
        from .predict import describe_model, predict_files

        console.print(f"model: {folder}: {describe_model(ModelMeta.read(folder))}", highlight=False, soft_wrap=True)

        answers = iter(predict_files([path for path, problem in zip(files, early) if not problem], folder,
                                     device or "auto"))
        results = [r if r["error"] else vars(next(answers)) for r in results]
        for r, problem in zip(results, early):
            if r["error"] and not problem:
                console.print(f"[red]error:[/] {r['path']}: {r['error']}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(results, indent=2))
    elif not all(early):  # some files were answered (predict is imported)
        from .predict import Prediction, result_lines

        for line in result_lines([Prediction(**r) for r in results if not r["error"]]):
            print(line)
    if any(r["error"] for r in results):
        raise typer.Exit(1)


@app.command()
def export(
    out: Optional[Path] = typer.Option(None, "--out", help="Destination folder: absent, empty or an earlier export "
                                                           "(default: export/<dataset>-fold<k>-student-<method>-s<seed>)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset (default: the first of `datasets`)."),
    fold: Optional[int] = typer.Option(None, "--fold", "-k", min=1, help="Fold (default: the first of `folds`)."),
    method: Method = METHOD,
    seed: Optional[int] = SEED,
    params: Path = PARAMS,
) -> None:
    """The student (LoRA merged, fp32) with its processor, labels and a Hub model card, for plain transformers."""
    folder, metrics = _default_student(params, dataset, fold, method, seed)
    out = out or Path("export") / f"{folder.parent.parent.name}-{folder.parent.name}-{folder.name}"
    check_export_destination(out)
    if not (folder / METADATA_FILE).exists():
        raise PldistillError(f"{folder}: no student here; run `dvc repro` (or `pldistill distill`) first")
    check_files(folder)
    from .export import export_student

    export_student(folder, out, metrics)
    console.print(f"exported {folder} -> {out}")


@app.command()
def report(params: Path = PARAMS) -> None:
    """The comparison across methods, datasets and folds, as report/report.md and a self-contained report.html."""

    def call(settings: Params):
        from .report import write_report

        return write_report(settings, Layout())

    def check(settings: Params) -> None:  # every listed fold exists in every listed dataset
        from .manifest import manifest_folds

        for dataset in settings.datasets:
            folds = manifest_folds(Layout().manifest(dataset))
            absent = [k for k in settings.folds if k not in folds]
            if absent:
                raise PldistillError(f"{params_file(settings)}: `folds` lists {absent[0]}, but fold {absent[0]} does not "
                                     f"exist; dataset `{dataset}` has folds {folds}: list only those")

    console.print(f"report -> {_run('report', {}, params, call, check=check)}")


def _usage_errors() -> tuple[type, ...]:
    """Click's usage error class, and typer's vendored copy of it (typer >= 0.20 carries its own click)."""
    import click

    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        return (click.UsageError,)
    return (click.UsageError, UsageError)


def main() -> None:
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        code = app(standalone_mode=False)
    except _usage_errors() as exc:  # a bad option or value: one line, exit 2
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        console.print(f"[red]error:[/] {exc.format_message()}{where}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except PldistillError as exc:
        message = str(exc)  # stage code names the settings file `params.yaml`: say which file it was
        if message.startswith("params.yaml: "):
            message = _params_file + message.removeprefix("params.yaml")
        console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    if code == 130:  # Ctrl-C (typer turns KeyboardInterrupt into exit code 130)
        console.print(f"[yellow]interrupted[/]: {_interrupted}", highlight=False, soft_wrap=True)
    _record_timings()
    sys.exit(code if isinstance(code, int) else 0)


def _record_timings() -> None:
    """With PLDISTILL_TIMINGS=FILE, append the stage's wall time, its startup (imports) and the time under
    each kind of progress bar to FILE (the benchmark's stage table; never inside an output)."""
    target = os.environ.get("PLDISTILL_TIMINGS")
    if target and _timings:
        from .ui import TIMINGS

        record = {"command": " ".join(sys.argv[1:]), "stage": _timings["stage"], "startup": _timings["startup"],
                  "work": time.perf_counter() - _timings["started"] - _timings["startup"], "phases": TIMINGS}
        with open(target, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

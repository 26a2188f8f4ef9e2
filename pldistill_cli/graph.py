"""The DVC graph, defined once: each stage's command, the matrix it runs over, the params it reads, the
data it reads and the outputs it writes. dvc.yaml is generated from this table
(`python -m pldistill_cli.graph`, which rewrites dvc.yaml; `--check` says whether it is current), and:

- a stage's code dependencies are the package modules in its import closure, found by reading the
  code (`import_closure`), so editing a module re-runs exactly the stages that import it;
- the CLI hands each stage a view of params.yaml holding only the keys the stage declares here
  (config.Restricted): a stage that reads anything else fails, so no setting can change a result
  without DVC knowing;
- the CLI checks a stage's data dependencies exist before importing torch, and names the command
  that makes a missing one.

Paths come from layout.Layout, filled with placeholders, so the file layout is defined once too.
"""

from __future__ import annotations

import ast
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

from .config import CACHE_KEYS, DISTILL_KEYS, PREPROCESS_KEYS
from .layout import REPORT_FILES, Layout, student_name

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
# axis -> its params.yaml list; a `pair` is a cross_corpus entry (templates read `{pair.train}`, `{pair.test}`)
AXES = {"dataset": "datasets", "fold": "folds", "method": "methods", "seed": "seeds", "pair": "cross_corpus"}
OPTIONS = ("dataset", "fold", "method", "seed")  # the axes that are command options (--dataset ...)


class _Placeholder:
    """An axis in a template: `{fold}` formats as show("fold"), `{pair.train}` as show("pair.train")."""

    def __init__(self, axis: str, show):
        self.axis, self.show = axis, show

    def __format__(self, spec: str) -> str:
        return self.show(self.axis)

    def __getattr__(self, key: str) -> str:
        return self.show(f"{self.axis}.{key}")


def _placeholders(show) -> dict:
    return {a: _Placeholder(a, show) for a in AXES}
_L = Layout()
_RUN = student_name("{method}", "{seed}")
ENCODER = str(_L.encoder())
TEACHER_INIT = str(_L.teacher_init())
PREPARED = str(_L.prepared("{dataset}"))
TEACHER = str(_L.teacher("{dataset}", "{fold}"))
CACHE = str(_L.cache("{dataset}", "{fold}"))
STUDENT = str(_L.student("{dataset}", "{fold}", _RUN))


def _evaluated(name: str, dataset: str = "{dataset}", on: str | None = None) -> dict:
    """What evaluate writes for one model: its metrics (DVC metrics) and other outputs."""
    return {"metrics": (str(_L.metrics(dataset, "{fold}", name, on)),),
            "outs": (str(_L.details(dataset, "{fold}", name, on)), str(_L.predictions(dataset, "{fold}", name, on)))}


# cross-corpus: a cross_corpus pair's models (trained on {pair.train}) scored on {pair.test}'s clips
_CROSS = "evaluate --model {model} --dataset {pair.train} --on {pair.test}"
_CROSS_PARAMS = ("seed", "cpu_threads", "model.dtype", "evaluate", "preprocess.sample_rate", "cross_corpus")
_CROSS_DATA = (str(_L.prepared("{pair.train}")), str(_L.prepared("{pair.test}")))


@dataclass(frozen=True)
class Stage:
    command: str  # the pldistill subcommand (and fixed options)
    module: str  # the package module it runs: its import closure is the stage's code dependency
    axes: tuple[str, ...] = ()  # matrix axes (AXES); the stage runs once per combination
    params: tuple[str, ...] = ()  # params.yaml keys it reads, e.g. `cache.top_k`, `corpora.{dataset}`
    deps: tuple[str, ...] = ()  # data it reads
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    launcher: bool = False  # started through params.yaml's `launcher` (torchrun / accelerate launch)

    def fill(self, text: str, values: dict) -> str:
        """A template with the matrix values (a pair's as a namespace with .train and .test)."""
        return text.format(**values)

    def cli(self, values: dict) -> str:
        """The command line (after `pldistill`) that runs the stage for these matrix values."""
        return self.fill(self.command + "".join(f" --{a} {{{a}}}" for a in self.axes if a in OPTIONS), values)

    def param_keys(self, values: dict) -> list[str]:
        return [self.fill(p, values) for p in self.params]


_PRE = tuple(f"preprocess.{k}" for k in PREPROCESS_KEYS)
_CACHE = tuple(f"cache.{k}" for k in CACHE_KEYS)
# a student's method reads its own loss weights only (DVC gives a matrix stage one params list for all its rows,
# so the method's row is a key of it): a weight re-runs only the students of the methods that use it
_DISTILL = (*(f"distill.{k}" for k in DISTILL_KEYS), "distill.weights.{method}")
STAGES: dict[str, Stage] = {
    "pretrain-encoder": Stage("pretrain-encoder", "pretrain_encoder", (),
                              ("seed", "cpu_threads", "model.preset", "pretrain_encoder"), outs=(ENCODER,)),
    "pretrain-teacher": Stage("pretrain-teacher", "pretrain_teacher", (),
                              ("seed", "cpu_threads", "model.preset", "pretrain_teacher"), deps=(ENCODER,),
                              outs=(TEACHER_INIT,)),
    "preprocess": Stage("preprocess", "preprocess", ("dataset",), ("seed", "corpora.{dataset}", "preprocess"),
                        outs=(PREPARED,)),
    "train-teacher": Stage("train-teacher", "train_teacher", ("dataset", "fold"),
                           ("seed", "cpu_threads", "world_size", "model", "train_teacher", *_PRE),
                           deps=(PREPARED, ENCODER, TEACHER_INIT), outs=(TEACHER,), launcher=True),
    "cache-teacher": Stage("cache-teacher", "cache_teacher", ("dataset", "fold"),
                           ("cpu_threads", "world_size", "model.dtype", "cache", *_PRE),
                           deps=(PREPARED, TEACHER), outs=(CACHE,), launcher=True),
    "distill": Stage("distill", "distill", ("dataset", "fold", "method", "seed"),
                     ("cpu_threads", "world_size", "model", *_DISTILL, *_CACHE, *_PRE),
                     deps=(PREPARED, TEACHER, CACHE), outs=(STUDENT,), launcher=True),
    "evaluate-teacher": Stage("evaluate --model teacher", "evaluate", ("dataset", "fold"),
                              ("seed", "cpu_threads", "model.dtype", "evaluate", "cache.attention_layer",
                               "preprocess.sample_rate"),
                              deps=(PREPARED, TEACHER),
                              metrics=_evaluated("teacher")["metrics"],
                              outs=(*_evaluated("teacher")["outs"], str(_L.latency("{dataset}", "{fold}", "teacher")),
                                    str(_L.attention_examples("{dataset}", "{fold}")))),
    "evaluate-student": Stage("evaluate --model student", "evaluate", ("dataset", "fold", "method", "seed"),
                              ("seed", "cpu_threads", "model.dtype", "evaluate", "preprocess.sample_rate"),
                              deps=(PREPARED, STUDENT),
                              metrics=_evaluated(_RUN)["metrics"],
                              outs=(*_evaluated(_RUN)["outs"], str(_L.latency("{dataset}", "{fold}", _RUN)))),
    "evaluate-references": Stage("evaluate --model references", "evaluate", ("dataset", "fold"),
                                 ("seed", "preprocess.workers", "evaluate.references"), deps=(PREPARED,),
                                 **_evaluated("references")),
    "evaluate-cross-teacher": Stage(_CROSS.replace("{model}", "teacher"), "evaluate", ("pair", "fold"), _CROSS_PARAMS,
                                    deps=(*_CROSS_DATA, str(_L.teacher("{pair.train}", "{fold}"))),
                                    **_evaluated("teacher", "{pair.train}", "{pair.test}")),
    "evaluate-cross-student": Stage(_CROSS.replace("{model}", "student"), "evaluate", ("pair", "fold", "method", "seed"),
                                    _CROSS_PARAMS, deps=(*_CROSS_DATA, str(_L.student("{pair.train}", "{fold}", _RUN))),
                                    **_evaluated(_RUN, "{pair.train}", "{pair.test}")),
    "report": Stage("report", "report", (),
                    ("seed", "datasets", "folds", "methods", "seeds", "cross_corpus", "model", "distill", "evaluate",
                     "cache", *_PRE),
                    deps=(str(_L.metrics_root), str(_L.data / "runs"), str(_L.data / "prepared")),
                    outs=tuple(str(_L.report_root / name) for name in REPORT_FILES)),
}


def producer(path: str) -> tuple[str, dict] | None:
    """The stage (and matrix values) whose output `path` is, if any."""
    for name, stage in STAGES.items():
        for template in stage.outs + stage.metrics:
            # a named group per placeholder (`{pair.train}` -> pair__train), the rest literal
            m = re.fullmatch("".join(re.escape(text) + (f"(?P<{field.replace('.', '__')}>[^/]+)" if field else "")
                                     for text, field, _, _ in string.Formatter().parse(template)), path)
            if m:
                found = {k: v for k, v in m.groupdict().items() if v is not None}
                pair = {k.split("__")[1]: found.pop(k) for k in list(found) if "__" in k}
                return name, {**found, **({"pair": SimpleNamespace(**pair)} if pair else {})}
    return None


# --------------------------------------------------------------------------------- code dependencies


def _module_file(name: str) -> Path | None:
    """pldistill_cli.x.y -> its file (module or package __init__), or None outside the package."""
    if name != PACKAGE.name and not name.startswith(PACKAGE.name + "."):
        return None
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(path: Path) -> set[str]:
    """Package modules a file imports anywhere (module level or inside functions)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return {m for m in found if _module_file(m) is not None and _module_file(m).exists()}


def import_closure(*modules: str) -> list[str]:
    """Files (relative to the repository root) of the package modules that `modules` import,
    directly or not, including the packages' __init__ files."""
    todo = [f"{PACKAGE.name}.{m}" for m in modules]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            parent = ".".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                todo += sorted(_imports(_module_file(parent)) - seen)
    return sorted(str(_module_file(m).relative_to(ROOT)) for m in seen)


def _cli_imports() -> list[str]:
    """The CLI's module-level imports: every command runs them (each command imports its stage
    module inside its function, so cli.py's other imports belong to other stages)."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return sorted(m for m in found if _module_file(f"{PACKAGE.name}.{m}").exists())


def code_deps(stage: Stage) -> list[str]:
    """The stage module's import closure, the CLI's module-level imports, cli.py itself and, for stages
    started through a launcher (`python -m pldistill_cli`), __main__.py."""
    files = set(import_closure(stage.module, *_cli_imports())) | {f"{PACKAGE.name}/cli.py"}
    if stage.launcher:
        files.add(f"{PACKAGE.name}/__main__.py")
    return sorted(files)


# ------------------------------------------------------------------------------------------ dvc.yaml


_ITEM = _placeholders(lambda name: "${item.%s}" % name)  # DVC's matrix values: ${item.fold}, ${item.pair.train}


def _dvc(text: str) -> str:
    return text.format(**_ITEM)


def _out(path: str, **extra) -> dict:
    # cache: false (large or per-machine outputs stay out of DVC's cache); persist: true (DVC does not
    # delete them before a run: every stage replaces its outputs atomically, so a failed run leaves
    # the previous outputs as they were)
    return {_dvc(path): {"cache": False, "persist": True, **extra}}


def dvc_stage(stage: Stage) -> dict:
    axes = stage.axes
    start = "${launcher}" if stage.launcher else "pldistill"
    entry: dict = {}
    if axes:
        entry["matrix"] = {a: "${%s}" % AXES[a] for a in axes}
    entry["cmd"] = f"{start} {stage.cli(_ITEM)}"
    entry["deps"] = [_dvc(d) for d in stage.deps] + code_deps(stage)
    entry["params"] = [_dvc(p) for p in stage.params]
    if stage.outs:
        entry["outs"] = [_out(o) for o in stage.outs]
    if stage.metrics:
        entry["metrics"] = [_out(m) for m in stage.metrics]
    return entry


HEADER = """\
# Generated from pldistill_cli/graph.py by `python -m pldistill_cli.graph`: do not edit by hand (a test
# checks it is current). The pipeline pretrain-encoder -> pretrain-teacher, preprocess -> train-teacher ->
# cache-teacher -> distill -> evaluate -> report, over every dataset x fold (x method x seed) in params.yaml. Code
# dependencies are each stage's import closure; params are exactly the keys each stage reads.
# Outputs stay out of DVC's cache (cache: false) and are replaced atomically by their stage
# (persist: true); interrupted stages resume from data/work/, which no stage declares.
"""
# `dvc plots show` shows the report's figures (training curves included): images need no script, so the
# page it writes opens offline (DVC's vega plots load vega from a CDN)
PLOTS = ["report/figures"]


def render() -> str:
    stages = {name: dvc_stage(stage) for name, stage in STAGES.items()}
    body = yaml.safe_dump({"vars": ["params.yaml"], "stages": stages, "plots": PLOTS}, sort_keys=False, width=110)
    return HEADER + body


def main(argv: list[str]) -> int:
    path = ROOT / "dvc.yaml"
    text = render()
    if "--check" in argv:
        current = path.exists() and path.read_text() == text
        print("dvc.yaml is current" if current else "dvc.yaml is stale: run `python -m pldistill_cli.graph`")
        return 0 if current else 1
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

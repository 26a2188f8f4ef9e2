"""report: a Markdown page with the teacher vs student table, the shortcut references and
confusion matrices, for every dataset x fold in params.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .config import Params
from .errors import PldistillError
from .evaluation import confusion
from .manifest import manifest_labels
from .layout import Layout


def _load(path: Path) -> dict:
    if not path.exists():
        raise PldistillError(f"{path}: metrics missing; run `pldistill evaluate` for this model first")
    return json.loads(path.read_text())


def _confusion_figure(dataset: str, fold: int, layout: Layout, models: list[str], out: Path) -> None:
    labels = manifest_labels(layout.manifest(dataset))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        pred = pd.read_csv(layout.predictions(dataset, fold, model))
        cm = confusion(pred["label"], pred["prediction"], labels)
        rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(model)
    fig.suptitle(f"{dataset} fold {fold}: test-split confusion (counts; colour = row recall)")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def write_report(params: Params, layout: Layout = Layout()) -> Path:
    out_dir = layout.report_root
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# pldistill report", "",
             "Scores on each fold's test split (speaker-independent); WA = accuracy, UA = mean per-class recall "
             "(unweighted accuracy), macro-F1 over the classes present. Models are scored by ranking the label "
             "words (summed log-probability of the label tokens and the end-of-turn token after one shared prompt).",
             ""]
    for dataset in params.datasets:
        chance = 1 / len(manifest_labels(layout.manifest(dataset)))
        for fold in params.folds:
            teacher = _load(layout.metrics(dataset, fold, "teacher"))
            student = _load(layout.metrics(dataset, fold, "student"))
            refs = _load(layout.metrics(dataset, fold, "references"))
            lines += [f"## {dataset}, fold {fold} ({teacher['n']} test clips, chance UA {chance:.3f})", "",
                      "| model | parameters | WA | UA | macro-F1 |", "|---|---:|---:|---:|---:|"]
            for name, m in (("teacher", teacher), ("student (PL-Distill)", student)):
                lines.append(f"| {name} | {m['parameters']:,} | {m['wa']:.3f} | {m['ua']:.3f} | {m['macro_f1']:.3f} |")
            for key in ("duration", "prosody"):
                r = refs[key]
                lines.append(f"| reference: {r['description']} | - | {r['wa']:.3f} | {r['ua']:.3f} | {r['macro_f1']:.3f} |")
            picture = out_dir / f"{dataset}-fold{fold}-confusion.png"
            _confusion_figure(dataset, fold, layout, ["teacher", "student", "prosody"], picture)
            lines += ["", f"![confusion matrices]({picture.name})", "",
                      "The reference rows expose shortcuts in the data: a model that does no better than them "
                      "has not learned more than clip length or coarse prosody.", ""]
    lines += ["## What made these numbers", "", "```json",
              json.dumps({"seed": params.seed, "model": params.section("model"), "cache": params.section("cache"),
                          "distill": params.section("distill")}, indent=2), "```", ""]
    path = out_dir / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path

"""report: the comparison across methods, datasets and folds, as Markdown and as a self-contained HTML
page (rendered with markdown-it-py, images embedded), with the statistics that can decide, the
diagnostics that say whether each distillation term was alive, and the pictures people look at."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import soundfile as sf

from .cache import TeacherCache, expected_meta
from .config import Params
from .errors import PldistillError
from .files import atomic_path, fresh_folder, replace_folder, write_text
from .labels import PAPER_HEADLINES
from .layout import REPORT_FILES, Layout, student_name
from .manifest import manifest_labels, read_manifest
from .metrics import classification_metrics, cluster_bootstrap_ua, confusion, paired_comparison
from .models import ModelMeta
from .prompt import PromptLayout

CURVES = ("loss", "ce", "cka", "mse", "kl", "validation_ua")  # the per-epoch terms drawn
BASELINE = "ce"  # every other method is compared with this one, clip by clip
ALPHA = 0.05
UNIFORM = 0.95  # attention whose effective steps exceed this share of T is (nearly) uniform
SATURATED = 0.99  # CKA at or above this from the start leaves 1 - CKA no room to teach
FAINT = 0.05  # a term whose gradient is below this share of CE's barely moves the student


def _load(path: Path) -> dict:
    if not path.exists():
        raise PldistillError(f"{path}: missing; run `pldistill evaluate` for this model first (or `dvc repro`)")
    return json.loads(path.read_text())


# pragma: no mutate start (figures and page assembly: mutation testing covers the numbers; TESTING.md)
def _save(fig, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)
    return path


# pragma: no mutate end
def _mean_sd(values: list[float]) -> str:
    """Mean ± sample standard deviation (n - 1), or the single value."""
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def cell(value: object) -> str:
    """Text for a Markdown table cell: a `|` would end the cell, so it is escaped."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def table(rows: list[list[object]], header: list[str]) -> list[str]:
    return ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(map(cell, r)) + " |" for r in rows]


@dataclass
class Runs:
    """Every evaluated run of one model (teacher, a student method, a reference) on one dataset."""

    name: str  # as shown: teacher, a method, a reference
    runs: list[tuple[int, int | None, str]]  # (fold, seed, output name)
    details: list[dict] = field(default_factory=list)
    predictions: pd.DataFrame | None = None  # every run's test predictions, with fold and seed


def _collect(layout: Layout, dataset: str, name: str, runs: list[tuple[int, int | None, str]]) -> Runs:
    found = Runs(name, runs)
    frames = []
    for fold, seed, output in runs:
        found.details.append(_load(layout.details(dataset, fold, output)))
        path = layout.predictions(dataset, fold, output)
        if not path.exists():
            raise PldistillError(f"{path}: missing; run `pldistill evaluate` for this model first (or `dvc repro`)")
        frames.append(pd.read_csv(path, dtype={"speaker": str}).assign(fold=fold, seed=seed))
    found.predictions = pd.concat(frames, ignore_index=True)
    return found


def _references(layout: Layout, dataset: str, folds: list[int]) -> dict[str, Runs]:
    """The shortcut references of every fold, one Runs each (evaluate writes them together)."""
    details = [_load(layout.details(dataset, f, "references")) for f in folds]
    frames = [pd.read_csv(layout.predictions(dataset, f, "references"), dtype={"speaker": str}).assign(fold=f, seed=None)
              for f in folds]
    return {name: Runs(f"reference: {name}", [(f, None, "references") for f in folds], [d[name] for d in details],
                       pd.concat([frame.rename(columns={name: "prediction"}) for frame in frames], ignore_index=True))
            for name in details[0]}


def _summary_row(runs: Runs, labels, seed: int, teacher_params: int | None) -> list[object]:
    """Model, parameters, compression, WA / UA / macro-F1 (mean ± sample sd over runs), pooled UA with
    its speaker-level interval, runs, unmatched answers."""
    d, p = runs.details, runs.predictions
    pooled = classification_metrics(p["label"], p["prediction"], labels)
    lo, hi = cluster_bootstrap_ua(p["label"], p["prediction"], p["speaker"], seed=seed)
    n_params = d[0].get("parameters")
    size = [f"{n_params:,}", f"{teacher_params / n_params:.1f}x"] if n_params and teacher_params else ["-", "-"]
    return [runs.name, *size, _mean_sd([x["wa"] for x in d]), _mean_sd([x["ua"] for x in d]),
            _mean_sd([x["macro_f1"] for x in d]), f"{pooled['ua']:.3f} [{lo:.3f}, {hi:.3f}]", len(d),
            pooled["unmatched"]]


def _paired(student: Runs, baseline: Runs, seed: int) -> dict:
    """The student against the baseline on the same test clips (same fold and seed): clip-level pairs."""
    keys = ["fold", "seed", "id"]
    both = student.predictions.merge(baseline.predictions[keys + ["prediction"]], on=keys, suffixes=("", "_base"))
    return paired_comparison(both["label"], both["prediction"], both["prediction_base"], both["speaker"], seed=seed)


def _verdict(result: dict) -> str:
    lo, hi = result["ci95"]
    if result["p"] < ALPHA and (lo > 0 or hi < 0):
        return "significant (better)" if result["diff"] > 0 else "significant (worse)"
    return "not significant"


# pragma: no mutate start (figures and page assembly: mutation testing covers the numbers; TESTING.md)
def _confusions(predictions: dict[str, pd.DataFrame], labels, dataset: str, folds, out: Path) -> Path:
    fig, axes = plt.subplots(1, len(predictions), figsize=(3.6 * len(predictions), 3.8), squeeze=False)
    for ax, (title, pred) in zip(axes[0], predictions.items()):
        cm = confusion(pred["label"], pred["prediction"], labels)
        rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("true", fontsize=8)
    fig.suptitle(f"{dataset}: test-split confusion pooled over folds {list(folds)} (counts; colour = row recall)",
                 fontsize=9)
    return _save(fig, out)


def _recall_bars(recalls: dict[str, dict[str, float]], labels, dataset: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 3.2))
    width = 0.8 / len(recalls)
    for k, (name, recall) in enumerate(recalls.items()):
        ax.bar(np.arange(len(labels)) + k * width, [recall.get(l, 0) for l in labels], width, label=name)
    ax.axhline(1 / len(labels), color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, fontsize=8)
    ax.set_ylabel("recall (pooled)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{dataset}: per-class recall", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def _curves(histories: dict[str, list[dict]], out: Path) -> Path:
    terms = [t for t in CURVES if any(t in r for h in histories.values() for r in h)]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3.0), squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(histories)}  # one colour per run in every panel
    for ax, term in zip(axes[0], terms):
        for name, history in histories.items():
            points = [(r["epoch"], r[term]) for r in history if term in r]
            if points:
                ax.plot(*zip(*points), label=name, lw=1.2, color=colours[name])
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in colours.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, out, layout=False)


def _latency(latencies: dict[str, tuple[float, float]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(latencies)))
    names = list(latencies)
    enc = [latencies[n][0] for n in names]
    llm = [latencies[n][1] for n in names]
    ax.barh(names, enc, label="audio encoder")
    ax.barh(names, llm, left=enc, label="LLM (label scoring)")
    ax.set_xlabel("ms per clip (evaluate stage, same machine)")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    return _save(fig, out)


def _confidence_figure(stats: pd.DataFrame, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for split, group in stats.groupby("split"):
        axes[0].hist(group["confidence"], bins=20, range=(0, 1), alpha=0.6, label=split)
        axes[1].hist(group["effective_steps"] / group["n_audio"], bins=20, range=(0, 1), alpha=0.6, label=split)
    axes[0].set_title(f"teacher's p(true label) on cached clips (T = {stats['temperature'].iloc[0]:g})", fontsize=8)
    axes[1].set_title("effective audio steps 1/sum(w^2), as a share of T", fontsize=8)
    axes[0].legend(fontsize=7)
    return _save(fig, out)


def _attention_figure(examples: list[dict], out: Path) -> Path:
    fig, axes = plt.subplots(len(examples), 1, figsize=(7, 1.6 * len(examples)), squeeze=False)
    for ax, ex in zip(axes[:, 0], examples):
        wave, rate = sf.read(ex["audio_path"], dtype="float32")
        t = np.arange(len(wave)) / rate
        ax.plot(t, wave / max(np.abs(wave).max(), 1e-9), color="0.6", lw=0.5)
        w = np.asarray(ex["weights"])
        steps = (np.arange(len(w)) + 0.5) * 0.04  # one audio step = 40 ms
        twin = ax.twinx()
        twin.plot(steps, w, color="C3", lw=1.5)
        twin.set_ylim(0, w.max() * 1.1)
        twin.set_yticks([])
        ax.set_yticks([])
        ax.set_title(f"{ex['id']} ({ex['label']}): teacher attention over the audio (red)", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    return _save(fig, out)


def _cache_stats(params: Params, layout: Layout, dataset: str, fold: int, labels: tuple[str, ...]) -> pd.DataFrame:
    """Per cached clip: the teacher's (tempered) probability of the true answer's first token, and the
    effective number of audio steps of its attention weights (read through the cache's reader)."""
    from transformers import AutoProcessor

    teacher = layout.teacher(dataset, fold)
    prompt = PromptLayout.from_processor(AutoProcessor.from_pretrained(teacher), labels)
    cache = TeacherCache(layout.cache(dataset, fold), expected_meta(teacher, prompt, params), prompt)
    k = cache.meta.cache["top_k"]
    rows = cache.table(["label", "split", "input_ids", "topk_ids", "topk_logprobs", "effective_steps", "n_audio"])
    confidence = []
    for r in rows.itertuples():
        start = len(r.input_ids) - len(prompt.answer_ids(r.label))  # the answer closes the sequence
        ids = np.asarray(r.topk_ids).reshape(-1, k)[start - 1]
        lps = np.asarray(r.topk_logprobs).reshape(-1, k)[start - 1]
        hit = ids == r.input_ids[start]
        confidence.append(float(np.exp(lps[hit][0])) if hit.any() else 0.0)
    rows["confidence"] = confidence
    rows["temperature"] = cache.meta.cache["temperature"]
    rows["fold"] = fold
    return rows


# pragma: no mutate end
def _last(history: list[dict], key: str) -> float:
    values = [r[key] for r in history if key in r]
    return values[-1] if values else float("nan")


def _first(history: list[dict], key: str) -> float:
    values = [r[key] for r in history if key in r]
    return values[0] if values else float("nan")


def _mean(values) -> float:
    """Mean of the values that exist (nan when none does, e.g. a term the method lacks)."""
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def diagnostics(histories: dict[str, list[list[dict]]], attention_share: float, confidence: float
                ) -> tuple[list[list[object]], list[str]]:
    """Per student method (means over its runs): the size of each term and of its gradient beside CE's,
    before training and at the end, and CKA at initialisation and at the end; plus one plain sentence
    for every mechanism that is inert."""
    rows, notes = [], []
    if attention_share >= UNIFORM:
        notes.append(f"The teacher's attention over the audio is nearly uniform (its effective number of steps is "
                     f"{attention_share:.0%} of T on average): AW-CKA weights every step alike here, so it behaves as "
                     "plain CKA.")
    for method, runs in histories.items():
        mean = lambda f, key: _mean(f(h, key) for h in runs)  # noqa: E731
        ratio = lambda f, key: _mean(f(h, f"grad_{key}") / max(f(h, "grad_ce"), 1e-12) for h in runs)  # noqa: E731
        cka0, cka1 = mean(_first, "probe_cka"), mean(_last, "probe_cka")
        p0, p1 = ratio(_first, "projector"), ratio(_last, "projector")
        k0, k1 = ratio(_first, "kl"), ratio(_last, "kl")
        kl = mean(_last, "kl")
        fmt = lambda x, spec=".3f": "-" if np.isnan(x) else format(x, spec)  # noqa: E731
        rows.append([method, fmt(mean(_last, "ce")), fmt(cka0, ".4f"), fmt(cka1, ".4f"), fmt(kl, ".4f"),
                     f"{fmt(p0, '.2f')} → {fmt(p1, '.2f')}", f"{fmt(k0, '.2f')} → {fmt(k1, '.2f')}"])
        if not np.isnan(cka0) and min(cka0, mean(lambda h, k: _first([r for r in h if r["epoch"] >= 1], k),
                                                  "probe_cka")) >= SATURATED:
            notes.append(f"{method}: CKA is {cka0:.4f} already at initialisation, so 1 - CKA is below "
                         f"{1 - SATURATED:.2f} and the projector term is inert (its gradient is {p0:.1%} of CE's).")
        elif not np.isnan(p1) and max(p0, p1) < FAINT:
            notes.append(f"{method}: the projector term's gradient stays below {FAINT:.0%} of CE's; it barely "
                         "moves the student.")
        if not np.isnan(kl) and (kl < 0.01 or max(k0, k1) < FAINT):
            notes.append(f"{method}: the KL term is near zero by the end ({kl:.4f}; gradient {k1:.1%} of CE's): on "
                         "its own training clips the teacher's targets carry little beyond the label.")
    if confidence >= 0.9:
        notes.append(f"The teacher is confident on the clips it was cached on (p(true label) {confidence:.2f} on "
                     "average): its soft targets are close to the one-hot label there.")
    return rows, notes


# pragma: no mutate start (figures and page assembly: mutation testing covers the numbers; TESTING.md)
def write_report(params: Params, layout: Layout = Layout()) -> Path:
    """Build the report aside, then swap each of its files in (a failed report leaves the previous one;
    anything else in the folder, such as report/study/, is not the stage's and stays)."""
    out = layout.report_root
    tmp = fresh_folder(out)
    _write(params, layout, tmp)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (tmp / name).is_dir():
            replace_folder(tmp / name, out / name)
        else:
            os.replace(tmp / name, out / name)
    shutil.rmtree(tmp)
    return out / "report.md"


def _write(params: Params, layout: Layout, out: Path) -> None:
    pictures = out / "figures"
    pictures.mkdir(parents=True, exist_ok=True)
    folds = list(params.folds)
    md = ["# pldistill report", "",
          "Test-split scores (speaker-independent folds; checkpoints chosen on validation). WA = accuracy "
          "(= micro-F1 for single-label data), UA = mean per-class recall, macro-F1 over the classes present. "
          "Per-model figures are the mean ± sample standard deviation over folds and seeds; pooled UA concatenates "
          "every run's test predictions, with a 95% interval from a speaker-level (cluster) bootstrap: clips of one "
          "speaker are not independent.", ""]
    figures: list[tuple[str, Path]] = []
    curves_rows, versions = [], set()
    for dataset in params.datasets:
        labels = manifest_labels(layout.manifest(dataset))
        test_speakers = read_manifest(layout.manifest(dataset)).groupby("fold")["speaker"].nunique()
        models = {"teacher": _collect(layout, dataset, "teacher", [(f, None, "teacher") for f in folds])}
        for method in params.methods:
            models[method] = _collect(layout, dataset, method,
                                      [(f, s, student_name(method, s)) for f in folds for s in params.seeds])
        references = _references(layout, dataset, folds)
        versions |= {json.dumps(d.get("versions", {}), sort_keys=True) for m in models.values() for d in m.details}
        teacher_params = models["teacher"].details[0]["parameters"]

        md += [f"## {dataset}", "",
               f"Folds {folds}; {len(labels)} classes (chance UA {1 / len(labels):.3f}); test speakers per fold: "
               + ", ".join(f"{f}: {int(test_speakers.get(f, 0))}" for f in folds)
               + f"; seeds {list(params.seeds)} per student method.", ""]
        rows = [_summary_row(m, labels, params.seed, teacher_params) for m in models.values()]
        rows += [[r.name, "-", "-", *_summary_row(r, labels, params.seed, None)[3:]] for r in references.values()]
        md += table(rows, ["model", "parameters", "compression", "WA", "UA", "macro-F1", "pooled UA [95% CI]", "runs",
                           "unmatched"])
        md += ["", "The reference rows expose shortcuts in the data: a model no better than them has learned no more "
                   "than clip length or coarse prosody.", ""]
        if dataset in PAPER_HEADLINES:
            metric, value = PAPER_HEADLINES[dataset]
            ours = np.mean([d[metric.lower()] for d in models[params.methods[-1]].details]) * 100
            md += [f"The paper reports {metric} {value:.2f} for its PL-Distill student on {dataset} (real "
                   f"checkpoints, all folds); this run's {params.methods[-1]} student: {metric} {ours:.2f}.", ""]

        md += ["### UA per fold", ""]
        per_fold = []
        for m in [*models.values(), *references.values()]:
            ua = defaultdict(list)
            for (fold, _, _), d in zip(m.runs, m.details):
                ua[fold].append(d["ua"])
            per_fold.append([m.name, *(_mean_sd(ua[f]) for f in folds)])
        md += table(per_fold, ["model", *(f"fold {f}" for f in folds)]) + [""]

        stats = pd.concat([_cache_stats(params, layout, dataset, f, labels) for f in folds], ignore_index=True)
        md += _comparisons(models, params) + _diagnostics_section(params, layout, dataset, models, stats)

        names = {"teacher": "teacher", **{m: student_name(m, params.seeds[0]) for m in params.methods}}
        recalls = {n: classification_metrics(m.predictions["label"], m.predictions["prediction"], labels)["recall"]
                   for n, m in models.items()}
        latencies = {}
        for n in models:
            timing = [_load(layout.latency(dataset, f, names[n])) for f in folds]
            latencies[n] = (np.mean([t["encoder_ms"] for t in timing]), np.mean([t["llm_ms"] for t in timing]))
        frames = {**{n: m.predictions for n, m in models.items()}, "prosody reference": references["prosody"].predictions}
        figures.append((f"{dataset}: confusion matrices (pooled over folds and seeds)",
                        _confusions(frames, labels, dataset, folds, pictures / f"{dataset}-confusion.png")))
        figures.append((f"{dataset}: per-class recall", _recall_bars(recalls, labels, dataset,
                                                                     pictures / f"{dataset}-recall.png")))
        figures.append((f"{dataset}: inference latency (encoder vs LLM; measured, not reproducible)",
                        _latency(latencies, pictures / f"{dataset}-latency.png")))
        fold = folds[0]
        histories = {"teacher": list(ModelMeta.read(layout.teacher(dataset, fold)).history)}
        for method in params.methods:
            histories[method] = list(ModelMeta.read(layout.student(dataset, fold, names[method])).history)
        for name, history in histories.items():
            curves_rows += [{"run": f"{dataset}/fold{fold}/{name}", **r} for r in history]
        figures.append((f"{dataset} fold {fold}: training curves of each loss term (per-epoch means) and validation UA",
                        _curves(histories, pictures / f"{dataset}-curves.png")))
        figures.append((f"{dataset}: the teacher's confidence and attention spread on the clips it was cached on",
                        _confidence_figure(stats, pictures / f"{dataset}-teacher-cache.png")))
        examples = _load(layout.attention_examples(dataset, fold))["examples"]
        if examples:
            figures.append((f"{dataset} fold {fold}: teacher attention over time on test clips",
                            _attention_figure(examples, pictures / f"{dataset}-attention.png")))
    md += ["## Pictures", ""]
    for caption, path in figures:
        md += [f"### {caption}", "", f"![{caption}]({path.relative_to(out)})", ""]
    md += ["## What made these numbers", "",
           "Runs are seeded and deterministic on one machine: the same versions on the same hardware reproduce "
           "every number bit for bit. Other CPU kernels, GPUs or library versions change the floats, so there the "
           "numbers reproduce only statistically (within the intervals above). Made with:", "",
           *[f"- {', '.join(f'{k} {v}' for k, v in json.loads(v).items())}" for v in sorted(versions)], "",
           "```json",
           json.dumps({"seed": params.seed, "seeds": list(params.seeds), "methods": list(params.methods),
                       "model": params.section("model"), "cache": params.section("cache"),
                       "distill": params.section("distill"), "evaluate": params.section("evaluate")}, indent=2),
           "```", ""]
    pd.DataFrame(curves_rows).to_csv(out / "training_curves.csv", index=False)
    text = "\n".join(md)
    write_text(out / "report.md", text)
    write_text(out / "report.html", render_html(text, out))


def _comparisons(models: dict[str, Runs], params: Params) -> list[str]:
    md = ["### Paired comparison with `ce`", ""]
    if BASELINE not in models:
        return md + [f"No `{BASELINE}` student in `methods`, so no paired comparison.", ""]
    rows, significant = [], []
    for name, runs in models.items():
        if name in ("teacher", BASELINE):
            continue
        r = _paired(runs, models[BASELINE], params.seed)
        verdict = _verdict(r)
        rows.append([name, f"{r['diff']:+.3f}", f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]", f"{r['p']:.3f}",
                     r["n"], r["clusters"], verdict])
        if verdict != "not significant":
            significant.append(f"{name} ({verdict.split('(')[1].rstrip(')')})")
    md += table(rows, ["student", "UA − UA(ce)", "95% CI (speaker bootstrap)", "p (paired sign-flip)", "clip pairs",
                       "speakers", f"at {ALPHA:.0%}"])
    plain = (f"Significant at the {ALPHA:.0%} level against `ce`: {', '.join(significant)}." if significant else
             f"No student differs significantly from `ce` at the {ALPHA:.0%} level: on these clips and speakers the "
             "methods cannot be ordered.")
    return md + ["", plain + " The interval resamples whole test speakers; the p-value swaps the two students' "
                 "predictions clip by clip (a difference counts only if both agree).", ""]


def _diagnostics_section(params: Params, layout: Layout, dataset: str, models: dict[str, Runs],
                         stats: pd.DataFrame) -> list[str]:
    share = float((stats["effective_steps"] / stats["n_audio"]).mean())
    confidence = float(stats["confidence"].mean())
    histories = {m: [list(ModelMeta.read(layout.student(dataset, f, out)).history) for f, _, out in runs.runs]
                 for m, runs in models.items() if m != "teacher"}
    rows, notes = diagnostics(histories, share, confidence)
    md = ["### Are the distillation terms alive?", "",
          f"Teacher, on the clips it was cached on (all folds): attention spread over {share:.0%} of the audio steps "
          f"on average (effective steps 1/sum(w^2) as a share of T; 100% = uniform), p(true label) {confidence:.2f} "
          f"(at temperature {stats['temperature'].iloc[0]:g}). Per student method, on a fixed training batch: the "
          "last epoch's CE, CKA before training and at the end, the last epoch's KL, and each term's gradient norm "
          "as a share of CE's (before → end).", ""]
    md += table(rows, ["method", "CE (end)", "CKA (init)", "CKA (end)", "KL (end)", "projector grad / CE grad",
                       "KL grad / CE grad"])
    md += ["", *(f"- {n}" for n in notes or ["Every term present moves the student: none is inert by these measures."]),
           ""]
    md += ["Protocol: each fold's validation speakers are the next fold's test speakers, taken from its training "
           "side, so every training set is smaller than EmoBox's (which trains on all non-test speakers)"
           + (" ; `refit` then retrains on train + validation for the chosen number of epochs." if params.distill.refit
              else "; `distill.refit` and `train_teacher.refit` retrain on train + validation for the chosen number "
                   "of epochs instead.") + "", ""]
    return md


def render_html(markdown: str, folder: Path) -> str:
    """The Markdown rendered by markdown-it-py (CommonMark + GFM tables) into one self-contained page:
    every image inlined as a data URI, so it opens offline."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        data = base64.b64encode((folder / html.unescape(match.group(1))).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
             "td:not(:first-child){text-align:right}img{max-width:100%;display:block;margin:8px 0}"
             "pre{background:#f5f5f5;padding:8px;font-size:12px;white-space:pre-wrap}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>pldistill report</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
# pragma: no mutate end

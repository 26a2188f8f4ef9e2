"""report: the comparison across methods, datasets and folds, as Markdown and as a self-contained HTML
page (rendered with markdown-it-py, images embedded), with the statistics that can decide, the
diagnostics that say whether each distillation term was alive, and the pictures people look at."""

from __future__ import annotations

import base64
import dataclasses
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
from .datasets import CORPORA, UNKNOWN
from .errors import PldistillError
from .families import family_of
from .files import atomic_path, fresh_folder, replace_folder, write_text
from .layout import REPORT_FILES, Layout, student_name
from .manifest import manifest_labels, read_manifest
from .methods import METHODS
from .metrics import classification_metrics, cluster_bootstrap_ua, confusion, holm, smallest_p, speaker_paired_test
from .models import StudentMeta, TeacherMeta

CURVES = ("loss", "ce", "cka", "mse", "kl", "validation_ua")  # the per-epoch terms drawn
BASELINE = "ce"  # every other method is compared with this one, speaker by speaker
KEY_CONTRAST = ("pl-distill", "kd")  # the paper's key contrast, compared too where both are trained
ALPHA = 0.05  # on Holm-adjusted p-values: the chance of any false "significant" in a table
PREDICTION_COLUMNS = ("dataset", "model", "fold", "seed", "id", "speaker", "label", "prediction")
UNIFORM = 0.95  # attention whose effective steps exceed this share of T is (nearly) uniform
SATURATED = 0.99  # CKA at or above this leaves 1 - CKA no room to teach
FAINT = 0.05  # a term whose gradient is below this share of CE's barely moves the student
CHANCE_MARGIN = 0.05  # a model whose UA is within this of chance (1 / classes) has learned nothing usable
CONFUSION_COLUMNS = 3  # confusion matrices per row of the figure, at most
PAGE_INCHES = 10.8  # the HTML page's width (1100 px) at the figures' 100 dpi, less a margin
MIN_SPEAKERS = 3  # below this many test speakers a speaker-level interval or test is meaningless


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
            _mean_sd([x["macro_f1"] for x in d]), f"{pooled['ua']:.3f} {interval(lo, hi, p['speaker'].nunique())}",
            len(d), pooled["unmatched"]]


def main_table(models: dict[str, Runs], references: dict[str, Runs], labels, seed: int,
               teacher_params: int | None) -> list[str]:
    """The main table: a `_summary_row` per model, then per reference (which has no size)."""
    rows = [_summary_row(m, labels, seed, teacher_params) for m in models.values()]
    rows += [[r.name, "-", "-", *_summary_row(r, labels, seed, None)[3:]] for r in references.values()]
    return table(rows, ["model", "parameters", "compression", "WA", "UA", "macro-F1", "pooled UA [95% CI]", "runs",
                        "unmatched"])


def seed_averaged(runs: Runs) -> pd.DataFrame:
    """Per test clip (fold, id): its speaker, its label and `correct`, the share of the model's runs on
    that fold (its seeds) that got it right: seeds are repeated measures of a clip, not more clips."""
    p = runs.predictions
    return (p.assign(correct=(p["prediction"] == p["label"]).astype(float))
            .groupby(["fold", "id", "speaker", "label"], as_index=False)["correct"].mean())


def _paired(a: Runs, b: Runs, seed: int) -> dict:
    """a against b on the same test clips, seeds averaged within each clip, tested over speakers
    (`speaker_paired_test`); `clips` counts the clips both were tested on."""
    both = seed_averaged(a).merge(seed_averaged(b), on=["fold", "id", "speaker", "label"], suffixes=("_a", "_b"))
    result = speaker_paired_test(both["label"], both["correct_a"], both["correct_b"], both["speaker"], seed=seed,
                                 alpha=ALPHA)
    return {**result, "clips": len(both)}


def comparison_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """Every other student against BASELINE, then KEY_CONTRAST, each where both of its sides were trained."""
    pairs = [(m, BASELINE) for m in methods if m != BASELINE] if BASELINE in methods else []
    return pairs + [KEY_CONTRAST] * set(KEY_CONTRAST).issubset(methods)


def compare(models: dict[str, Runs], seed: int) -> list[tuple[str, str, dict]]:
    """The paired results of `comparison_pairs` over the students, each with `p_holm`: its p adjusted by
    Holm's step-down correction across all of them (the family is the dataset's table)."""
    found = [(a, b, _paired(models[a], models[b], seed))
             for a, b in comparison_pairs([m for m in models if m != "teacher"])]
    for (_, _, result), adjusted in zip(found, holm([r["p"] for _, _, r in found])):
        result["p_holm"] = adjusted
    return found


def _verdict(result: dict) -> str:
    """Significant when the Holm-adjusted p is at most ALPHA; the sign of the difference says which way."""
    if result["p_holm"] <= ALPHA:
        return "significant (better)" if result["diff"] > 0 else "significant (worse)"
    return "not significant"


def speakers_needed(comparisons: int) -> int:
    """The fewest speakers with which the exact sign-flip test can reach p_holm <= ALPHA over this many
    comparisons at all: the smallest p, 2 / 2^n, times the number of comparisons (Holm's first step)."""
    n = 1
    while comparisons * smallest_p(n) > ALPHA:
        n += 1
    return n


def detectable_cell(result: dict) -> str:
    """The smallest detectable difference, or `none` where even the most extreme data could not reach
    p <= ALPHA (too few speakers for the exact sign-flip test: no difference is detectable at all)."""
    if result["min_p"] > ALPHA:
        return f"none ({result['speakers']} speaker{'s' * (result['speakers'] != 1)})"
    return _fmt(result["detectable"])


def comparison_notes(found: list[tuple[str, str, dict]]) -> list[str]:
    """The plain sentences under the table: which differences are significant, the smallest difference
    the design could detect and whether any could be significant at all, and how the numbers were made."""
    m, n = len(found), min(r["speakers"] for _, _, r in found)
    significant = [f"{a} − {b} ({a} {'better' if r['diff'] > 0 else 'worse'})" for a, b, r in found
                   if _verdict(r) != "not significant"]
    family = f"after Holm's correction over the {m} comparisons" if m > 1 else "(one comparison: nothing to correct)"
    notes = [f"Significant at {ALPHA:.0%} {family}: {', '.join(significant)}." if significant else
             f"No difference is significant at {ALPHA:.0%} {family}: on these test speakers the methods cannot be "
             "ordered."]
    detectable = sorted((r["detectable"], f"{a} − {b}") for a, b, r in found
                        if r["min_p"] <= ALPHA and not np.isnan(r["detectable"]))
    if detectable:
        span = (f"{detectable[0][0]:.3f}" if len(detectable) == 1 else
                f"{detectable[0][0]:.3f} ({detectable[0][1]}) to {detectable[-1][0]:.3f} ({detectable[-1][1]})")
        over = f" over {n} speakers" if len({r["speakers"] for _, _, r in found}) == 1 else ""
        notes.append(f"The smallest UA difference this design could detect, with 80% power at {ALPHA:.0%} "
                     f"(two-sided, before the correction), from the spread of the per-speaker differences{over}: "
                     f"{span} (the paired t approximation (t(0.975, n−1) + t(0.8, n−1)) × sd / √n).")
    least = smallest_p(n)
    if least > ALPHA:
        notes.append(f"With {n} test speakers the smallest p the exact sign-flip test can give is 2/2^{n} = "
                     f"{least:.3f}: no difference can be significant at {ALPHA:.0%} here, whatever the data. That "
                     f"takes at least {speakers_needed(1)} speakers ({speakers_needed(m)} for {m} comparisons "
                     "after Holm's correction).")
    elif m * least > ALPHA:
        notes.append(f"With {n} test speakers the smallest p the exact sign-flip test can give is 2/2^{n} = "
                     f"{least:.3f}, and Holm's correction multiplies the smallest by {m}: no difference can be "
                     f"significant at {ALPHA:.0%} here, whatever the data. That takes at least {speakers_needed(m)} "
                     "speakers.")
    notes.append("How: each clip's correctness is averaged over each model's seeds (the share of its seeds that got "
                 "it right: seeds repeat a clip, they are not more clips); per test speaker, the UA of those shares; "
                 "the difference is the mean over speakers of UA(a) − UA(b) (with every class equally often for "
                 "every speaker, and as many speakers in every fold, it equals the difference of the table's mean "
                 "UA). p flips the sign of each speaker's difference at random: exact over all 2^n sign patterns up "
                 "to 16 speakers, 20,000 random patterns above; Holm's step-down correction across this table "
                 "decides. The interval resamples whole speakers; from a few speakers a percentile bootstrap is too "
                 "narrow, so it shows the size of a difference and the test gives the verdict. Speakers of one fold "
                 "share its trained models, so their differences are not fully independent: read p as approximate.")
    return notes


def predictions_table(dataset: str, models: list[Runs]) -> pd.DataFrame:
    """Every run's per-clip test predictions in the columns that recompute the report's tables and tests
    (report/predictions.csv): one row per model, fold, seed and clip, in the report's model order, then
    fold, seed and clip id; the teacher and the references have no seed."""
    frames = [m.predictions.assign(dataset=dataset, model=m.name).sort_values(["fold", "seed", "id"], kind="stable")
              for m in models]
    frame = pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)]
    return frame.astype({"fold": int, "seed": "Int64"})


# pragma: no mutate start (figures and page assembly: mutation testing covers the numbers; TESTING.md)
def _confusions(predictions: dict[str, pd.DataFrame], labels, dataset: str, folds, out: Path) -> Path:
    return _save(confusion_figure(predictions, labels, dataset, folds), out, layout=False)


def confusion_figure(predictions: dict[str, pd.DataFrame], labels, dataset: str, folds):
    """One confusion matrix per model, at most three to a row, each large enough that its counts read
    at the page's width (constrained layout keeps every axis label inside the figure)."""
    n, size = len(predictions), max(3.0, 0.3 * len(labels) + 1.2)  # inches per panel: 0.3 in (30 px) a cell
    cols = max(1, min(n, CONFUSION_COLUMNS, int(PAGE_INCHES // size)))  # never wider than the page: not scaled down
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.4), squeeze=False, layout="constrained")
    for k, (ax, (title, pred)) in enumerate(zip(axes.flat, predictions.items())):
        cm = confusion(pred["label"], pred["prediction"], labels)
        rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=9,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
        ax.set_yticks(range(len(labels)), labels, fontsize=9)
        ax.set_xlabel("predicted", fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("true", fontsize=10)
        ax.set_title(title, fontsize=11)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{dataset}: test-split confusion pooled over folds {list(folds)} (counts; colour = row recall)",
                 fontsize=11)
    return fig


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
    cols = min(len(terms), 3)  # 3.2 in each: never wider than the page
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.4), squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(histories)}  # one colour per run in every panel
    for ax in list(axes.flat)[len(terms):]:
        ax.set_visible(False)
    for ax, term in zip(axes.flat, terms):
        for name, history in histories.items():
            points = [(r["epoch"], r[term]) for r in history if term in r]
            if points:
                ax.plot(*zip(*points), label=name, lw=1.2, color=colours[name])
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in colours.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _save(fig, out, layout=False)


def _latency(timings: dict[str, tuple[list[float], list[float]]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.45 * len(timings)))
    names = list(timings)
    enc = [float(np.median(timings[n][0])) for n in names]
    llm = [float(np.median(timings[n][1])) for n in names]
    totals = [np.add(*timings[n]) for n in names]
    ax.barh(names, enc, label="audio encoder")
    ax.barh(names, llm, left=enc, label="LLM (label scoring)")
    middle = np.add(enc, llm)
    limit = 2.5 * middle.max()  # a busy machine's one slow repeat must not squash every bar
    slowest = np.array([t.max() for t in totals])
    ax.errorbar(middle, names, xerr=[middle - [t.min() for t in totals], np.minimum(slowest, limit) - middle],
                fmt="none", ecolor="black", capsize=3, lw=1, label="fastest to slowest repeat")
    for name, value in zip(names, slowest):
        if value > limit:
            ax.annotate(f"slowest {value:.3g} ms →", (limit, name), ha="right", va="bottom", fontsize=7)
    ax.set_xlim(0, limit * 1.02)
    ax.set_xlabel("ms per clip (evaluate stage, same machine; median of repeats)")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    return _save(fig, out)


def _confidence_figure(stats: pd.DataFrame, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for split, group in stats.groupby("split"):
        axes[0].hist(group["p_true"], bins=20, range=(0, 1), alpha=0.6, label=split)
        axes[1].hist(group["effective_steps"] / group["n_audio"], bins=20, range=(0, 1), alpha=0.6, label=split)
    axes[0].set_title("teacher's p(true label) among the labels (T = 1), cached clips", fontsize=8)
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
    """Per cached clip (read through the cache's reader): the teacher's answer as `answer_stats` reads it
    from the cached log-probabilities, the effective number of audio steps of its attention weights, and
    the clip's KL positions (every position before the last) and answer positions."""
    from transformers import AutoProcessor

    teacher = layout.teacher(dataset, fold)
    processor = AutoProcessor.from_pretrained(teacher)
    prompt = family_of(processor, "processor").prompt(processor, labels)
    cache = TeacherCache(layout.cache(dataset, fold), expected_meta(teacher, prompt, params), prompt)
    k, temperature = cache.meta.cache.top_k, cache.meta.cache.temperature
    rows = cache.table(["label", "split", "input_ids", "topk_ids", "topk_logprobs", "effective_steps", "n_audio"])
    found = []
    for r in rows.itertuples():
        answer = prompt.answer_ids(r.label)
        at = len(r.input_ids) - len(answer) - 1  # the position that predicts the answer's first token
        found.append({**answer_stats(np.asarray(r.topk_ids).reshape(-1, k)[at],
                                     np.asarray(r.topk_logprobs).reshape(-1, k)[at], answer[0],
                                     [a[0] for a in prompt.answers], temperature),
                      "kl_positions": len(r.input_ids) - 1, "answer_positions": len(answer)})
    rows = pd.concat([rows, pd.DataFrame(found, index=rows.index)], axis=1)
    rows["temperature"] = temperature
    rows["fold"] = fold
    return rows


# pragma: no mutate end
def answer_stats(ids: np.ndarray, logprobs: np.ndarray, true_first: int, label_firsts: list[int],
                 temperature: float) -> dict[str, float]:
    """The teacher's cached top-k (`ids`, log-probabilities at `temperature`) where it predicts the answer's
    first token, read three ways:
    - `p_true`: the probability of the true label among the labels at temperature 1. Log-probabilities
      times T are the logits up to a per-position constant, which cancels when they are renormalised
      among the labels' first tokens (labels sharing a first token count once);
    - `soft_target`: the tempered probability of the true first token over the whole vocabulary (what
      the KL's target gives it); 0 when it is outside the top-k;
    - `off_labels`: the tempered mass on tokens that begin no label.
    A label's first token outside the top-k gets the smallest cached log-probability, the most it can
    have (so p_true, and the mass on labels, are then upper bounds for it)."""
    cached = dict(zip(ids.tolist(), logprobs.tolist()))
    firsts = sorted(set(label_firsts))
    lp = np.array([cached.get(t, float(logprobs.min())) for t in firsts])
    at_one = np.exp(temperature * (lp - lp.max()))
    return {"p_true": float(at_one[firsts.index(true_first)] / at_one.sum()),
            "soft_target": float(np.exp(cached[true_first])) if true_first in cached else 0.0,
            "off_labels": max(0.0, 1.0 - float(np.exp(lp).sum()))}


def held_out_p_true(predictions: pd.DataFrame, labels) -> float:
    """Mean probability of the true label among the labels at temperature 1 on the test clips, from the
    rank scores evaluate writes (`logp_<label>`: summed log-probabilities of each label's answer tokens);
    nan when evaluate generated answers instead."""
    columns = [f"logp_{label}" for label in labels]
    if not set(columns) <= set(predictions.columns):
        return float("nan")
    scores = predictions[columns].to_numpy(dtype=float)
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    truth = predictions["label"].map({label: j for j, label in enumerate(labels)}).to_numpy()
    return float(np.mean(p[np.arange(len(p)), truth]))


def trained_share(stats: pd.DataFrame, method: str, teacher_mode: str) -> float:
    """The share of a method's KL positions where the teacher was trained: a full-mode teacher (a
    preset trained by pldistill) learned the answer tokens only; a lora or zero-shot teacher is a
    pretrained LM, trained at every position. nan for a method without a KL term."""
    kind = METHODS[method].kl if method in METHODS else None
    if kind is None:
        return float("nan")
    if kind == "answer" or teacher_mode != "full":
        return 1.0
    return float(stats["answer_positions"].sum() / stats["kl_positions"].sum())


def _at(history: list[dict], epoch: int, key: str) -> float:
    """The value of `key` recorded for `epoch` (nan where it was not recorded)."""
    return next((float(r[key]) for r in history if r["epoch"] == epoch and key in r), float("nan"))


def evaluated_epoch(history: list[dict], best_epoch: int | None) -> int:
    """The epoch whose weights were kept and evaluated: the selected (best) one; the last one recorded
    when there was no selection (no validation)."""
    epochs = [r["epoch"] for r in history]
    return best_epoch if best_epoch in epochs and best_epoch >= 1 else max(epochs, default=0)


def _mean(values) -> float:
    """Mean of the values that exist (nan when none does, e.g. a term the method lacks)."""
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if np.isnan(x) else format(x, spec)


def _inert_reasons(name: str, cka: dict[str, float], share: dict[str, float]) -> list[str]:
    """Why a term is inert at the judged moments (after the first epoch, at the evaluated epoch): CKA
    at or above SATURATED leaves 1 - CKA nothing to teach; a weighted gradient below FAINT of CE's
    barely moves the student."""
    reasons = [f"CKA is {value:.4f} {when} (at or above {SATURATED}: 1 - CKA leaves it nothing to teach)"
               for when, value in cka.items() if value >= SATURATED]
    reasons += [f"its gradient is {value:.1%} of CE's {when} (below {FAINT:.0%})"
                for when, value in share.items() if value < FAINT]
    return [f"{name} is inert: " + "; ".join(reasons) + "."] if reasons else []


def diagnostics(runs: dict[str, list[tuple[list[dict], int | None]]], attention_share: float,
                soft_target: float = float("nan")) -> tuple[list[list[object]], list[str], list[str]]:
    """Per student method (means over its runs, each a (history, best epoch)): the size of each term and
    of its weighted gradient beside CE's, before training, after the first epoch and at the evaluated
    (selected) epoch; CKA at the same three moments. A term is judged after the first epoch and at the
    evaluated epoch, never by its best moment: it is inert if either shows CKA >= SATURATED or a
    gradient share below FAINT (a term that dies after epoch 1 is inert, whatever it did at the start).
    Returns the table rows, one plain sentence for every inert mechanism, and the inert terms by name."""
    rows, notes, inert = [], [], []
    if attention_share >= UNIFORM:
        notes.append(f"The teacher's attention over the audio is nearly uniform (its effective number of steps is "
                     f"{attention_share:.0%} of T on average): AW-CKA weights every step alike here, so it behaves as "
                     "plain CKA.")
    for method, histories in runs.items():
        chosen = [evaluated_epoch(h, best) for h, best in histories]
        moments = {"before training": [0] * len(histories), "after the first epoch": [1] * len(histories),
                   "at the evaluated epoch": chosen}

        def value(key: str, when: str) -> float:
            return _mean(_at(h, e, key) for (h, _), e in zip(histories, moments[when]))

        def share(term: str, when: str) -> float:
            return _mean(_at(h, e, f"grad_{term}") / max(_at(h, e, "grad_ce"), 1e-12)
                         for (h, _), e in zip(histories, moments[when]))

        judged = ("after the first epoch", "at the evaluated epoch")
        cka = {w: value("probe_cka", w) for w in moments}
        projector, kl_share = ({w: share(term, w) for w in moments} for term in ("projector", "kl"))
        kl = value("kl", "at the evaluated epoch")
        arrow = lambda d, spec=".2f": " → ".join(_fmt(v, spec) for v in d.values())  # noqa: E731
        rows.append([method, ", ".join(map(str, sorted(set(chosen)))), _fmt(value("ce", "at the evaluated epoch")),
                     arrow(cka, ".4f"), _fmt(kl, ".4f"), arrow(projector), arrow(kl_share)])
        found = _inert_reasons(f"{method}: the projector term", {w: cka[w] for w in judged},
                               {w: projector[w] for w in judged})  # nan (no such term) is never inert
        if not np.isnan(kl) and kl < 0.01:
            found_kl = [f"{method}: the KL term is inert: it is near zero at the evaluated epoch ({kl:.4f}; gradient "
                        f"{kl_share['at the evaluated epoch']:.1%} of CE's): on its own training clips the teacher's "
                        "targets carry little beyond the label."]
        else:
            found_kl = _inert_reasons(f"{method}: the KL term", {}, {w: kl_share[w] for w in judged})
        notes += found + found_kl
        inert += [f"{method}'s projector term"] * bool(found) + [f"{method}'s KL term"] * bool(found_kl)
    if soft_target >= 0.9:
        notes.append(f"The teacher is confident on the clips it was cached on (its soft target gives the true answer's "
                     f"first token {soft_target:.2f} on average): its soft targets are close to the one-hot label there.")
    return rows, notes, inert


def repeated_timings(records: list[dict]) -> tuple[list[float], list[float]]:
    """Every repeated timing of one model over its folds' latency records, as (encoder ms, LLM ms) per
    repeat; a record without repeats (an older evaluate) counts as one timing."""
    repeats = [r for record in records for r in record.get("repeats", [record])]
    return [r["encoder_ms"] for r in repeats], [r["llm_ms"] for r in repeats]


def split_facts(manifest: pd.DataFrame, folds: list[int]) -> tuple[dict[int, int], int, int]:
    """From the manifest: the test speakers of each fold, the clips marked `speaker_independent: false`
    (validation, or test, carved without speaker information) and the clips whose speaker is unknown."""
    speakers = manifest.groupby("fold")["speaker"].nunique()
    return ({f: int(speakers.get(f, 0)) for f in folds}, int((~manifest["speaker_independent"]).sum()),
            int((manifest["speaker"] == UNKNOWN).sum()))


def sanity_box(chance: float, models: dict[str, float], references: dict[str, float], test_speakers: dict[int, int],
               not_independent: int, unknown_speakers: int, inert: list[str]) -> list[str]:
    """The box that opens a dataset's section: one sentence for each reason its numbers could mislead
    (models at chance, a shortcut reference beating every model, fewer than MIN_SPEAKERS test speakers,
    folds that are not speaker-independent, an inert distillation term), or one line saying none applies.
    `models` and `references` map names to mean UA; `not_independent` and `unknown_speakers` count clips."""
    warnings = []
    at_chance = [n for n, ua in models.items() if ua <= chance + CHANCE_MARGIN]
    if at_chance:
        warnings.append(f"**At chance**: {', '.join(f'{n} (UA {models[n]:.3f})' for n in at_chance)} "
                        f"{'is' if len(at_chance) == 1 else 'are'} within {CHANCE_MARGIN:.2f} of chance "
                        f"({chance:.3f}): {'it has' if len(at_chance) == 1 else 'they have'} learned nothing usable, "
                        "so no comparison involving them means anything.")
    if references and models:
        shortcut, best = max(references, key=references.get), max(models, key=models.get)
        if references[shortcut] >= models[best]:
            warnings.append(f"**A shortcut wins**: the {shortcut} reference (UA {references[shortcut]:.3f}) scores at "
                            f"least as well as every model (best: {best}, {models[best]:.3f}): the models have learned "
                            f"no more than the {shortcut} reference's shortcut.")
    few = {f: n for f, n in test_speakers.items() if n < MIN_SPEAKERS}
    if few:
        warnings.append(f"**Too few test speakers**: fold{'s' if len(few) > 1 else ''} "
                        + ", ".join(f"{f} ({n})" for f, n in few.items())
                        + f" test{'s' if len(few) == 1 else ''} fewer than {MIN_SPEAKERS} speakers: speaker-level "
                        "intervals and tests from so few speakers are meaningless (the cells say so instead of "
                        "giving one), and a difference between models may be one speaker's.")
    if not_independent or unknown_speakers:
        why = (f"{unknown_speakers} clips have no known speaker" if unknown_speakers else
               f"the manifest marks {not_independent} clips `speaker_independent: false`")
        warnings.append(f"**Folds not speaker-independent**: {why}, so a speaker's clips can be on both sides of a "
                        "split and these scores can be optimistic. Give preprocess the speakers "
                        "(`--speaker-pattern REGEX`, or a `speaker` column in the CSV).")
    if inert:
        warnings.append(f"**Inert distillation term{'s' if len(inert) > 1 else ''}**: {', '.join(inert)} "
                        "(see *Are the distillation terms alive?*): these students were not distilled the way their "
                        "method's name says.")
    if not warnings:
        return ["> **Sanity checks**: every model is above chance and above every shortcut reference; every fold "
                f"tests at least {MIN_SPEAKERS} speakers; the folds are speaker-independent; no distillation term is "
                "inert.", ""]
    return ["> **Read this first**", ">", *(f"> - {w}" for w in warnings), ""]


def interval(lo: float, hi: float, speakers: int, spec: str = ".3f") -> str:
    """A speaker-bootstrap interval cell, or why there is none (fewer than MIN_SPEAKERS speakers)."""
    if speakers < MIN_SPEAKERS:
        return f"n/a ({speakers} speaker{'s' if speakers != 1 else ''})"
    return f"[{lo:{spec}}, {hi:{spec}}]"


def latency_notes(latencies: dict[str, list[float]]) -> list[str]:
    """Whether the latency chart can be read: per model, the total ms per clip of each repeated
    measurement. Noisy when two models' medians differ by less than the larger of their spreads
    (max - min over repeats), or a model's spread exceeds half its median; one measurement has no
    known noise."""
    if any(len(v) < 2 for v in latencies.values()):
        return ["Each model was timed once: the noise of these times is unknown, so read them as orders of magnitude."]
    median = {n: float(np.median(v)) for n, v in latencies.items()}
    spread = {n: float(np.max(v) - np.min(v)) for n, v in latencies.items()}
    names = list(latencies)
    tied = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if abs(median[a] - median[b]) <= max(spread[a], spread[b])]
    wide = [n for n in names if spread[n] > 0.5 * median[n]]
    notes = []
    if tied:
        notes.append("Latency is noisy: the repeats spread as wide as the difference between "
                     + ", ".join(f"{a} and {b}" for a, b in tied)
                     + f" ({', '.join(f'{n} {median[n]:.2f} ms, spread {spread[n]:.2f}' for n in names)}): "
                       "the chart does not order them.")
    if wide:
        notes.append(f"The repeated timings of {', '.join(wide)} vary by more than half their median: the machine "
                     "was busy; re-run evaluate on an idle machine to compare speeds.")
    return notes


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
          "Test-split scores (checkpoints chosen on validation). WA = accuracy "
          "(= micro-F1 for single-label data), UA = mean per-class recall, macro-F1 over the classes present. "
          "Per-model figures are the mean ± sample standard deviation over folds and seeds; pooled UA concatenates "
          "every run's test predictions, with a 95% interval from a speaker-level (cluster) bootstrap: clips of one "
          f"speaker are not independent (with fewer than {MIN_SPEAKERS} speakers there is no interval).", ""]
    figures: list[tuple[str, Path, list[str]]] = []
    curves_rows, versions, predictions = [], set(), []
    for dataset in params.datasets:
        labels = manifest_labels(layout.manifest(dataset))
        speakers, not_independent, unknown = split_facts(read_manifest(layout.manifest(dataset)), folds)
        models = {"teacher": _collect(layout, dataset, "teacher", [(f, None, "teacher") for f in folds])}
        for method in params.methods:
            models[method] = _collect(layout, dataset, method,
                                      [(f, s, student_name(method, s)) for f in folds for s in params.seeds])
        references = _references(layout, dataset, folds)
        versions |= {json.dumps(d.get("versions", {}), sort_keys=True) for m in models.values() for d in m.details}
        teacher_params = models["teacher"].details[0]["parameters"]
        stats = pd.concat([_cache_stats(params, layout, dataset, f, labels) for f in folds], ignore_index=True)
        diagnosed, inert = _diagnostics_section(params, layout, dataset, models, stats, labels)

        md += [f"## {dataset}", "",
               f"Folds {folds}; {len(labels)} classes (chance UA {1 / len(labels):.3f}); test speakers per fold: "
               + ", ".join(f"{f}: {n}" for f, n in speakers.items())
               + f"; seeds {list(params.seeds)} per student method"
               + (f"; the students' CE saw the labels of {params.distill.label_fraction:.0%} of the training clips "
                  "(the distillation terms read every one)" if params.distill.label_fraction < 1 else "") + "; folds "
               + ("**not** speaker-independent." if not_independent or unknown else "speaker-independent."), ""]
        md += sanity_box(1 / len(labels), {n: _mean([d["ua"] for d in m.details]) for n, m in models.items()},
                         {n.removeprefix("reference: "): _mean([d["ua"] for d in r.details])
                          for n, r in references.items()}, speakers, not_independent, unknown, inert)
        md += main_table(models, references, labels, params.seed, teacher_params)
        md += ["", "The reference rows expose shortcuts in the data: a model no better than them has learned no more "
                   "than clip length or coarse prosody.", ""]
        if dataset in CORPORA and CORPORA[dataset].headline:
            metric, value = CORPORA[dataset].headline
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
        md += _comparisons(models, params) + diagnosed
        predictions.append(predictions_table(dataset, [*models.values(), *references.values()]))

        names = {"teacher": "teacher", **{m: student_name(m, params.seeds[0]) for m in params.methods}}
        recalls = {n: classification_metrics(m.predictions["label"], m.predictions["prediction"], labels)["recall"]
                   for n, m in models.items()}
        timings = {n: repeated_timings([_load(layout.latency(dataset, f, names[n])) for f in folds]) for n in models}
        frames = {**{n: m.predictions for n, m in models.items()}, "prosody reference": references["prosody"].predictions}
        figures.append((f"{dataset}: confusion matrices (pooled over folds and seeds)",
                        _confusions(frames, labels, dataset, folds, pictures / f"{dataset}-confusion.png"), []))
        figures.append((f"{dataset}: per-class recall", _recall_bars(recalls, labels, dataset,
                                                                     pictures / f"{dataset}-recall.png"), []))
        figures.append((f"{dataset}: inference latency (encoder vs LLM; median of repeated timings, error bars from "
                        "the fastest to the slowest; measured, not reproducible)",
                        _latency(timings, pictures / f"{dataset}-latency.png"),
                        latency_notes({n: [e + l for e, l in zip(*t)] for n, t in timings.items()})))
        fold = folds[0]
        histories = {"teacher": list(TeacherMeta.read(layout.teacher(dataset, fold)).history)}
        for method in params.methods:
            histories[method] = list(StudentMeta.read(layout.student(dataset, fold, names[method])).history)
        for name, history in histories.items():
            curves_rows += [{"run": f"{dataset}/fold{fold}/{name}", **r} for r in history]
        figures.append((f"{dataset} fold {fold}: training curves of each loss term (per-epoch means) and validation UA",
                        _curves(histories, pictures / f"{dataset}-curves.png"), []))
        figures.append((f"{dataset}: the teacher's confidence and attention spread on the clips it was cached on",
                        _confidence_figure(stats, pictures / f"{dataset}-teacher-cache.png"), []))
        examples = _load(layout.attention_examples(dataset, fold))["examples"]
        if examples:
            figures.append((f"{dataset} fold {fold}: teacher attention over time on test clips",
                            _attention_figure(examples, pictures / f"{dataset}-attention.png"), []))
    md += cross_corpus_section(params, layout)
    md += ["## Pictures", ""]
    for caption, path, notes in figures:
        md += [f"### {caption}", "", f"![{caption}]({path.relative_to(out)})", "", *(f"{n}\n" for n in notes)]
    md += ["## What made these numbers", "",
           "Runs are seeded and deterministic on one machine: the same versions on the same hardware reproduce "
           "every number bit for bit. Other CPU kernels, GPUs or library versions change the floats, so there the "
           "numbers reproduce only statistically (within the intervals above). Made with:", "",
           *[f"- {', '.join(f'{k} {v}' for k, v in json.loads(v).items())}" for v in sorted(versions)], "",
           "```json",
           json.dumps({"seed": params.seed, "seeds": list(params.seeds), "methods": list(params.methods),
                       "model": params.section("model"), "cache": params.section("cache"),
                       "distill": params.section("distill"), "evaluate": params.section("evaluate"),
                       **({"cross_corpus": [dataclasses.asdict(p) for p in params.cross_corpus]}
                          if params.cross_corpus else {})}, indent=2),
           "```", ""]
    pd.DataFrame(curves_rows).to_csv(out / "training_curves.csv", index=False)
    write_text(out / "predictions.csv", pd.concat(predictions).to_csv(index=False, lineterminator="\n"))
    text = "\n".join(md)
    write_text(out / "report.md", text)
    write_text(out / "report.html", render_html(text, out))


def cross_corpus_section(params: Params, layout: Layout) -> list[str]:
    """A table per cross_corpus pair: each model trained on `train` (teacher, every method), its UA on `train`'s
    own test split beside its UA, WA and macro-F1 on `test`'s (the labels the two share), over folds and seeds."""
    if not params.cross_corpus:
        return []
    md = ["## Cross-corpus", "",
          "Each pair's models, trained on the first corpus, scored on the second's test split of the same fold "
          "(EmoBox's cross-corpus track): only the clips whose label the first corpus has too, answered among those "
          "labels. Mean ± sample sd over folds and seeds.", ""]
    folds = list(params.folds)
    for pair in params.cross_corpus:
        runs = {"teacher": [(f, "teacher") for f in folds],
                **{m: [(f, student_name(m, s)) for f in folds for s in params.seeds] for m in params.methods}}
        rows = []
        for name, outputs in runs.items():
            own = [_load(layout.details(pair.train, f, out)) for f, out in outputs]
            cross = [_load(layout.details(pair.train, f, out, pair.test)) for f, out in outputs]
            rows.append([name, _mean_sd([d["ua"] for d in own]), *(_mean_sd([d[k] for d in cross])
                                                                   for k in ("ua", "wa", "macro_f1")),
                         sum(d["n"] for d in cross), len(cross)])
        shared = cross[0]["labels"]
        renamed = ", ".join(f"{a} → {b}" for a, b in pair.label_map.items())
        md += [f"### {pair.train} → {pair.test}", "",
               f"{len(shared)} shared labels (chance UA {1 / len(shared):.3f}): {', '.join(shared)}"
               + (f"; {pair.test}'s labels renamed: {renamed}" if renamed else "") + ".", ""]
        md += table(rows, ["model", f"UA on {pair.train}", f"UA on {pair.test}", f"WA on {pair.test}",
                           f"macro-F1 on {pair.test}", "clips scored", "runs"]) + [""]
    return md


def _comparisons(models: dict[str, Runs], params: Params) -> list[str]:
    md = ["### Paired comparisons, test speaker by test speaker", ""]
    found = compare(models, params.seed)
    if not found:
        return md + [f"Neither `{BASELINE}` nor both of {' and '.join(f'`{m}`' for m in KEY_CONTRAST)} among the "
                     "students: nothing to compare.", ""]
    rows = [[f"{a} − {b}", f"{round(r['diff'], 3) + 0.0:+.3f}",  # + 0.0: a difference of -1e-17 reads +0.000
             interval(*r["ci95"], r["speakers"], "+.3f"), f"{r['p']:.3f}", f"{r['p_holm']:.3f}", detectable_cell(r),
             r["speakers"], r["clips"], _verdict(r)] for a, b, r in found]
    md += table(rows, ["comparison", "UA difference", "95% CI (speaker bootstrap)", "p (sign-flip over speakers)",
                       "p (Holm)", "detectable (80% power)", "speakers", "clips", f"at {ALPHA:.0%} (Holm)"])
    return md + ["", *(f"{n}\n" for n in comparison_notes(found))]


def _diagnostics_section(params: Params, layout: Layout, dataset: str, models: dict[str, Runs],
                         stats: pd.DataFrame, labels) -> tuple[list[str], list[str]]:
    """The section's Markdown, and the inert terms by name (for the sanity box)."""
    share = float((stats["effective_steps"] / stats["n_audio"]).mean())
    runs = {}
    for m, found in models.items():
        if m != "teacher":
            metas = [StudentMeta.read(layout.student(dataset, f, out)) for f, _, out in found.runs]
            runs[m] = [(list(meta.history), meta.best_epoch) for meta in metas]
    soft = float(stats["soft_target"].mean())
    rows, notes, inert = diagnostics(runs, share, soft)
    temperature = stats["temperature"].iloc[0]
    mode = TeacherMeta.read(layout.teacher(dataset, models["teacher"].runs[0][0])).mode
    trained = {m: trained_share(stats, m, mode) for m in runs}
    trained = {m: v for m, v in trained.items() if not np.isnan(v)}
    md = ["### Are the distillation terms alive?", "",
          f"Teacher (all folds): attention spread over {share:.0%} of the audio steps on the clips it was cached on "
          "(effective steps 1/sum(w^2) as a share of T; 100% = uniform). Its probability of the true label among the "
          f"labels at temperature 1: {_fmt(held_out_p_true(models['teacher'].predictions, labels), '.2f')} on its "
          "held-out test clips (from evaluate's label scores), "
          f"{stats['p_true'].mean():.2f} on the clips it was cached on (the answer's first token: cached "
          "log-probabilities times T, renormalised among the labels' first tokens). At the cache's temperature "
          f"T = {temperature:g}, that token's distribution (the KL's soft target) gives the true one "
          f"{soft:.2f} and tokens that begin no label {stats['off_labels'].mean():.2f}.", ""]
    if trained:
        md += ["KL positions where the teacher was trained: "
               + ", ".join(f"{m} {v:.0%}" for m, v in trained.items())
               + (" (the teacher was trained by pldistill on the answer tokens only: at the other positions its "
                  "targets are outputs it never learned)." if mode == "full" else
                  f" (a {mode} teacher is a pretrained LM: every position carries its pretraining)."), ""]
    md += ["Per student method, on a fixed training batch: the evaluated (selected) epoch, CE there, CKA and each "
           "term's weighted gradient norm as a share of CE's before training → after the first epoch → at the "
           f"evaluated epoch, and the KL there. A term is judged after the first epoch and at the evaluated epoch: "
           f"CKA at or above {SATURATED} or a gradient below {FAINT:.0%} of CE's at either is inert"
           + (" (with refit, the evaluated model is retrained for the selected number of epochs; the numbers are "
              "the validated run's at that epoch)." if params.distill.refit else "."), ""]
    md += table(rows, ["method", "evaluated epoch", "CE", "CKA", "KL", "projector grad / CE grad",
                       "KL grad / CE grad"])
    md += ["", *(f"- {n}" for n in notes or ["Every term present moves the student: none is inert by these measures."]),
           ""]
    md += ["Protocol: each fold's validation speakers are the next fold's test speakers, taken from its training "
           "side, so every training set is smaller than EmoBox's (which trains on all non-test speakers)"
           + (" ; `refit` then retrains on train + validation for the chosen number of epochs." if params.distill.refit
              else "; `distill.refit` and `train_teacher.refit` retrain on train + validation for the chosen number "
                   "of epochs instead.") + "", ""]
    return md, inert


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
             "blockquote{border-left:4px solid #c60;background:#fff6ec;margin:1em 0;padding:4px 12px}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
             "td:not(:first-child){text-align:right}img{max-width:100%;display:block;margin:8px 0}"
             "pre{background:#f5f5f5;padding:8px;font-size:12px;white-space:pre-wrap}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>pldistill report</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
# pragma: no mutate end

"""report: one comparison across methods, datasets and folds, as Markdown and as a self-contained
HTML page (images embedded), with the pictures people look at."""

from __future__ import annotations

import base64
import html
import json
import re
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
from .files import atomic_path, write_text
from .layout import Layout, student_name
from .manifest import manifest_labels
from .metrics import classification_metrics, cluster_bootstrap_ua, confusion
from .models import ModelMeta
from .prompt import PromptLayout


def _load(path: Path) -> dict:
    if not path.exists():
        raise PldistillError(f"{path}: metrics missing; run `pldistill evaluate` for this model first")
    return json.loads(path.read_text())


def _runs(params: Params) -> list[tuple[str, str, int | None]]:
    """(row name, metrics name prefix, seed) of the models compared: the teacher, then each method."""
    return [("teacher", "teacher", None)] + [(f"student: {m}", m, s) for m in params.methods for s in params.seeds]


def _save(fig, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)
    return path


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _pooled(layout: Layout, dataset: str, folds, name: str) -> pd.DataFrame:
    return pd.concat([pd.read_csv(layout.predictions(dataset, f, name)) for f in folds], ignore_index=True)


def _confusions(layout, dataset, folds, labels, names: dict[str, str], out: Path) -> Path:
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), squeeze=False)
    for ax, (title, name) in zip(axes[0], names.items()):
        pred = _pooled(layout, dataset, folds, name)
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
    terms = sorted({k for h in histories.values() for r in h for k in r} - {"epoch"})
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


def _cache_stats(params: Params, layout: Layout, dataset: str, fold: int, labels: tuple[str, ...]) -> pd.DataFrame:
    """Per cached clip: the teacher's (tempered) probability of the true answer's first token, and the
    effective number of audio steps of its attention weights."""
    from transformers import AutoProcessor

    teacher = layout.teacher(dataset, fold)
    prompt = PromptLayout.from_processor(AutoProcessor.from_pretrained(teacher), labels)
    cache = TeacherCache(layout.cache(dataset, fold), expected_meta(teacher, prompt, params), prompt)
    meta = {"cache": cache.meta.cache}
    k = meta["cache"]["top_k"]
    rows = cache.table(["label", "split", "input_ids", "topk_ids", "topk_logprobs", "effective_steps", "n_audio"])
    confidence = []
    for r in rows.itertuples():
        start = len(r.input_ids) - len(prompt.answer_ids(r.label))  # the answer closes the sequence
        ids = np.asarray(r.topk_ids).reshape(-1, k)[start - 1]
        lps = np.asarray(r.topk_logprobs).reshape(-1, k)[start - 1]
        hit = ids == r.input_ids[start]
        confidence.append(float(np.exp(lps[hit][0])) if hit.any() else 0.0)
    rows["confidence"] = confidence
    rows["temperature"] = meta["cache"]["temperature"]
    return rows


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


def _experiment_rows(dataset: str, folds: list[int]) -> list[list[str]]:
    """Students run as DVC experiments (`dvc exp run -S ...`) rather than as a matrix axis here: their
    per-fold metrics, from `dvc exp show`; nothing when this is not a DVC repository."""
    try:
        import dvc.api

        experiments = [r for r in dvc.api.exp_show() if r.get("typ") not in ("workspace", "baseline")]
    except Exception:  # not a DVC repository, or no git history: there are no experiments to add
        return []
    pattern = re.compile(rf"metrics/{re.escape(dataset)}/fold(\d+)/(student-.+)\.json:(wa|ua|macro_f1|parameters)$")
    rows = []
    for exp in experiments:
        found: dict[str, dict[str, list[float]]] = {}
        for key, value in exp.items():
            m = pattern.match(key)
            if m and int(m[1]) in folds and isinstance(value, (int, float)):
                found.setdefault(m[2], {}).setdefault(m[3], []).append(value)
        for name, v in sorted(found.items()):
            if {"wa", "ua", "macro_f1"} <= set(v):
                rows.append([f"{name.removeprefix('student-')} (experiment {exp.get('Experiment') or exp.get('rev')})",
                             f"{int(v['parameters'][0]):,}" if "parameters" in v else "-", "-", _fmt(v["wa"]),
                             _fmt(v["ua"]), _fmt(v["macro_f1"]), "-", "-"])
    return rows


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def write_report(params: Params, layout: Layout = Layout()) -> Path:
    out = layout.report_root
    pictures = out / "figures"
    pictures.mkdir(parents=True, exist_ok=True)
    folds = list(params.folds)
    md = ["# pldistill report", "",
          "Test-split scores of every fold (speaker-independent folds; checkpoints chosen on validation). "
          "WA = accuracy (= micro-F1 for single-label data), UA = mean per-class recall, macro-F1 over the classes "
          "present. Per-run figures are the mean ± std over folds and seeds; pooled figures concatenate the test "
          "predictions of all folds, with a 95% bootstrap interval for UA.", ""]
    figures: list[tuple[str, Path]] = []
    curves_rows = []
    for dataset in params.datasets:
        labels = manifest_labels(layout.manifest(dataset))
        teacher_params = None
        table, names, recalls, latencies = [], {}, {}, {}
        for title, prefix, seed in _runs(params):
            name = prefix if seed is None else student_name(prefix, seed)
            metrics = [_load(layout.details(dataset, f, name)) for f in folds]
            pooled = _pooled(layout, dataset, folds, name)
            pooled_m = classification_metrics(pooled["label"], pooled["prediction"], labels)
            lo, hi = cluster_bootstrap_ua(pooled["label"], pooled["prediction"], pooled["speaker"], seed=params.seed)
            n_params = metrics[0]["parameters"]
            teacher_params = teacher_params or n_params
            label = title if seed is None or len(params.seeds) == 1 else f"{title} (seed {seed})"
            table.append([label, f"{n_params:,}", f"{teacher_params / n_params:.1f}x",
                          _fmt([m["wa"] for m in metrics]), _fmt([m["ua"] for m in metrics]),
                          _fmt([m["macro_f1"] for m in metrics]),
                          f"{pooled_m['ua']:.3f} [{lo:.3f}, {hi:.3f}]", str(pooled_m["unmatched"])])
            if seed in (None, params.seeds[0]):
                names[title.replace("student: ", "")] = name
                recalls[title.replace("student: ", "")] = pooled_m["recall"]
                timing = [_load(layout.latency(dataset, f, name)) for f in folds]
                latencies[title.replace("student: ", "")] = (np.mean([t["encoder_ms"] for t in timing]),
                                                             np.mean([t["llm_ms"] for t in timing]))
        table += _experiment_rows(dataset, folds)
        for key in ("duration", "prosody"):
            refs = [_load(layout.details(dataset, f, key)) for f in folds]
            pooled = _pooled(layout, dataset, folds, key)
            pooled_m = classification_metrics(pooled["label"], pooled["prediction"], labels)
            table.append([f"reference: {refs[0]['description']}", "-", "-",
                          _fmt([r["wa"] for r in refs]), _fmt([r["ua"] for r in refs]),
                          _fmt([r["macro_f1"] for r in refs]), f"{pooled_m['ua']:.3f}", "-"])
        md += [f"## {dataset} (folds {folds}; {len(labels)} classes, chance UA {1 / len(labels):.3f})", ""]
        md += _table(table, ["model", "parameters", "compression", "WA", "UA", "macro-F1", "pooled UA [95% CI]",
                             "unmatched"])
        md += ["", "The reference rows expose shortcuts in the data: a model no better than them has learned no "
                   "more than clip length or coarse prosody.", ""]
        names["prosody reference"] = "prosody"
        figures.append((f"{dataset}: confusion matrices", _confusions(layout, dataset, folds, labels, names,
                                                                      pictures / f"{dataset}-confusion.png")))
        figures.append((f"{dataset}: per-class recall", _recall_bars(recalls, labels, dataset,
                                                                     pictures / f"{dataset}-recall.png")))
        figures.append((f"{dataset}: inference latency (encoder vs LLM)",
                        _latency(latencies, pictures / f"{dataset}-latency.png")))
        fold = folds[0]
        histories = {"teacher": list(ModelMeta.read(layout.teacher(dataset, fold)).history)}
        for method in params.methods:
            run = student_name(method, params.seeds[0])
            histories[method] = list(ModelMeta.read(layout.student(dataset, fold, run)).history)
        for name, history in histories.items():
            curves_rows += [{"run": f"{dataset}/fold{fold}/{name}", **r} for r in history]
        figures.append((f"{dataset} fold {fold}: training curves of each loss term (per-epoch means) and validation UA",
                        _curves(histories, pictures / f"{dataset}-curves.png")))
        figures.append((f"{dataset} fold {fold}: the teacher's confidence and attention spread on the clips it was "
                        "cached on", _confidence_figure(_cache_stats(params, layout, dataset, fold, labels),
                                                        pictures / f"{dataset}-teacher-cache.png")))
        examples = _load(layout.attention_examples(dataset, fold))["examples"]
        if examples:
            figures.append((f"{dataset} fold {fold}: teacher attention over time on test clips",
                            _attention_figure(examples, pictures / f"{dataset}-attention.png")))
    md += ["## Pictures", ""]
    for caption, path in figures:
        md += [f"### {caption}", "", f"![{caption}]({path.relative_to(out)})", ""]
    md += ["## What made these numbers", "", "```json",
           json.dumps({"seed": params.seed, "seeds": list(params.seeds), "methods": list(params.methods),
                       "model": params.section("model"), "cache": params.section("cache"),
                       "distill": params.section("distill"), "evaluate": params.section("evaluate")}, indent=2),
           "```", ""]
    pd.DataFrame(curves_rows).to_csv(out / "training_curves.csv", index=False)
    text = "\n".join(md)
    write_text(out / "report.md", text)
    write_text(out / "report.html", _html(text, out))
    return out / "report.md"


def _html(markdown: str, folder: Path) -> str:
    """A small Markdown-to-HTML rendering of the report, with every image inlined as a data URI."""
    body, in_code, table_rows = [], False, []

    def flush_table():
        if table_rows:
            head, *rest = table_rows
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
            table_rows.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table_rows.append(cells)
            continue
        flush_table()
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            data = base64.b64encode((folder / image.group(2)).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
             "td:not(:first-child){text-align:right}img{max-width:100%;display:block;margin:8px 0}"
             "pre{background:#f5f5f5;padding:8px;font-size:12px;white-space:pre-wrap}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>pldistill report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")

"""Anyone can recompute the report from its predictions: `report/predictions.csv` holds every run's per-clip
test predictions, and the code here, written from the report's own description and independent of report.py
and metrics.py, recomputes the main table (UA per model: mean ± sample sd over folds and seeds, pooled UA,
runs, unmatched answers) and the paired comparisons (seeds averaged within a clip, UA per test speaker,
an exact sign-flip test over speakers, Holm's correction, the detectable difference, the verdict) and
checks them against the report's Markdown. On a hand-made study always; on the default report and the
committed study wherever they have their predictions.csv."""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.05
ROUNDED = 0.0005 + 1e-9  # the report prints three decimals


# ------------------------------------------------------------------ the recomputation (no pldistill code)


def ua(labels: list[str], correct: list[float]) -> float:
    """Mean over the classes present of the mean correctness of their clips."""
    by_class = defaultdict(list)
    for label, right in zip(labels, correct):
        by_class[label].append(right)
    return sum(sum(v) / len(v) for v in by_class.values()) / len(by_class)


def main_table(frame: pd.DataFrame) -> dict[str, dict]:
    """Per model: the UA of each run (fold, seed), their mean and sample sd, the pooled UA, runs, unmatched."""
    found = {}
    for model, rows in frame.groupby("model", sort=False):
        right = (rows["prediction"] == rows["label"]).astype(float)
        runs = [ua(list(r["label"]), list(right[r.index])) for _, r in rows.groupby(["fold", "seed"], dropna=False)]
        found[model] = {"ua": float(np.mean(runs)), "sd": float(np.std(runs, ddof=1)) if len(runs) > 1 else None,
                        "pooled": ua(list(rows["label"]), list(right)), "runs": len(runs),
                        "unmatched": int((rows["prediction"] == "<unmatched>").sum())}
    return found


def speaker_differences(frame: pd.DataFrame, a: str, b: str) -> tuple[list[float], int]:
    """Per test speaker, UA(a) - UA(b), each clip's correctness the share of the model's seeds right on it;
    and the number of clips both were tested on."""
    share = {}
    for model in (a, b):
        rows = frame[frame["model"] == model]
        right = (rows["prediction"] == rows["label"]).astype(float)
        share[model] = right.groupby([rows["fold"], rows["id"]]).mean().to_dict()
    clips = frame[frame["model"] == a].drop_duplicates(["fold", "id"]).set_index(["fold", "id"])
    common = [c for c in share[a] if c in share[b]]
    d = []
    for _, group in pd.Series(common).groupby([clips.loc[c, "speaker"] for c in common]):
        labels = [clips.loc[c, "label"] for c in group]
        d.append(ua(labels, [share[a][c] for c in group]) - ua(labels, [share[b][c] for c in group]))
    return d, len(common)


def exact_sign_flip(d: list[float]) -> float:
    """The share of all 2^n sign patterns whose flipped sum is at least as far from 0 as the observed one."""
    observed = abs(sum(d))
    patterns = list(itertools.product((1, -1), repeat=len(d)))
    return sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-9 for signs in patterns) / len(patterns)


def holm_adjusted(p: list[float]) -> list[float]:
    """Holm's adjusted p-values, step by step: the k-th smallest times (m - k), kept from decreasing, at most 1."""
    adjusted, running = [0.0] * len(p), 0.0
    for k, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        adjusted[i] = running
    return adjusted


def comparisons(frame: pd.DataFrame) -> dict[str, dict]:
    """Every student (a model with seeds) against ce, and pl-distill against kd, with Holm across them."""
    students = list(frame.loc[frame["seed"].notna(), "model"].unique())
    pairs = [(m, "ce") for m in students if m != "ce"] if "ce" in students else []
    pairs += [("pl-distill", "kd")] if {"pl-distill", "kd"} <= set(students) else []
    found = {}
    for a, b in pairs:
        d, clips = speaker_differences(frame, a, b)
        n = len(d)
        p = exact_sign_flip(d) if n <= 16 else None
        detectable = (t.ppf(1 - ALPHA / 2, n - 1) + t.ppf(0.8, n - 1)) * np.std(d, ddof=1) / np.sqrt(n)
        found[f"{a} − {b}"] = {"d": d, "diff": float(np.mean(d)), "p": p, "clips": clips, "detectable": detectable}
    if all(r["p"] is not None for r in found.values()):
        for r, adjusted in zip(found.values(), holm_adjusted([r["p"] for r in found.values()])):
            r["p_holm"] = adjusted
    return found


# ------------------------------------------------------------------------------------ reading the report


def tables(markdown: str) -> dict[str, dict[str, list[list[str]]]]:
    """Per dataset section (`## name`): its main table and its paired table, as rows of cells."""
    found = {}
    for section in re.split(r"^## ", markdown, flags=re.M)[1:]:
        name, body = section.split("\n", 1)
        blocks = {}
        for title, header in (("main", r"^\| model \| parameters \|"),
                              ("paired", r"^### Paired comparisons.*\n\n\| comparison \|")):
            match = re.search(header + r".*\n\|[-|]+\|\n((?:\|.*\n)+)", body, flags=re.M)
            if match:
                blocks[title] = [[c.strip() for c in line.strip("|").split(" | ")]
                                 for line in match.group(1).strip().split("\n")]
        found[name.strip()] = blocks
    return found


def check(markdown: str, frame: pd.DataFrame) -> int:
    """Every dataset's main table and paired comparisons against the recomputation; the number of
    comparisons checked."""
    seed = int(re.search(r'"seed": (\d+)', markdown).group(1))
    sections, checked = tables(markdown), 0
    assert set(sections) >= set(frame["dataset"].unique())
    for dataset, rows in frame.groupby("dataset", sort=False):
        expected, written = main_table(rows), {r[0]: r for r in sections[dataset]["main"]}
        assert list(written) == list(expected)  # every model of the table, in its order, has its predictions
        for model, e in expected.items():
            row = written[model]
            mean, *sd = (float(x) for x in row[4].split(" ± "))
            assert abs(mean - e["ua"]) <= ROUNDED and (sd == [] if e["sd"] is None else abs(sd[0] - e["sd"]) <= ROUNDED)
            assert abs(float(row[6].split()[0]) - e["pooled"]) <= ROUNDED
            assert (int(row[7]), int(row[8])) == (e["runs"], e["unmatched"])
        found = comparisons(rows)
        paired = {r[0]: r for r in sections[dataset].get("paired", [])}
        assert list(paired) == list(found)
        for name, r in found.items():
            _, diff, ci, p, p_holm, detectable, speakers, clips, verdict = paired[name]
            n, d = len(r["d"]), r["d"]
            assert abs(float(diff) - r["diff"]) <= ROUNDED and (int(speakers), int(clips)) == (n, r["clips"])
            if r["p"] is not None:
                assert abs(float(p) - r["p"]) <= ROUNDED and abs(float(p_holm) - r["p_holm"]) <= ROUNDED
                assert verdict == ("not significant" if r["p_holm"] > ALPHA else
                                   f"significant ({'better' if r['diff'] > 0 else 'worse'})")
            assert detectable == (f"none ({n} speakers)" if 2 / 2 ** n > ALPHA else f"{r['detectable']:.3f}")
            if n < 3:
                assert ci == f"n/a ({n} speakers)"
            else:  # the report's 2000 speaker resamples against 20000 of ours: the same interval, to noise
                lo, hi = (float(x) for x in ci.strip("[]").split(", "))
                ours = np.asarray(d)[np.random.default_rng(seed + 1).integers(0, n, (20000, n))].mean(1)
                noise = 0.3 * np.std(d, ddof=1) / np.sqrt(n) + ROUNDED
                assert min(d) - ROUNDED <= lo <= r["diff"] + ROUNDED and r["diff"] - ROUNDED <= hi <= max(d) + ROUNDED
                assert abs(lo - np.percentile(ours, 2.5)) <= noise and abs(hi - np.percentile(ours, 97.5)) <= noise
            checked += 1
        balanced = (rows.groupby(["model", "fold", "seed", "speaker", "label"], dropna=False).size().nunique() == 1
                    and rows.groupby("speaker")["label"].nunique().min() == rows["label"].nunique())
        if balanced and rows.groupby("fold")["speaker"].nunique().nunique() == 1:
            # every speaker has every class equally often, every fold as many speakers: the mean speaker
            # difference is the difference of the main table's mean UA
            for name, r in found.items():
                a, b = name.split(" − ")
                assert r["diff"] == pytest.approx(expected[a]["ua"] - expected[b]["ua"])
    return checked


# ------------------------------------------------------------------------------------------ the checks


LABELS = ("Happy", "Sad", "Angry")


@pytest.fixture
def hand_made_study(tmp_path):
    """A study as evaluate leaves it: 4 folds x 2 test speakers x 3 classes x 2 clips; a teacher per fold,
    ce, kd, ldist and pl-distill with 2 seeds each, a prosody reference. kd is right more often than ce on
    every speaker (so something is significant), the others are noise around ce. Its report's main table,
    paired comparisons and predictions.csv are made by report.py's own functions."""
    from pldistill_cli.layout import Layout
    from pldistill_cli.metrics import classification_metrics
    from pldistill_cli.report import _collect, _comparisons, _references, main_table, predictions_table

    layout, rng = Layout(metrics_root=tmp_path / "metrics"), np.random.default_rng(0)
    skill = {"teacher": 0.6, "ce": 0.5, "kd": 0.9, "ldist": 0.5, "pl-distill": 0.55}
    runs = defaultdict(list)
    for fold in range(1, 5):
        clips = pd.DataFrame([(f"f{fold}-s{k}-{label}-{i}", f"spk{2 * fold + k:02d}", label)
                              for k in range(2) for label in LABELS for i in range(2)],
                             columns=["id", "speaker", "label"])
        for model, rate in skill.items():
            for seed in ([None] if model == "teacher" else [1, 2]):
                name = model if seed is None else f"student-{model}-s{seed}"
                right = rng.random(len(clips)) < rate
                frame = clips.assign(prediction=[l if r else rng.choice([x for x in LABELS if x != l])
                                                 for l, r in zip(clips["label"], right)])
                if model == "ldist":  # an unmatched answer: counted wrong, and counted
                    frame.loc[frame.index[-1], "prediction"] = "<unmatched>"
                layout.predictions("d", fold, name).parent.mkdir(parents=True, exist_ok=True)
                frame.to_csv(layout.predictions("d", fold, name), index=False)
                details = {**classification_metrics(frame["label"], frame["prediction"], LABELS), "parameters": 100}
                layout.details("d", fold, name).write_text(json.dumps(details))
                runs[model].append((fold, seed, name))
        prosody = clips.assign(prosody=rng.choice(LABELS, len(clips)))
        prosody.to_csv(layout.predictions("d", fold, "references"), index=False)
        layout.details("d", fold, "references").write_text(json.dumps(
            {"prosody": classification_metrics(prosody["label"], prosody["prosody"], LABELS)}))
    models = {m: _collect(layout, "d", m, r) for m, r in runs.items()}
    references = _references(layout, "d", [1, 2, 3, 4])
    markdown = "\n".join(["## d", "", *main_table(models, references, LABELS, 7, 100), "",
                          *_comparisons(models, SimpleNamespace(seed=7)), "```json", json.dumps({"seed": 7}), "```"])
    frame = predictions_table("d", [*models.values(), *references.values()])
    (tmp_path / "predictions.csv").write_text(frame.to_csv(index=False, lineterminator="\n"))
    return markdown, tmp_path / "predictions.csv"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"speaker": str, "id": str, "dataset": str}, keep_default_na=False,
                       na_values={"seed": [""]})


def test_a_hand_made_study_is_recomputed_from_its_predictions(hand_made_study):
    markdown, path = hand_made_study
    assert check(markdown, _read(path)) == 4  # 3 students against ce, pl-distill against kd
    assert "| kd − ce |" in markdown and "significant (better)" in markdown  # the planted difference is found


def test_a_wrong_number_in_the_report_is_caught(hand_made_study):
    """The check can fail: one UA difference off by 0.001, and one clip's prediction changed in the CSV."""
    markdown, path = hand_made_study
    row = re.search(r"^\| pl-distill − ce \| ([-+]\d\.\d{3}) \|", markdown, flags=re.M)
    wrong = markdown.replace(row.group(0), row.group(0).replace(row.group(1), f"{float(row.group(1)) + 0.001:+.3f}"))
    with pytest.raises(AssertionError):
        check(wrong, _read(path))
    frame = _read(path)
    first = frame.index[(frame["model"] == "ce") & (frame["prediction"] == frame["label"])][0]
    frame.loc[first, "prediction"] = "<unmatched>"
    with pytest.raises(AssertionError):
        check(markdown, frame)


@pytest.mark.parametrize("folder", ["report", "report/study/labels-25", "report/study/labels-100"])
def test_the_committed_reports_are_recomputed_from_their_predictions(folder):
    """The default's report and the study's (scripts/study.sh copies the study's report, predictions.csv
    included): skipped where a report predates predictions.csv."""
    path = ROOT / folder / "predictions.csv"
    if not path.exists():
        pytest.skip(f"{folder}/predictions.csv is absent: that report was made before the report wrote it")
    assert check((ROOT / folder / "report.md").read_text(), _read(path)) >= 1

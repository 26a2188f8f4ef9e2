"""Classification metrics and the statistics that compare models: one definition each."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

UNMATCHED = "<unmatched>"  # a generated answer that names no label (counted as wrong, never mapped to a class)


def _recall(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Recall of every class present in `truth` (UA is their mean)."""
    return {c: float(np.mean(pred[truth == c] == c)) for c in np.unique(truth)}


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """WA (accuracy; equals micro-F1 for single-label data), UA (mean per-class recall over the classes
    present), macro-F1 over the classes present, per-class recall, the confusion matrix (rows true,
    columns predicted, in label order) and the number of unmatched answers."""
    present = [l for l in labels if l in set(y_true)]
    by_class = _recall(np.asarray(y_true), np.asarray(y_pred))
    recall = {l: by_class[l] for l in present}  # in label order
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(np.mean(list(recall.values()))) if present else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "n": len(y_true),
        "unmatched": sum(p == UNMATCHED for p in y_pred),
        "recall": recall,
        "confusion": confusion(y_true, y_pred, labels).tolist(),  # unmatched answers are in no column
    }


def headline(metrics: dict) -> dict[str, float]:
    """The numbers people compare (DVC metrics): WA, UA and macro-F1."""
    return {k: round(metrics[k], 6) for k in ("wa", "ua", "macro_f1")}


def _ua(codes: np.ndarray, correct: np.ndarray, n_classes: int) -> float:
    """UA from integer true classes and per-clip correctness: mean recall over the classes present."""
    counts = np.bincount(codes, minlength=n_classes)
    hits = np.bincount(codes, weights=correct, minlength=n_classes)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def _resamples(clusters: Sequence | None, n_items: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index sets of `n` cluster bootstrap resamples: whole clusters (speakers) drawn with replacement;
    every clip its own cluster when `clusters` is None."""
    if clusters is None:
        return [rng.integers(0, n_items, n_items) for _ in range(n)]
    groups = [np.flatnonzero(np.asarray(clusters) == c) for c in sorted(set(clusters))]
    return [np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))]) for _ in range(n)]


def cluster_bootstrap_ua(y_true: Sequence[str], y_pred: Sequence[str], clusters: Sequence | None = None,
                         n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of UA over resamples of whole clusters (speakers): clips of one speaker
    are not independent, so resampling clips alone gives intervals that are too narrow."""
    codes, classes = np.unique(np.asarray(y_true), return_inverse=True)[1], len(set(y_true))
    correct = (np.asarray(y_true) == np.asarray(y_pred)).astype(float)
    rng = np.random.default_rng(seed)
    values = [_ua(codes[i], correct[i], classes) for i in _resamples(clusters, len(codes), n, rng)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def paired_comparison(y_true: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str],
                      clusters: Sequence | None = None, n_boot: int = 2000, n_perm: int = 5000,
                      seed: int = 0) -> dict:
    """UA(a) - UA(b) on the same clips: the difference, its 95% interval from a cluster (speaker)
    bootstrap of the pairs, and a two-sided p-value from a paired permutation (sign-flip) test that
    swaps a's and b's prediction of each clip at random (exact under the null that the two are
    exchangeable on every clip): p = (1 + #{|d*| >= |d|}) / (1 + n_perm)."""
    truth = np.asarray(y_true)
    codes, classes = np.unique(truth, return_inverse=True)[1], len(set(y_true))
    a = (truth == np.asarray(pred_a)).astype(float)
    b = (truth == np.asarray(pred_b)).astype(float)
    diff = _ua(codes, a, classes) - _ua(codes, b, classes)
    rng = np.random.default_rng(seed)
    boot = [_ua(codes[i], a[i], classes) - _ua(codes[i], b[i], classes) for i in _resamples(clusters, len(codes), n_boot, rng)]
    flips = rng.random((n_perm, len(codes))) < 0.5
    null = np.array([_ua(codes, np.where(f, b, a), classes) - _ua(codes, np.where(f, a, b), classes) for f in flips])
    p = (1 + int(np.sum(np.abs(null) >= abs(diff) - 1e-12))) / (1 + n_perm)
    return {"diff": diff, "ci95": (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))), "p": p,
            "n": len(codes), "clusters": len(set(clusters)) if clusters is not None else len(codes)}


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(labels))


def parse_answer(text: str, labels: Sequence[str]) -> str:
    """The label a free-text answer names: the only label word found in it as a whole word (case
    ignored); UNMATCHED when it names none or several."""
    found = {l for l in labels if re.search(rf"\b{re.escape(l.lower())}\b", text.lower())}
    return found.pop() if len(found) == 1 else UNMATCHED

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


def speaker_ua(y_true: Sequence[str], correct: Sequence[float], speakers: Sequence) -> dict:
    """Per speaker (in sorted order), UA of soft per-clip correctness in [0, 1] (a clip's share of the
    seeds that got it right): the mean over the classes the speaker has of the mean correctness of its
    clips of that class."""
    truth, right, who = np.asarray(y_true), np.asarray(correct, dtype=float), np.asarray(speakers)
    return {s: float(np.mean([right[(who == s) & (truth == c)].mean() for c in np.unique(truth[who == s])]))
            for s in sorted(set(who.tolist()))}


def sign_flip_p(d: Sequence[float], n_perm: int = 20000, seed: int = 0, exact_up_to: int = 16) -> float:
    """Two-sided p of the paired sign-flip test of "mean(d) = 0", one difference d_i per unit (speaker):
    under the null each d_i is as likely to be -d_i. With S = sum(d) and S* = sum(s_i d_i) over sign
    patterns s in {-1, +1}^n: exact for n <= exact_up_to, p = #{s : |S*| >= |S|} / 2^n (the pattern of no
    flips and that of all flips both count, so p >= 2 / 2^n); above it, n_perm random patterns and
    p = (1 + #{|S*| >= |S|}) / (1 + n_perm)."""
    d = np.asarray(d, dtype=float)
    n, observed = len(d), abs(float(d.sum()))
    if n <= exact_up_to:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # row k: the bits of k flip
        return float(np.mean(np.abs(signs @ d) >= observed - 1e-9))  # tolerance: ties in floating point
    rng, hits = np.random.default_rng(seed), 0
    for start in range(0, n_perm, 1000):  # in blocks: many speakers x many patterns stays small
        signs = rng.choice((-1.0, 1.0), size=(min(1000, n_perm - start), n))
        hits += int(np.sum(np.abs(signs @ d) >= observed - 1e-9))
    return (1 + hits) / (1 + n_perm)


def smallest_p(n: int, n_perm: int = 20000, exact_up_to: int = 16) -> float:
    """The smallest p `sign_flip_p` can give n units: 2 / 2^n exact, 1 / (1 + n_perm) by Monte Carlo."""
    return 2 / 2 ** n if n <= exact_up_to else 1 / (1 + n_perm)


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values: sorted p_(1) <= ... <= p_(m), the adjusted
    p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)) (monotone in i). Rejecting where it is at most
    alpha keeps the chance of any false rejection among the m at most alpha."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order]))
    return adjusted.tolist()


def detectable_difference(d: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at `alpha` finds with probability
    `power` on n units with the sample sd of `d` (the usual t approximation):
    (t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd(d) / sqrt(n). nan for fewer than 2 units."""
    from scipy.stats import t

    n = len(d)
    if n < 2:
        return float("nan")
    return float((t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * np.std(d, ddof=1) / np.sqrt(n))


def speaker_paired_test(y_true: Sequence[str], correct_a: Sequence[float], correct_b: Sequence[float],
                        speakers: Sequence, n_boot: int = 2000, n_perm: int = 20000, seed: int = 0,
                        alpha: float = 0.05) -> dict:
    """Model a against model b on the same clips, at the unit that is independent: the test speaker.
    `correct_*` are per-clip correctness averaged over each model's seeds (seeds are repeated measures
    of a clip, not more clips). Per speaker s, d_s = UA_s(a) - UA_s(b) (`speaker_ua`); `diff` is their
    mean, `ci95` the 2.5 and 97.5 percentiles of that mean over `n_boot` resamples of the speakers with
    replacement, `p` the sign-flip p over speakers (`sign_flip_p`), `detectable` the smallest difference
    this many speakers with this spread would find (`detectable_difference`, at `alpha`, power 0.8).
    Every statistic reads the differences in order of size, so speakers' names change nothing."""
    ua_a, ua_b = speaker_ua(y_true, correct_a, speakers), speaker_ua(y_true, correct_b, speakers)
    d = np.array([ua_a[s] - ua_b[s] for s in ua_a])
    d = d[np.lexsort((d, np.abs(d)))]
    boot = d[np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))].mean(1)
    return {"diff": float(d.mean()), "ci95": (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))),
            "p": sign_flip_p(d, n_perm, seed), "detectable": detectable_difference(d, alpha),
            "speakers": len(d), "min_p": smallest_p(len(d), n_perm)}


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(labels))


def parse_answer(text: str, labels: Sequence[str]) -> str:
    """The label a free-text answer names: the only label word found in it as a whole word (case
    ignored); UNMATCHED when it names none or several."""
    found = {l for l in labels if re.search(rf"\b{re.escape(l.lower())}\b", text.lower())}
    return found.pop() if len(found) == 1 else UNMATCHED

"""Tests aimed at what mutation testing of the core (scripts/mutation.sh, TESTING.md) found unchecked:
each expectation is computed independently (float64 references, hand computations, exact enumeration,
the documented procedure re-done with other tools), never read off the code under test."""

from __future__ import annotations

import json
import random
import re
import warnings
from html import unescape
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_losses import ref_debiased_cka, ref_weighted_cka

from pldistill_cli.errors import PldistillError
from pldistill_cli.layout import Layout
from pldistill_cli.losses import (_safe_cka, aw_cka, aw_cka_encoded, aw_cka_gram, bucketed_kl, full_kl,
                                  teacher_factor, topk_logprobs)
from pldistill_cli.terms import TargetCollate, Teacher
from pldistill_cli.metrics import UNMATCHED, classification_metrics, cluster_bootstrap_ua, headline
from pldistill_cli.prompt import PromptLayout
from pldistill_cli.report import (Runs, _collect, _load, _mean_sd, _references, _summary_row, diagnostics, render_html,
                                  table)
from pldistill_cli.training import (LoopSettings, TrainingStep, autocast, finish_work, resolve_device, seed_everything,
                                    retrain, shard, sharded_predictions, shuffled_batches, start_processes,
                                    train_with_validation)

ROUTES = ("features", "gram", "encoded")


def _ref_cka(s: np.ndarray, t: np.ndarray, w: np.ndarray, estimator: str) -> float:
    return ref_weighted_cka(s, t, w) if estimator == "biased" else ref_debiased_cka(s, t, w)


def _cka(route: str, student, encoded, weight, bias, w, mask, estimator: str, eps: float = 1e-8) -> torch.Tensor:
    """AW-CKA against the teacher Z = X W^T + b, given as features, as its Gram, or in encoder space."""
    teacher = encoded @ weight.T + (0 if bias is None else bias)
    if route == "features":
        return aw_cka(student, teacher, w, mask, eps=eps, estimator=estimator)
    if route == "gram":
        return aw_cka_gram(student, teacher @ teacher.mT, w, mask, eps=eps, estimator=estimator)
    return aw_cka_encoded(student, encoded, teacher_factor(weight, bias), w, mask, eps=eps, estimator=estimator)


# ----------------------------------------------------------------------------------------------- AW-CKA


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
@pytest.mark.parametrize("route", ROUTES)
def test_cka_ignores_each_clips_scale_and_huge_padding(route: str, estimator: str) -> None:
    """Clip 0 has features of size 1e12, clip 1 of size 1e-12 and padding of 1e15 to 1e30: each clip's CKA
    is its float64 value at ordinary scale (scale invariance, per clip; padding has no influence)."""
    g = torch.Generator().manual_seed(1)
    t, ds, denc, dt = 7, 3, 4, 5
    student, encoded = torch.randn(2, t, ds, generator=g), torch.randn(2, t, denc, generator=g)
    weight = torch.randn(dt, denc, generator=g)
    with torch.no_grad():
        student[..., :2] += (encoded @ weight.T)[..., :2]  # correlated with the teacher
    w = 0.2 + torch.rand(2, t, generator=g)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, 5:] = False
    expected = [_ref_cka(student[b, mask[b]].numpy(), (encoded[b, mask[b]] @ weight.T).numpy(),
                         w[b, mask[b]].numpy(), estimator) for b in range(2)]
    scale = torch.tensor([1e12, 1e-12])[:, None, None]
    # in encoder space the teacher is [X | 1] F: its constant column fixes the scale, so only the student's varies
    big_s, big_x = student * scale, encoded * (scale if route != "encoded" else 1.0)
    big_s[1, 5:], big_x[1, 5:] = 1e30, 1e15  # the teacher's Gram squares its padding: 1e32 stays finite
    out = _cka(route, big_s, big_x, weight, None, w, mask, estimator)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5 if estimator == "biased" else 2e-4)


def _variance_ratio(z: np.ndarray, w: np.ndarray) -> float:
    """sum_t w_t ||z_t - mu||^2 / sum_t w_t ||z_t||^2 with w normalised and mu = w^T Z, in float64."""
    z, w = z.astype(np.float64), w.astype(np.float64) / w.sum()
    return float((w * ((z - w @ z) ** 2).sum(1)).sum() / (w * (z ** 2).sum(1)).sum())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("spread", [3e-2, 1.0])
def test_a_clip_is_constant_when_its_variance_is_at_most_eps_times_its_second_moment(route: str,
                                                                                  spread: float) -> None:
    """Per clip: CKA is 0 once eps reaches the teacher's variance / second-moment ratio (computed here in
    float64), and the float64 value just below it, whatever the other clip in the batch looks like."""
    g = torch.Generator().manual_seed(2)
    t, ds, denc, dt = 8, 3, 4, 6
    encoded = torch.randn(2, t, denc, generator=g)
    encoded[0] *= spread  # clip 0: the teacher's features vary by `spread` around a large offset
    encoded[1] *= 5.0  # clip 1: a much larger second moment, far from constant
    weight, bias = torch.randn(dt, denc, generator=g), torch.full((dt,), 2.0)
    student = torch.randn(2, t, ds, generator=g)
    w = 0.3 + torch.rand(2, t, generator=g)
    mask = torch.ones(2, t, dtype=torch.bool)
    teacher = (encoded.double() @ weight.double().T + bias.double()).numpy()
    ratio = _variance_ratio(teacher[0], w[0].numpy())
    assert 1e-4 < ratio and _variance_ratio(teacher[1], w[1].numpy()) > 2 * ratio
    expected = [_ref_cka(student[b].numpy(), teacher[b], w[b].numpy(), "biased") for b in range(2)]
    below = _cka(route, student, encoded, weight, bias, w, mask, "biased", eps=0.9 * ratio)
    above = _cka(route, student, encoded, weight, bias, w, mask, "biased", eps=1.1 * ratio)
    np.testing.assert_allclose(below.numpy(), expected, rtol=0, atol=2e-4)
    assert above[0] == 0
    np.testing.assert_allclose(above[1].item(), expected[1], rtol=0, atol=2e-4)


@pytest.mark.parametrize("route", ROUTES)
def test_short_clips(route: str) -> None:
    """Biased CKA is defined from 2 real steps on (float64 value); the debiased one needs 4 steps of
    positive weight and is 0 with fewer, or when a side's self term is lost in float32 rounding (all but
    3 weights ~1e-6 of the others; in clip 3 only the student's: the teacher is large on those steps)."""
    g = torch.Generator().manual_seed(3)
    t, ds, denc, dt = 6, 3, 4, 5
    student, encoded = torch.randn(4, t, ds, generator=g), torch.randn(4, t, denc, generator=g)
    encoded[3, 3:] *= 100
    weight = torch.randn(dt, denc, generator=g)
    w = 0.5 + torch.rand(4, t, generator=g)
    mask = torch.zeros(4, t, dtype=torch.bool)
    mask[0, :2], mask[1, :3], mask[2:, :] = True, True, True
    w[2:, 3:] = 1e-6
    teacher = (encoded @ weight.T).numpy()
    biased = _cka(route, student, encoded, weight, None, w, mask, "biased")
    expected = [_ref_cka(student[b, mask[b]].numpy(), teacher[b, mask[b]], w[b, mask[b]].numpy(), "biased")
                for b in range(4)]
    np.testing.assert_allclose(biased.numpy(), expected, rtol=0, atol=1e-5)
    assert all(abs(e) > 0.05 for e in expected)
    assert _cka(route, student, encoded, weight, None, w, mask, "debiased").tolist() == [0.0] * 4


def test_a_similarity_with_a_zero_self_term_on_either_side_is_zero() -> None:
    """_safe_cka's contract: 0 (not inf or NaN, with finite gradients) wherever either self term is 0, as a
    debiased self term below its resolution is, even when no side was flagged constant."""
    num = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    out = _safe_cka(num, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3, dtype=torch.bool))
    out.sum().backward()
    assert out.tolist() == [0.5, 0.0, 0.0] and num.grad.tolist() == [1.0, 0.0, 0.0]


def test_teacher_of_keeps_the_bias_for_the_constant_teacher_check() -> None:
    """A teacher whose projector barely varies (W ~ 1e-6, b ~ 1) is constant: CKA 0 in encoder space as
    on its full features, so Teacher.of must build its factor from [W | b]."""
    g = torch.Generator().manual_seed(4)
    student, encoded = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 4, generator=g)
    weight, bias = 1e-6 * torch.randn(5, 4, generator=g), 1.0 + torch.rand(5, generator=g)
    w = torch.rand(2, 6, generator=g)
    assert aw_cka(student, encoded @ weight.T + bias, w).tolist() == [0.0, 0.0]
    teacher = Teacher.of(weight, bias, 2.0)
    assert aw_cka_encoded(student, encoded, teacher.factor, w).tolist() == [0.0, 0.0]


def test_teacher_to_moves_every_field() -> None:
    weight, bias = torch.randn(5, 4), torch.randn(5)
    teacher = Teacher.of(weight, bias, 2.0, "debiased")
    moved = teacher.to(torch.device("meta"))
    assert all(getattr(moved, k).device.type == "meta" for k in ("weight", "bias", "factor"))
    assert [tuple(getattr(moved, k).shape) for k in ("weight", "bias", "factor")] == [(5, 4), (5,), (5, 5)]
    assert (moved.temperature, moved.estimator) == (2.0, "debiased")


# ---------------------------------------------------------------------------------------------------- KL


def _ref_kl(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
    """Per-position T^2 KL(p || q) in float64 with 0 log 0 = 0 (teacher logits may be -inf)."""
    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(teacher), log_softmax(student)
    p = np.exp(lp)
    terms = np.where(p > 0, p * (np.where(p > 0, lp, 0) - lq), 0.0)
    return terms.sum(-1) * temperature**2


def test_kl_defaults_to_temperature_one_and_averages_each_clips_positions() -> None:
    g = torch.Generator().manual_seed(5)
    student, teacher = 2 * torch.randn(3, 4, 9, generator=g), 2 * torch.randn(3, 4, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)  # 3, 1 and 0 positions
    per_position = _ref_kl(student.numpy(), teacher.numpy(), 1.0)
    expected = [per_position[0, :3].mean(), per_position[1, 2], 0.0]
    np.testing.assert_allclose(full_kl(student, teacher, mask).numpy(), expected, rtol=1e-5, atol=1e-6)
    ids, logprobs = topk_logprobs(teacher, 9)  # all ids: the bucketed KL is the full one
    log_p = torch.log_softmax(teacher.double(), -1)
    torch.testing.assert_close(logprobs.double(), log_p.gather(-1, ids), rtol=0, atol=1e-6)
    assert torch.equal(ids, log_p.argsort(-1, descending=True))
    np.testing.assert_allclose(bucketed_kl(student, ids, logprobs, mask).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_tokens_the_teacher_rules_out_count_zero() -> None:
    """Teacher logits of -inf (probability exactly 0) add nothing to the KL, dense or bucketed."""
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    teacher[..., 4:] = float("-inf")
    mask = torch.ones(2, 3, dtype=torch.bool)
    expected = _ref_kl(student.numpy(), teacher.numpy(), 2.0).mean(-1)
    np.testing.assert_allclose(full_kl(student, teacher, mask, 2.0).numpy(), expected, rtol=1e-5, atol=1e-6)
    ids, logprobs = topk_logprobs(teacher, 6, 2.0)
    assert torch.isinf(logprobs).any()
    bucketed = bucketed_kl(student, ids, logprobs, mask, 2.0)
    np.testing.assert_allclose(bucketed.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_teacher_with_all_its_mass_outside_the_student_vocabulary_gives_zero() -> None:
    """Student vocabulary 0..3; the teacher puts all its mass on ids 4 and 5: nothing to match, KL 0."""
    teacher = torch.tensor([[[float("-inf")] * 4 + [0.3, -0.2]]])
    ids, logprobs = topk_logprobs(teacher, 6)
    out = bucketed_kl(torch.randn(1, 1, 4), ids, logprobs, torch.ones(1, 1, dtype=torch.bool))
    assert out.tolist() == [0.0]


# ------------------------------------------------------------------------------------------ batching


PROMPT = PromptLayout(prefix=(1, 2), suffix=(3,), labels=("Happy", "Sad"), answers=((10, 99), (11, 12, 99)),
                      audio_token_id=5, pad_id=77, text="")


def _item(index: int, steps: int, label: str, g: torch.Generator, k: int = 2) -> dict:
    answer = {"Happy": [10, 99], "Sad": [11, 12, 99]}[label]
    ids = torch.tensor([1, 2] + [5] * steps + [3] + answer)
    z = torch.randn(steps, 2, generator=g)
    return {"index": index, "label": label, "input_ids": ids, "encoded": torch.randn(steps, 4, generator=g),
            "attention": torch.rand(steps, generator=g), "gram": z @ z.T, "teacher_norm": torch.rand((), generator=g),
            "topk_ids": torch.randint(0, 100, (len(ids) - 1, k), generator=g),
            "topk_logprobs": torch.randn(len(ids) - 1, k, generator=g)}


def test_collate_pads_each_field_and_marks_the_answer_positions() -> None:
    g = torch.Generator().manual_seed(7)
    items = [_item(4, 3, "Sad", g), _item(9, 5, "Happy", g)]  # 9 and 10 tokens; answers of 3 and 2 tokens
    batch = TargetCollate(PROMPT)(items)
    assert batch["index"].tolist() == [4, 9] and batch["labels"] == ["Sad", "Happy"]
    assert batch["lengths"].tolist() == [3, 5]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [items[0]["input_ids"].tolist() + [77], items[1]["input_ids"].tolist()]
    assert batch["attention_mask"].tolist() == [[1] * 9 + [0], [1] * 10]
    # position p is marked when the token at p + 1 is an answer token (label tokens and end of turn)
    assert batch["answer_mask"].tolist() == [[p in (5, 6, 7) for p in range(10)], [p in (7, 8) for p in range(10)]]
    assert batch["kl_mask"].tolist() == [[p < 8 for p in range(9)], [True] * 9]
    for key, steps in (("encoded", 5), ("attention", 5)):
        expected = torch.zeros(2, steps, *items[0][key].shape[1:])
        expected[0, :3], expected[1] = items[0][key], items[1][key]
        assert torch.equal(batch[key], expected)
    gram = torch.zeros(2, 5, 5)
    gram[0, :3, :3], gram[1] = items[0]["gram"], items[1]["gram"]
    assert torch.equal(batch["gram"], gram)
    assert batch["topk_ids"].dtype == torch.long  # ids to gather with
    for key in ("topk_ids", "topk_logprobs"):
        expected = torch.zeros(2, 9, 2, dtype=items[0][key].dtype)
        expected[0, :8], expected[1] = items[0][key], items[1][key]
        assert torch.equal(batch[key], expected)
    assert torch.equal(batch["teacher_norm"], torch.stack([items[0]["teacher_norm"], items[1]["teacher_norm"]]))


def test_collate_a_batch_of_one_and_rows_without_optional_columns() -> None:
    g = torch.Generator().manual_seed(8)
    item = _item(0, 4, "Happy", g)
    batch = TargetCollate(PROMPT)([item])
    assert set(batch) == {"index", "labels", "labelled", "encoded", "lengths", "input_ids", "attention_mask",
                          "answer_mask", "kl_mask", "teacher_norm", "attention", "gram", "topk_ids", "topk_logprobs"}
    assert torch.equal(batch["gram"][0], item["gram"]) and torch.equal(batch["topk_ids"][0], item["topk_ids"])
    plain = {k: item[k] for k in ("index", "label", "input_ids", "encoded")}
    assert set(TargetCollate(PROMPT)([plain])) == {"index", "labels", "labelled", "encoded", "lengths", "input_ids",
                                                  "attention_mask", "answer_mask", "kl_mask"}
    assert TargetCollate(PROMPT)([plain])["labelled"].tolist() == [True]  # a row without the flag keeps its label


# ------------------------------------------------------------------------------------------- metrics

LABELS = ("Sad", "Happy", "Angry", "Neutral")  # not in alphabetical order


def test_classification_metrics_by_hand() -> None:
    """Sad 1 of 2 right, Happy 1 of 3 (one unmatched answer), Angry 0 of 2 and predicted once, wrongly;
    Neutral absent from the truth but predicted once: scores over the three classes present."""
    truth = ["Sad", "Sad", "Happy", "Happy", "Happy", "Angry", "Angry"]
    predicted = ["Sad", "Happy", "Happy", UNMATCHED, "Angry", "Sad", "Neutral"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class never predicted right scores 0 without complaint
        m = classification_metrics(truth, predicted, LABELS)
    # precision / recall: Sad 1/2, 1/2; Happy 1/2, 1/3; Angry 0/1, 0/2 (F1 0: precision + recall = 0)
    f1 = {"Sad": 2 * 0.5 * 0.5 / (0.5 + 0.5), "Happy": 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3), "Angry": 0.0}
    assert m["wa"] == pytest.approx(2 / 7) and m["ua"] == pytest.approx((0.5 + 1 / 3 + 0.0) / 3)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["recall"] == pytest.approx({"Sad": 0.5, "Happy": 1 / 3, "Angry": 0.0})
    assert list(m["recall"]) == ["Sad", "Happy", "Angry"]
    assert m["confusion"] == [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]  # rows true, columns predicted
    assert (m["n"], m["unmatched"]) == (7, 1)
    assert headline(m) == {"wa": 0.285714, "ua": 0.277778, "macro_f1": 0.3}
    assert headline({"wa": 0.12345678, "ua": 2 / 3, "macro_f1": 1.0, "n": 3}) == {"wa": 0.123457, "ua": 0.666667,
                                                                                  "macro_f1": 1.0}


def test_ua_counts_a_class_with_a_single_clip() -> None:
    # a: 1 of 2 right and b (one clip) right -> 0.75; a 2 of 2, b 0 of 1 -> 0.5
    assert classification_metrics(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])["ua"] == pytest.approx(0.75)
    assert classification_metrics(["a", "a", "b"], ["a", "a", "a"], ["a", "b"])["ua"] == pytest.approx(0.5)


def test_bootstrap_intervals_by_hand() -> None:
    # two clips, one right (class a) and one wrong (class b): clip resamples give UA 1, 0 or 1/2, each
    # extreme a quarter of the time
    assert cluster_bootstrap_ua(["a", "b"], ["a", "a"]) == (0.0, 1.0)
    assert cluster_bootstrap_ua(["a", "b", "a", "b"], ["a", "b", "a", "b"], ["s", "s", "t", "t"]) == (1.0, 1.0)
    # three speakers with both classes, s1 always wrong: three s1 draws (1/27 > 2.5%) give UA 0, none give 1
    truth, speakers = ["a", "b"] * 6, ["s0"] * 4 + ["s1"] * 4 + ["s2"] * 4
    predicted = [t if s != "s1" else ("b" if t == "a" else "a") for t, s in zip(truth, speakers)]
    assert cluster_bootstrap_ua(truth, predicted, speakers, seed=0) == (0.0, 1.0)
    # a class that only one of three speakers has drops out of the resamples that miss that speaker
    lo, hi = cluster_bootstrap_ua(["a", "a", "a", "b", "a", "a"], ["a", "b", "a", "a", "a", "a"],
                                  ["s0", "s0", "s1", "s1", "s2", "s2"])
    assert 0.0 <= lo <= 0.5 and hi == 1.0


def _speaker_data(seed: int, n: int = 120, speakers: int = 12):
    rng = np.random.default_rng(seed)
    truth = list(rng.choice(["a", "b", "c"], n))
    who = [f"s{i % speakers}" for i in range(n)]
    a = [t if rng.random() < 0.7 else "a" for t in truth]
    b = [t if rng.random() < 0.5 else "b" for t in truth]
    return truth, who, a, b


def _ua_by_hand(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)]))


def _speaker_resamples(speakers, n: int, rng: np.random.Generator):
    """The documented resampling: whole speakers drawn with replacement, numpy's default_rng(seed)."""
    groups = [np.flatnonzero(np.asarray(speakers) == s) for s in sorted(set(speakers))]
    return [np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))]) for _ in range(n)]


def test_the_intervals_are_the_2_5_and_97_5_percentiles_of_speaker_resamples() -> None:
    """The documented procedure re-done by hand: 2000 speaker resamples from default_rng(0), UA of each."""
    truth, who, a, _ = _speaker_data(0)
    t, pa = np.asarray(truth), np.asarray(a)
    values = [_ua_by_hand(t[i], pa[i]) for i in _speaker_resamples(who, 2000, np.random.default_rng(0))]
    assert cluster_bootstrap_ua(truth, a, who) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))
    # seeded: the same seed gives the same numbers, run after run
    assert cluster_bootstrap_ua(truth, a, who, seed=5) == cluster_bootstrap_ua(truth, a, who, seed=5)


# -------------------------------------------------------------------------------------------- report


def test_mean_and_sample_sd() -> None:
    assert _mean_sd([0.5]) == "0.500"
    assert _mean_sd([0.2, 0.4]) == f"0.300 ± {np.sqrt(0.02):.3f}"  # (0.1^2 + 0.1^2) / (2 - 1)
    assert _mean_sd([0.1, 0.2, 0.6]) == f"0.300 ± {np.sqrt((0.04 + 0.01 + 0.09) / 2):.3f}"


def _cells(page: str, tag: str) -> list[str]:
    return [unescape(c) for c in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)]


def test_table_cells_come_back_as_written() -> None:
    """Rendered by markdown-it-py, every header and cell reads as its value: pipes, backslashes before
    pipes and line breaks (shown as a space) stay inside their cell."""
    page = render_html("\n".join(table([["a\\|b", "x\ny", 3]], ["h|1", "back\\slash", "n"])), Path("."))
    assert _cells(page, "th") == ["h|1", "back\\slash", "n"]
    assert _cells(page, "td") == ["a\\|b", "x y", "3"]


def _write_outputs(layout: Layout, fold: int, name: str, frame: pd.DataFrame, details: dict) -> None:
    path = layout.predictions("d", fold, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    layout.details("d", fold, name).write_text(json.dumps(details))


def _run_frame(fold: int, speakers: list[str], right: list[bool]) -> pd.DataFrame:
    labels = ["Happy", "Sad"] * (len(right) // 2)
    predicted = [label if r else ("Sad" if label == "Happy" else "Happy") for label, r in zip(labels, right)]
    return pd.DataFrame({"id": [f"{fold}-{i}" for i in range(len(right))], "speaker": speakers, "label": labels,
                         "prediction": predicted})


def test_collect_keeps_runs_folds_seeds_and_speaker_ids(tmp_path) -> None:
    layout = Layout(metrics_root=tmp_path)
    runs = [(1, 3, "s-3"), (2, 4, "s-4")]
    for fold, seed, name in runs:  # speaker ids "07" and "7" are two speakers
        _write_outputs(layout, fold, name, _run_frame(fold, ["07", "07", "7", "7"], [True, False, True, True]),
                       {"ua": 0.1 * fold})
    found = _collect(layout, "d", "x", runs)
    assert found.runs == runs and [d["ua"] for d in found.details] == [0.1, 0.2]
    p = found.predictions
    assert p["fold"].tolist() == [1] * 4 + [2] * 4 and p["seed"].tolist() == [3] * 4 + [4] * 4
    assert p["speaker"].tolist() == ["07", "07", "7", "7"] * 2
    assert p["speaker"].nunique() == 2
    layout.predictions("d", 2, "s-4").unlink()
    with pytest.raises(PldistillError, match="s-4-predictions.csv"):
        _collect(layout, "d", "x", runs)
    with pytest.raises(PldistillError, match="nothing-details.json"):
        _load(layout.details("d", 1, "nothing"))


@pytest.mark.parametrize("folds", [[1], [1, 2]])
def test_references_are_one_run_per_reference(tmp_path, folds) -> None:
    layout = Layout(metrics_root=tmp_path)
    for fold in folds:
        frame = _run_frame(fold, ["01", "01", "02", "02"], [True] * 4)
        frame = frame.rename(columns={"prediction": "length"}).assign(prosody=["Sad"] * 4)
        _write_outputs(layout, fold, "references", frame, {"length": {"ua": fold / 10}, "prosody": {"ua": 0.5}})
    found = _references(layout, "d", folds)
    assert set(found) == {"length", "prosody"}
    for name, runs in found.items():
        assert runs.name == f"reference: {name}"
        assert runs.runs == [(f, None, "references") for f in folds]
        assert runs.details == [{"ua": f / 10} if name == "length" else {"ua": 0.5} for f in folds]
        p = runs.predictions
        assert p["fold"].tolist() == [f for f in folds for _ in range(4)] and p["seed"].isna().all()
        assert p["speaker"].tolist() == ["01", "01", "02", "02"] * len(folds)
        expected = ["Happy", "Sad"] * 2 if name == "length" else ["Sad"] * 4
        assert p["prediction"].tolist() == expected * len(folds)


def test_summary_row_sizes_and_speaker_interval() -> None:
    # speaker s0 always right, s1 always wrong: speaker resamples give UA 0 to 1
    frame = _run_frame(1, ["s0"] * 4 + ["s1"] * 4, [True] * 4 + [False] * 4).assign(fold=1, seed=None)
    runs = Runs("m", [(1, None, "m")], [{"wa": 0.5, "ua": 0.5, "macro_f1": 0.25}], frame)
    row = _summary_row(runs, ("Happy", "Sad"), seed=0, teacher_params=None)
    assert row == ["m", "-", "-", "0.500", "0.500", "0.250", "0.500 n/a (2 speakers)", 1, 0]  # no interval from 2
    three = pd.concat([frame, frame.iloc[:4].assign(speaker="s2")], ignore_index=True)  # s2 always right too
    cell = _summary_row(Runs("m", runs.runs, runs.details, three), ("Happy", "Sad"), seed=0, teacher_params=None)[6]
    low, high = map(float, cell.split("[")[1].rstrip("]").split(","))
    assert cell.startswith("0.667 [") and 0 <= low < 0.667 < high == 1.0
    sized = Runs("m", runs.runs, [{**runs.details[0], "parameters": 2000}], frame)
    assert _summary_row(sized, ("Happy", "Sad"), 0, 5000)[1:3] == ["2,000", "2.5x"]
    assert _summary_row(sized, ("Happy", "Sad"), 0, None)[1:3] == ["-", "-"]
    # with the report's seed: the interval of that seed's speaker resamples
    truth, who, a, _ = _speaker_data(1)
    frame = pd.DataFrame({"label": truth, "prediction": a, "speaker": who})
    interval = _summary_row(Runs("m", [], [{"wa": 0, "ua": 0, "macro_f1": 0}], frame), ("a", "b", "c"), 7, None)[6]
    lo, hi = cluster_bootstrap_ua(truth, a, who, seed=7)
    assert interval.endswith(f"[{lo:.3f}, {hi:.3f}]")


def _history(cka, grads, ce=0.5, kl=None) -> list[dict]:
    """One run's history: epoch 0 then epochs 1.. with probe_cka, grad_* and (from epoch 1) ce / kl."""
    rows = []
    for epoch, (c, g) in enumerate(zip(cka, grads)):
        row = {"epoch": epoch, **dict(zip(("grad_ce", "grad_projector", "grad_kl"), g))}
        row.update({"probe_cka": c} if c is not None else {})
        row.update({"ce": ce, **({"kl": kl} if kl is not None else {})} if epoch else {})
        rows.append(row)
    return rows


def test_diagnostics_rows_are_means_over_runs() -> None:
    runs = [(_history([0.6, 0.7], [(2.0, 0.4, 0.2), (0.5, 0.1, 0.05)], ce=0.4, kl=0.3), 1),
            (_history([0.8, 0.9], [(2.0, 0.8, 0.6), (0.5, 0.3, 0.15)], ce=0.6, kl=0.5), 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # terms a method lacks are "-", without numpy warnings
        rows, notes, inert = diagnostics({"pl-distill": runs, "ce": [(_history([None, None], [(1.0,), (1.0,)]), 1)]},
                                         attention_share=0.5)
    # before training, after the first epoch, at the evaluated epoch (here the first): CKA (0.6 + 0.8) / 2 ->
    # (0.7 + 0.9) / 2; projector grad / CE grad (0.4/2 + 0.8/2) / 2 -> (0.1/0.5 + 0.3/0.5) / 2; KL (0.1 + 0.3) / 2
    assert rows[0] == ["pl-distill", "1", "0.500", "0.7000 → 0.8000 → 0.8000", "0.4000", "0.30 → 0.40 → 0.40",
                       "0.20 → 0.20 → 0.20"]
    assert rows[1][:5] == ["ce", "1", "0.500", "- → - → -", "-"] and rows[1][6] == "- → - → -"
    assert notes == [] and inert == []


def test_diagnostics_notes_at_their_thresholds() -> None:
    def notes(cka, grads, kl, share=0.5, soft_target=0.5, best=None):
        return " ".join(diagnostics({"m": [(_history(cka, grads, kl=kl), best)]}, share, soft_target)[1])

    alive = [(1.0, 0.5, 0.5)] * 3
    assert notes([0.6, 0.7, 0.8], alive, kl=0.3) == ""
    assert "nearly uniform" in notes([0.6, 0.7], alive[:2], kl=0.3, share=0.95)
    assert "confident" in notes([0.6, 0.7], alive[:2], kl=0.3, soft_target=0.9)
    assert notes([0.6, 0.7], alive[:2], kl=0.3, share=0.94, soft_target=0.89) == ""
    # CKA at or above 0.99 after the first epoch or at the evaluated one: inert; before training does not count
    assert "m: the projector term is inert" in notes([0.5, 0.99, 0.6], alive, kl=0.3)
    assert "m: the projector term is inert" in notes([0.5, 0.6, 0.99], alive, kl=0.3)
    assert "inert" not in notes([0.995, 0.6, 0.9899], alive, kl=0.3)
    assert "inert" not in notes([0.5, 0.6, 0.995], alive, kl=0.3, best=1)  # past the evaluated epoch
    # a projector gradient below 5% of CE's where it is judged: inert
    assert "m: the projector term is inert" in notes([0.6, 0.7, 0.7], [alive[0], (1.0, 0.049, 0.5), alive[0]], kl=0.3)
    assert "inert" not in notes([0.6, 0.7, 0.7], [(1.0, 0.01, 0.5), (1.0, 0.05, 0.5), alive[0]], kl=0.3)
    # KL: below 0.01 at the evaluated epoch, or its gradient below 5% of CE's where it is judged
    assert "m: the KL term is inert" in notes([0.6, 0.7], alive[:2], kl=0.009)
    assert "KL term" not in notes([0.6, 0.7], alive[:2], kl=0.01)
    assert "m: the KL term is inert" in notes([0.6, 0.7], [(1.0, 0.5, 0.5), (1.0, 0.5, 0.04)], kl=0.3)
    assert "KL term" not in notes([0.6, 0.7], [(1.0, 0.5, 0.01), (1.0, 0.5, 0.05)], kl=0.3)


# ------------------------------------------------------------------------------------------ training


def _rank(n: int, k: int) -> SimpleNamespace:
    return SimpleNamespace(num_processes=n, process_index=k)


@pytest.mark.parametrize("n,accum,per", [(1, 1, 11), (2, 1, 5), (2, 2, 4), (3, 2, 2), (2, 3, 3)])
def test_shard_gives_every_process_the_same_whole_accumulation_groups(n: int, accum: int, per: int) -> None:
    """11 batches: floor(11 / n / accum) groups of accum batches each, every n-th batch from the rank on."""
    batches = [[i] for i in range(11)]
    shares = [shard(batches, _rank(n, k), accum) if accum > 1 else shard(batches, _rank(n, k)) for k in range(n)]
    assert shares == [[batches[k + n * i] for i in range(per)] for k in range(n)]
    assert 11 - n * per < n * accum  # fewer than processes x grad_accum dropped


def test_shard_too_few_batches_is_an_error() -> None:
    with pytest.raises(PldistillError, match="3 batches per epoch cannot feed 2 process.*grad_accum 2"):
        shard([[0], [1], [2]], _rank(2, 0), 2)


def test_sharded_predictions(monkeypatch) -> None:
    asked = []

    def predict(rows):
        asked.append(rows)
        return [f"p{i}" for i in rows]

    assert sharded_predictions(5, predict, _rank(1, 0)) == [f"p{i}" for i in range(5)] and asked == [[0, 1, 2, 3, 4]]
    # rank 1 of 2 predicts items 1 and 3; the gather brings rank 0's pairs (faked here: one process only)
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda pairs: [(4, "p4"), (0, "p0"), (2, "p2"), *pairs])
    asked.clear()
    assert sharded_predictions(5, predict, _rank(2, 1)) == [f"p{i}" for i in range(5)] and asked == [[1, 3]]


@pytest.mark.parametrize("n,size,seed", [(10, 3, 0), (8, 4, 5), (5, 8, 2)])
def test_shuffled_batches_are_those_of_a_seeded_random_sampler(n: int, size: int, seed: int) -> None:
    sampler = torch.utils.data.RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    assert shuffled_batches(n, size, seed) == list(torch.utils.data.BatchSampler(sampler, size, drop_last=False))


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    draws = []
    for seed in (11, 11, 12):
        seed_everything(seed)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1] and all(a != b for a, b in zip(draws[0], draws[2]))


def test_finish_work_removes_the_work_folder(tmp_path) -> None:
    (tmp_path / "work" / "sub").mkdir(parents=True)
    (tmp_path / "work" / "sub" / "state.pt").write_text("x")
    finish_work(tmp_path / "work")
    assert not (tmp_path / "work").exists()
    finish_work(tmp_path / "work")  # already gone: nothing to do


def test_resolve_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PldistillError, match="cuda"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the device objects need no GPU
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: the GPU of this process's local rank
    assert resolve_device("cuda") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")


def test_start_processes_checks_the_expected_number() -> None:
    assert start_processes(torch.device("cpu")).num_processes == 1
    assert start_processes(torch.device("cpu"), 1).num_processes == 1
    with pytest.raises(PldistillError, match="world_size is 2 but 1 process"):
        start_processes(torch.device("cpu"), 2)


def test_start_processes_asks_for_a_cpu_state_on_the_cpu_only_and_world_size_0_takes_any_count(monkeypatch) -> None:
    """Its docstring: gloo on the CPU, NCCL on GPUs, so accelerate's state is made CPU-only exactly when the
    device is the CPU (on a machine with a GPU anything else puts a CPU run's processes on it); world_size 0,
    the default, checks no count, any other value is the count expected."""
    import accelerate

    made = []

    class TwoProcesses:  # accelerate's PartialState as a 2-process launch gives it
        num_processes, process_index = 2, 0

        def __init__(self, cpu: bool = False, **kwargs) -> None:
            made.append(cpu)

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    assert start_processes(torch.device("cpu")).num_processes == 2
    assert start_processes(torch.device("cuda", 1), 2).num_processes == 2
    with pytest.raises(PldistillError, match="world_size is 3 but 2 process"):
        start_processes(torch.device("cpu"), 3)
    assert made == [True, False, True]


def test_autocast_is_bf16_on_cuda_only() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CUDA autocast made on a machine without a GPU warns (and is disabled)
        with autocast(torch.device("cpu")):  # "plain fp32 on CPU": no autocast of any device, none made
            assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no GPU here: torch disables it, but keeps its settings
        cuda = autocast(torch.device("cuda"))
    assert isinstance(cuda, torch.autocast) and (cuda.device, cuda.fast_dtype) == ("cuda", torch.bfloat16)


DATA = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
TARGET = DATA.sum(1, keepdim=True)


def _toy(frozen: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    if frozen:
        model[0].requires_grad_(False)
    return model


def _epoch_batches(n_batches: int, epoch: int) -> list[torch.Tensor]:
    order = torch.randperm(24, generator=torch.Generator().manual_seed(100 + epoch))
    return list(order[: 4 * n_batches].split(4))


def reference_probe(model) -> torch.Tensor:
    return next(model.parameters()).detach().sum()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accum,n_batches,epochs,warmup,scale,max_norm", [
    (3, 6, 3, 2, 1e-7, 1.0),  # gradients of the size of Adam's eps: the 1 / grad_accum shows
    (2, 4, 2, 0, 1.0, 0.05),  # the clipping bites
    (1, 1, 3, 1, 1.0, 10.0),  # one batch per epoch
])
def test_the_loop_is_adamw_with_a_cosine_schedule_accumulation_and_clipping(tmp_path, accum, n_batches, epochs,
                                                                            warmup, scale, max_norm) -> None:
    """The weights after training and the per-epoch history equal those of the documented loop written
    out here: AdamW; linear warmup then cosine decay over epochs x batches / grad_accum updates; each
    batch's loss / grad_accum summed over its group, clipped, one update per group."""
    lr, decay = 0.05, 0.1

    def loss_of(model, idx):
        return scale * (model(DATA[idx]) - TARGET[idx]).square().mean()

    reference = _toy()
    params = list(reference.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    total = epochs * n_batches // accum

    def factor(step):
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    probes = [float(params[0].detach().sum())]
    for epoch in range(epochs):
        for i, idx in enumerate(_epoch_batches(n_batches, epoch)):
            (loss_of(reference, idx) / accum).backward()
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
        probes.append(float(params[0].detach().sum()))

    model, seen = _toy(), {}

    def terms(idx):
        loss = loss_of(model, idx)
        seen.setdefault(len(seen_epochs), []).append((float(loss.detach()), float(idx.sum())))
        return {"loss": loss, "batch_sum": idx.sum().float()}

    seen_epochs = []

    def batches(epoch):
        seen_epochs.append(epoch)
        return _epoch_batches(n_batches, epoch)

    settings = LoopSettings(epochs, lr, decay, max_norm, accum, warmup)
    result = train_with_validation(TrainingStep({"m": model}, terms), batches, None, settings, n_batches, tmp_path,
                                   "fp", "test", diagnose=lambda: {"probe": float(reference_probe(model))})
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert result.best_epoch == epochs  # no validation: the last epoch is kept
    assert result.history[0] == {"epoch": 0, "probe": pytest.approx(probes[0])}
    for epoch, record in enumerate(result.history[1:], start=1):
        losses, sums = zip(*seen[epoch])
        assert record == {"epoch": epoch, "loss": pytest.approx(np.mean(losses)), "batch_sum": pytest.approx(
            np.mean(sums)), "validation_ua": epoch - 1.0, "updates": n_batches // accum,
            "probe": pytest.approx(probes[epoch], rel=1e-5, abs=1e-6)}


def _scored_run(work, scores, patience=0, frozen=False, fail_at=None, snapshots=None):
    """Train a toy model 4 batches an epoch, validation scores given per epoch; returns (model, result)."""
    model = _toy(frozen)
    current = []

    def batches(epoch):
        if epoch == fail_at:
            raise KeyboardInterrupt
        current.append(epoch)
        return _epoch_batches(4, epoch)

    def validate():
        if snapshots is not None:
            snapshots[current[-1] + 1] = _snapshot(model)
        return scores[current[-1]]

    step = TrainingStep({"m": model}, lambda idx: {"loss": (model(DATA[idx]) - TARGET[idx]).square().mean()})
    settings = LoopSettings(len(scores), 0.05, 0.0, 1.0, patience=patience)
    return model, train_with_validation(step, batches, validate, settings, 4, work, "fp", "test")


def test_retrain_runs_the_chosen_epoch_count_without_validation(tmp_path) -> None:
    """A refit trains a fresh model for the validated run's best epoch count, in its own work folder, with
    the same loop settings otherwise: the weights of a plain run of that many epochs."""
    _, chosen = _scored_run(tmp_path / "selected", [0.2, 0.5, 0.3, 0.1])
    assert chosen.best_epoch == 2

    def run(epochs_trained, train):
        model = _toy()
        step = TrainingStep({"m": model}, lambda idx: {"loss": (model(DATA[idx]) - TARGET[idx]).square().mean()})
        return model, train(step, lambda epoch: (epochs_trained.append(epoch), _epoch_batches(4, epoch))[1])

    settings = LoopSettings(4, 0.05, 0.0, 1.0, patience=3)
    epochs = []
    refit, record = run(epochs, lambda step, batches: retrain(step, batches, settings, chosen, 4, tmp_path / "work",
                                                              "fp", "refit", clips=12))
    assert record == {"epochs": 2, "clips": 12} and epochs == [0, 1]
    assert (tmp_path / "work" / "refit" / "state.json").exists()
    plain, _ = run([], lambda step, batches: train_with_validation(
        step, batches, None, LoopSettings(2, 0.05, 0.0, 1.0), 4, tmp_path / "plain", "fp", "plain"))
    for a, b in zip(refit.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Another run's refit in the same work folder (another fingerprint) starts afresh: the finished state
    # left there belongs to the first run.
    slower = LoopSettings(4, 0.01, 0.0, 1.0, patience=3)
    other, _ = run([], lambda step, batches: retrain(step, batches, slower, chosen, 4, tmp_path / "work", "fp2",
                                                     "refit", clips=12))
    plain, _ = run([], lambda step, batches: train_with_validation(
        step, batches, None, LoopSettings(2, 0.01, 0.0, 1.0), 4, tmp_path / "plain2", "fp", "plain"))
    for a, b in zip(other.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_earliest_of_equal_best_scores_is_kept_and_frozen_layers_stay(tmp_path) -> None:
    snapshots = {}
    initial = _toy(frozen=True)[0].weight.clone()
    model, result = _scored_run(tmp_path, [0.4, 0.6, 0.6, 0.1], frozen=True, snapshots=snapshots)
    assert (result.best_epoch, result.best_score) == (2, 0.6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[2][name], rtol=0, atol=0)
    assert torch.equal(model[0].weight, initial)


@pytest.mark.parametrize("patience,epochs_run,best", [(0, 6, 3), (1, 2, 1), (2, 5, 3), (3, 6, 3)])
def test_patience_stops_after_that_many_epochs_without_a_better_score(tmp_path, patience, epochs_run, best) -> None:
    snapshots = {}
    model, result = _scored_run(tmp_path, [0.5, 0.4, 0.6, 0.3, 0.2, 0.1], patience, snapshots=snapshots)
    assert [r["epoch"] for r in result.history] == list(range(1, epochs_run + 1))
    assert result.best_epoch == best
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[best][name], rtol=0, atol=0)


def test_a_validation_that_never_scores_stops_after_patience_epochs(tmp_path) -> None:
    """Every score NaN: no epoch is ever better, so `patience` epochs from the start end the run, and the
    best epoch is still the loop's "-1 until an epoch has been scored" (what the saved summary records)."""
    _, result = _scored_run(tmp_path, [float("nan")] * 5, patience=2)
    assert [r["epoch"] for r in result.history] == [1, 2] and result.best_epoch == -1


def _accelerator(monkeypatch, main: bool = True) -> list[dict]:
    """Make the loop's Accelerator record the arguments it is made with; main=False: as a process other than
    the main one sees it."""
    import accelerate

    made = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, **kwargs) -> None:
            made.append(kwargs)
            super().__init__(*args, **kwargs)

        @property
        def is_main_process(self) -> bool:
            return main and super().is_main_process

    monkeypatch.setattr(accelerate, "Accelerator", Recording)
    return made


def test_the_loop_asks_for_a_cpu_state_for_a_model_on_the_cpu(tmp_path, monkeypatch) -> None:
    """accelerate's state follows the model's device: CPU-only for a model on the CPU (on a machine with a GPU
    anything else gives accelerate, and DDP, the GPU while the model and its batches stay on the CPU)."""
    made = _accelerator(monkeypatch)
    _scored_run(tmp_path, [0.5])
    assert [kwargs.get("cpu") for kwargs in made] == [True]


def test_a_process_other_than_the_main_one_trains_every_epoch_and_writes_no_state(tmp_path, monkeypatch) -> None:
    """Every process runs every epoch (DDP's all-reduces need all of them) and ends with the best weights;
    only the main process writes the state to resume from."""
    _accelerator(monkeypatch, main=False)
    snapshots = {}
    model, result = _scored_run(tmp_path, [0.4, 0.6, 0.5], snapshots=snapshots)
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.best_epoch == 2
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[2][name], rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == []


def test_a_part_the_loss_stops_using_is_left_as_it_was(tmp_path) -> None:
    """The documented loop frees the gradients after each update (torch's zero_grad default) and AdamW passes
    over a parameter without one: a part the loss uses in the first epoch only keeps, to the end, the values
    it had after that epoch (zeroed gradients instead would give it weight decay and momentum steps)."""
    model, side = _toy(), torch.nn.Linear(3, 1)
    initial, after_first, current = _snapshot(side), {}, []

    def batches(epoch):
        current.append(epoch)
        return _epoch_batches(4, epoch)

    def terms(idx):
        loss = (model(DATA[idx]) - TARGET[idx]).square().mean()
        return {"loss": loss + side(DATA[idx]).square().mean() if current[-1] == 0 else loss}

    def validate():
        if current[-1] == 0:
            after_first.update(_snapshot(side))
        return float(current[-1])  # rising: the last epoch is kept

    settings = LoopSettings(3, 0.05, 0.1, 1.0)
    train_with_validation(TrainingStep({"m": model, "side": side}, terms), batches, validate, settings, 4, tmp_path,
                          "fp", "test")
    assert not torch.equal(after_first["weight"], initial["weight"])  # it did train in the first epoch
    for name, value in side.state_dict().items():
        torch.testing.assert_close(value, after_first[name], rtol=0, atol=0)


class _Bar:
    """Stands in for ui.progress's bar, with its calls and defaults: keeps the bar's position and the text it
    shows (None changes neither) and logs both after every call."""

    def __init__(self, total) -> None:
        self.total, self.position, self.info, self.log = total, 0, "", []

    def advance(self, n: float = 1, info: str | None = None) -> None:
        self.position += n
        self.info = self.info if info is None else info
        self.log.append((self.position, self.info))

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        self.position = self.position if completed is None else completed
        self.info = self.info if info is None else info
        self.log.append((self.position, self.info))

    def report(self, text: str) -> None:  # the epoch's line (ui: the bar's text on a terminal, a log line off it)
        self.update(info=text)


def _shown(info: str):
    """What a progress line says: ("validation", epoch, score, best so far) or ("batch", epoch, {term: mean})."""
    if not info:
        return info
    if match := re.fullmatch(r"epoch (\d+) (?:\S+ \S+ )*validation_ua (\S+) \(best (\S+)\)", info):
        return "validation", int(match[1]), float(match[2]), float(match[3])
    words = info.split(" ")
    assert words[0] == "epoch" and len(words) % 2 == 0, info
    return "batch", int(words[1]), {k: float(v) for k, v in zip(words[2::2], words[3::2])}


def test_the_progress_bar_counts_batches_and_shows_running_means_and_scores(tmp_path, monkeypatch) -> None:
    """The bar runs over epochs x batches per epoch and a resumed run starts it at the epochs already done;
    each batch moves it on by one and shows its epoch (1-based, as in the history) with each term's mean over
    the epoch so far; each validation shows the epoch, its score and the best score so far."""
    from contextlib import contextmanager

    import pldistill_cli.training as training

    bars: list[_Bar] = []

    @contextmanager
    def recording(description, total):
        bars.append(_Bar(total))
        yield bars[-1]

    monkeypatch.setattr(training, "progress", recording)
    scores, seen = [0.25, 0.75, 0.5], {}  # seen: epoch (1-based) -> each batch's terms

    def run(fail_at=None):
        model, current = _toy(), []

        def batches(epoch):
            if epoch == fail_at:
                raise KeyboardInterrupt
            current.append(epoch)
            return _epoch_batches(4, epoch)

        def terms(idx):
            loss = (model(DATA[idx]) - TARGET[idx]).square().mean()
            seen.setdefault(current[-1] + 1, []).append({"loss": float(loss.detach()), "sum": float(idx.sum())})
            return {"loss": loss, "sum": idx.sum().float()}

        train_with_validation(TrainingStep({"m": model}, terms), batches, lambda: scores[current[-1]],
                              LoopSettings(3, 0.05, 0.0, 1.0), 4, tmp_path, "fp", "test")

    def expected(epochs, done):
        log, best = [(4 * done, "")], max(scores[:done], default=float("-inf"))
        for epoch in epochs:
            for k in range(1, 5):
                means = {t: np.mean([b[t] for b in seen[epoch][:k]]) for t in ("loss", "sum")}
                log.append((4 * (epoch - 1) + k, ("batch", epoch, pytest.approx(means, abs=6e-4))))
            best = max(best, scores[epoch - 1])
            log.append((4 * epoch, ("validation", epoch, scores[epoch - 1], best)))
        return log

    with pytest.raises(KeyboardInterrupt):
        run(fail_at=2)  # epochs 1 and 2, then stopped
    run()  # resumed: epoch 3
    assert [bar.total for bar in bars] == [12, 12]
    assert [(position, _shown(info)) for position, info in bars[0].log] == expected([1, 2], 0)
    assert [(position, _shown(info)) for position, info in bars[1].log] == expected([3], 2)


def test_a_non_finite_loss_stops_the_run_naming_where(tmp_path) -> None:
    model = _toy()
    calls = []

    def terms(idx):
        calls.append(1)
        loss = (model(DATA[idx]) - TARGET[idx]).square().mean()
        return {"loss": loss * float("nan") if len(calls) == 7 else loss, "ce": torch.tensor(1.5)}

    settings = LoopSettings(3, 0.05, 0.0, 1.0)
    with pytest.raises(PldistillError, match=r"epoch 2, step 3 \(loss nan, ce 1\.5\)"):
        train_with_validation(TrainingStep({"m": model}, terms), lambda e: _epoch_batches(4, e), lambda: 0.0, settings,
                              4, tmp_path, "fp", "test")


def test_a_resumed_run_keeps_the_best_epoch_it_had(tmp_path) -> None:
    snapshots = {}
    scores = [0.9, 0.1, 0.1, 0.1]
    with pytest.raises(KeyboardInterrupt):
        _scored_run(tmp_path, scores, frozen=True, fail_at=2, snapshots=snapshots)
    model, result = _scored_run(tmp_path, scores, frozen=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert (result.best_epoch, result.best_score) == (1, 0.9)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][name], rtol=0, atol=0)


PLANTED_RAN: list[bool] = []


def _planted_code() -> dict:  # what unpickling a planted state file would run
    PLANTED_RAN.append(True)
    return {}


class Planted:
    """Not a tensor: a state file holding it is not one this code wrote, and loading it runs code."""

    def __reduce__(self):
        return _planted_code, ()


def test_a_planted_or_mismatched_state_starts_afresh(tmp_path, monkeypatch) -> None:
    with pytest.raises(KeyboardInterrupt):
        _scored_run(tmp_path, [0.1, 0.2, 0.3], fail_at=2)
    progress = json.loads((tmp_path / "state.json").read_text())
    assert progress["epoch"] == 1
    (tmp_path / "state.json").write_text(json.dumps({**progress, "epoch": 0}))  # names another epoch than state.pt
    _, result = _scored_run(tmp_path, [0.1, 0.2, 0.3])
    assert [r["epoch"] for r in result.history] == [1, 2, 3]  # all three trained again
    work = tmp_path / "planted"
    with pytest.raises(KeyboardInterrupt):
        _scored_run(work, [0.1, 0.2, 0.3], fail_at=2)
    state = torch.load(work / "state.pt", weights_only=True)
    torch.save({**state, "planted": Planted()}, work / "state.pt")  # a whole state, plus code to run
    # weights_only is asked for, not left to torch's default: this setting turns that default off
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _, result = _scored_run(work, [0.1, 0.2, 0.3])
    assert not PLANTED_RAN and [r["epoch"] for r in result.history] == [1, 2, 3]
    # well-formed files that are not a state either: JSON that is no object, a tensor, a state missing a part
    for planted_json, planted_pt in ((json.dumps([]), None), (json.dumps(None), None),
                                     (None, torch.zeros(2)), (None, {"epoch": 1})):
        (tmp_path / "state.json").write_text(planted_json or json.dumps(progress))
        torch.save(planted_pt if planted_pt is not None else {"epoch": 1}, tmp_path / "state.pt")
        _, result = _scored_run(tmp_path, [0.1, 0.2, 0.3])
        assert [r["epoch"] for r in result.history] == [1, 2, 3]

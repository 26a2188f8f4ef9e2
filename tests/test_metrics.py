import itertools

import numpy as np
import pytest
from sklearn.metrics import classification_report

from pldistill_cli.metrics import (classification_metrics, confusion, detectable_difference, holm, sign_flip_p,
                                   smallest_p, speaker_paired_test, speaker_ua)

LABELS = ("Happy", "Sad", "Angry", "Neutral")


def test_metrics_match_independent_computations():
    rng = np.random.default_rng(0)
    y_true = list(rng.choice(LABELS, 200, p=[0.4, 0.3, 0.2, 0.1]))
    y_pred = [t if rng.random() < 0.6 else rng.choice(LABELS) for t in y_true]
    m = classification_metrics(y_true, y_pred, LABELS)
    cm = confusion(y_true, y_pred, LABELS)
    recalls = cm.diagonal() / cm.sum(1)
    precisions = cm.diagonal() / np.maximum(cm.sum(0), 1)
    f1 = 2 * precisions * recalls / np.maximum(precisions + recalls, 1e-12)
    assert m["wa"] == np.trace(cm) / cm.sum()
    assert np.isclose(m["ua"], recalls.mean())
    assert np.isclose(m["macro_f1"], f1.mean())
    report = classification_report(y_true, y_pred, labels=list(LABELS), output_dict=True, zero_division=0)
    assert np.isclose(m["macro_f1"], report["macro avg"]["f1-score"])
    assert np.isclose(m["ua"], report["macro avg"]["recall"])
    assert m["n"] == 200


def test_ua_ignores_classes_absent_from_the_test_split():
    y_true = ["Happy", "Happy", "Sad", "Sad"]
    y_pred = ["Happy", "Sad", "Sad", "Sad"]
    m = classification_metrics(y_true, y_pred, LABELS)
    assert np.isclose(m["ua"], (0.5 + 1.0) / 2)
    assert m["wa"] == 0.75


def test_generated_answers_map_to_one_label_or_count_as_unmatched():
    from pldistill_cli.metrics import UNMATCHED, parse_answer

    assert parse_answer("Happy", LABELS) == "Happy"
    assert parse_answer(" the speaker sounds sad.", LABELS) == "Sad"
    assert parse_answer("Unhappy", LABELS) == UNMATCHED  # whole words only
    assert parse_answer("Happy or sad", LABELS) == UNMATCHED  # several labels: no guess
    assert parse_answer("Calm", LABELS) == UNMATCHED  # not in this label set: never mapped to Neutral
    m = classification_metrics(["Happy", "Sad", "Sad"], ["Happy", UNMATCHED, "Sad"], LABELS)
    assert m["unmatched"] == 1 and np.isclose(m["ua"], (1.0 + 0.5) / 2) and np.isclose(m["wa"], 2 / 3)


def _brute_force_p(d) -> float:
    """The sign-flip p by enumeration in plain Python: the share of all 2^n sign patterns whose flipped
    sum is at least as far from 0 as the observed one."""
    observed = abs(sum(d))
    patterns = list(itertools.product((1, -1), repeat=len(d)))
    return sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-9 for signs in patterns) / len(patterns)


@pytest.mark.parametrize("d", [[0.1, 0.2, 0.3, -0.05, 0.0, 0.15], [0.25, -0.25, 0.5, 0.125], [0.1] * 6, [0.0] * 3,
                               [0.3, -0.1, 0.2, 0.2, -0.3, 0.1, 0.05, 0.4, -0.2, 0.15]])
def test_the_exact_sign_flip_p_is_the_share_of_all_sign_patterns(d):
    """Against brute-force enumeration and scipy's exact paired permutation test (which swaps the two
    members of each pair: the same null), ties included."""
    from scipy.stats import permutation_test

    p = sign_flip_p(d)
    assert p == pytest.approx(_brute_force_p(d))
    x = np.asarray(d)
    scipy = permutation_test((x, np.zeros_like(x)), lambda a, b, axis: np.mean(a - b, axis=axis),
                             permutation_type="samples", n_resamples=np.inf).pvalue
    assert p == pytest.approx(min(1.0, scipy))
    assert sign_flip_p([-v for v in d]) == p and sign_flip_p(d[::-1]) == pytest.approx(p)


def test_the_smallest_exact_p_is_two_over_two_to_the_n():
    """Every speaker's difference of one sign: only no flips and all flips reach |S|, so p = 2 / 2^n: 0.0625
    with 5 speakers (nothing can be significant at 5%), 0.03125 with 6."""
    assert sign_flip_p([0.1, 0.2, 0.05, 0.3, 0.1]) == 2 / 32 == smallest_p(5) > 0.05
    assert sign_flip_p([0.1, 0.2, 0.05, 0.3, 0.1, 0.01]) == 2 / 64 == smallest_p(6) < 0.05
    assert smallest_p(16) == 2 / 2 ** 16 and smallest_p(17) == 1 / 20001  # Monte Carlo above 16: 1 / (1 + n_perm)
    d = list(np.random.default_rng(5).normal(0.02, 0.1, 16))
    assert sign_flip_p(d, seed=9) == pytest.approx(_brute_force_p(d))  # 16 speakers: still exact


def test_the_monte_carlo_p_above_16_speakers_agrees_with_the_exact_one():
    d = list(np.random.default_rng(2).normal(0.03, 0.1, 18))
    exact = sign_flip_p(d, exact_up_to=18)  # all 2^18 patterns (the exact path is checked above)
    approximate = sign_flip_p(d, seed=1)  # 18 > 16: 20000 random patterns
    assert 0.05 < exact < 0.95 and abs(approximate - exact) < 4 * np.sqrt(exact * (1 - exact) / 20000)
    assert approximate != exact and sign_flip_p(d, seed=1) == approximate  # seeded
    assert sign_flip_p([0.5] * 20, n_perm=99) == 1 / 100  # no random pattern but the identity reaches it


def _holm_by_steps(p, alpha):
    """Holm's procedure as the textbook states it: walk up the sorted p-values, rejecting while
    p_(k) <= alpha / (m - k + 1), and stop at the first that is not."""
    rejected = set()
    for k, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
        if p[i] > alpha / (len(p) - k):
            break
        rejected.add(i)
    return rejected


def test_holm_by_hand_and_as_the_step_down_procedure():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (kept monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([0.7, 0.6]) == [1.0, 1.0]  # never above 1
    assert holm([0.02]) == [0.02] and holm([]) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = list(rng.uniform(0, 0.1, rng.integers(1, 7)))
        adjusted = holm(p)
        assert {i for i, a in enumerate(adjusted) if a <= 0.05} == _holm_by_steps(p, 0.05)
        order = np.argsort(p)
        assert all(np.diff(np.asarray(adjusted)[order]) >= 0) and all(a >= x for a, x in zip(adjusted, p))


def test_the_detectable_difference_has_80_percent_power():
    """(t(0.975, n-1) + t(0.8, n-1)) sd / sqrt(n) by hand (t table, 9 degrees of freedom); at that true
    difference, the exact power of the two-sided paired t-test (noncentral t) is 0.8 to within the
    approximation's error."""
    from scipy.stats import nct, t

    d = np.random.default_rng(10).normal(0, 0.05, 10)
    found = detectable_difference(d)
    assert found == pytest.approx((2.2621571628 + 0.8834038597) * np.std(d, ddof=1) / np.sqrt(10))
    crit, shift = t.ppf(0.975, 9), found / (np.std(d, ddof=1) / np.sqrt(10))
    assert 1 - nct.cdf(crit, 9, shift) + nct.cdf(-crit, 9, shift) == pytest.approx(0.8, abs=0.01)
    assert np.isnan(detectable_difference([0.1]))


SPEAKERS = [f"s{i}" for i in range(8)]


def _paired_data(seed: int):
    """Eight speakers x three classes x two clips; soft correctness in thirds (three seeds averaged)."""
    rng = np.random.default_rng(seed)
    truth = [c for _ in SPEAKERS for c in ("a", "a", "b", "b", "c", "c")]
    who = [s for s in SPEAKERS for _ in range(6)]
    a = rng.integers(0, 4, len(truth)) / 3
    b = rng.integers(0, 4, len(truth)) / 3
    return truth, a, b, who


def test_speaker_ua_by_hand():
    # s0: a-clips 1 and 0 -> 0.5, b-clip 1/3 -> mean 5/12; s1 has only class b: 2/3
    found = speaker_ua(["a", "a", "b", "b"], [1, 0, 1 / 3, 2 / 3], ["s0", "s0", "s0", "s1"])
    assert found == pytest.approx({"s0": (0.5 + 1 / 3) / 2, "s1": 2 / 3}) and list(found) == ["s0", "s1"]


def test_the_speaker_test_recomputed_by_hand():
    truth, a, b, who = _paired_data(0)
    result = speaker_paired_test(truth, a, b, who, seed=4)
    d = []
    for s in SPEAKERS:
        ua = [np.mean([x[i] for i in range(len(truth)) if who[i] == s and truth[i] == c]) for x in (a, b)
              for c in "abc"]
        d.append(np.mean(ua[:3]) - np.mean(ua[3:]))
    assert result["diff"] == pytest.approx(np.mean(d)) and result["speakers"] == 8
    assert result["p"] == pytest.approx(_brute_force_p(d)) and result["min_p"] == 2 / 256
    assert result["detectable"] == pytest.approx(detectable_difference(d))
    lo, hi = result["ci95"]
    assert min(d) <= lo < np.mean(d) < hi <= max(d)  # a mean of resampled speakers: within their range


def test_the_interval_is_the_speaker_bootstrap_of_the_mean_difference():
    """One clip per speaker, so d_s is the difference of two clips' correctness. The bootstrap distribution
    of the mean difference over all 6^6 resamples of the 6 speakers, enumerated: 20000 random resamples
    give its 2.5 and 97.5 percentiles to within their noise (a resample of 5 speakers would not)."""
    a, b = [0.6, 0.45, 0.9, 0.7, 0.5, 0.65], [0.5] * 6
    d = np.subtract(a, b)
    every = d[np.array(list(itertools.product(range(6), repeat=6)))].mean(1)
    lo, hi = speaker_paired_test(["x"] * 6, a, b, [f"s{i}" for i in range(6)], n_boot=20000)["ci95"]
    assert lo == pytest.approx(np.percentile(every, 2.5), abs=0.004)
    assert hi == pytest.approx(np.percentile(every, 97.5), abs=0.004)


def test_swapping_a_and_b_flips_the_sign_and_keeps_p_and_relabelling_changes_nothing():
    truth, a, b, who = _paired_data(1)
    result = speaker_paired_test(truth, a, b, who, seed=2)
    swapped = speaker_paired_test(truth, b, a, who, seed=2)
    assert swapped["diff"] == pytest.approx(-result["diff"]) and swapped["p"] == result["p"]
    assert swapped["ci95"] == pytest.approx((-result["ci95"][1], -result["ci95"][0]))
    renamed = {s: f"z{7 - k}" for k, s in enumerate(SPEAKERS)}  # the sorted order of the names reversed
    relabelled = speaker_paired_test(truth, a, b, [renamed[s] for s in who], seed=2)
    assert relabelled == result
    order = np.random.default_rng(0).permutation(len(truth))  # and the clips in any order
    shuffled = speaker_paired_test(*([x[i] for i in order] for x in (truth, a, b, who)), seed=2)
    assert shuffled == result


def test_latency_is_timed_repeatedly_and_its_spread_recorded():
    """evaluate times each model LATENCY_REPEATS times after its scoring pass: the record holds every
    repeat, the medians and the spread (slowest - fastest total) that the report judges noise by."""
    from pldistill_cli.evaluate import repeated_latency
    from pldistill_cli.scoring import Scored

    timings = [(1.0, 2.0), (1.2, 2.4), (9.0, 30.0), (1.1, 2.1), (0.9, 2.2)]
    calls = []
    record = repeated_latency(lambda k: calls.append(k) or Scored([], None, None, *timings[k]), len(timings))
    assert calls == [0, 1, 2, 3, 4]
    assert record["encoder_ms"] == 1.1 and record["llm_ms"] == 2.2  # medians: the slow repeat does not move them
    assert record["spread_ms"] == 39.0 - 3.0
    assert record["repeats"] == [{"encoder_ms": e, "llm_ms": l} for e, l in timings]

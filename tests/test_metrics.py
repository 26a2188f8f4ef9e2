import numpy as np
from sklearn.metrics import classification_report

from pldistill_cli.metrics import classification_metrics, confusion

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


def test_the_smallest_p_is_one_over_one_plus_the_number_of_swaps():
    """p = (1 + #{|d*| >= |d|}) / (1 + n_perm), n_perm 5000 by default: when a is right and b wrong on
    each of 40 clips, a swap reaches |d| = 1 only if it swaps all clips or none (2 of 2^40 swaps), so
    none of the random swaps does and p is 1 / (1 + n_perm)."""
    from pldistill_cli.metrics import paired_comparison

    truth = ["a", "b"] * 20
    wrong = ["b" if t == "a" else "a" for t in truth]
    assert paired_comparison(truth, truth, wrong, n_boot=10)["p"] == 1 / 5001
    assert paired_comparison(truth, truth, wrong, n_boot=10, n_perm=99)["p"] == 1 / 100
    assert paired_comparison(truth, wrong, truth, n_boot=10, n_perm=99)["diff"] == -1.0


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

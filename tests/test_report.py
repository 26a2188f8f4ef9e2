"""The report's numbers on hand-made runs (recomputed independently), its plain-language diagnostics, its
statistics, and its HTML: rendered by markdown-it-py, self-contained, checked in a real browser."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pldistill_cli.layout import Layout
from pldistill_cli.metrics import classification_metrics, cluster_bootstrap_ua
from pldistill_cli.report import (MIN_SPEAKERS, PREDICTION_COLUMNS, Runs, _collect, _paired, _summary_row, _verdict,
                                   answer_stats, compare, comparison_notes, comparison_pairs, confusion_figure,
                                   detectable_cell, diagnostics, held_out_p_true, interval, latency_notes,
                                   predictions_table, render_html, repeated_timings, sanity_box, seed_averaged,
                                   speakers_needed, split_facts, table, trained_share)

LABELS = ("Happy", "Sad")
ROOT = Path(__file__).resolve().parents[1]


def _write_run(layout: Layout, fold: int, name: str, rows: list[tuple[str, str, str, str]]) -> None:
    """A run's outputs as evaluate writes them: predictions CSV and details (metrics from the CSV)."""
    frame = pd.DataFrame(rows, columns=["id", "speaker", "label", "prediction"])
    path = layout.predictions("d", fold, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    metrics = classification_metrics(frame["label"], frame["prediction"], LABELS)
    layout.details("d", fold, name).write_text(json.dumps({**metrics, "parameters": 100}))


@pytest.fixture
def hand_made(tmp_path):
    """Two folds x two seeds of one student: per run, two speakers x two clips."""
    layout = Layout(metrics_root=tmp_path)
    runs = []
    for fold in (1, 2):
        for seed, wrong in ((1, {"a"}), (2, {"a", "b", "c"})):
            name = f"student-x-s{seed}"
            rows = [(f"{fold}{c}", f"spk{fold}{c in 'cd'}", "Happy" if c in "ac" else "Sad", None) for c in "abcd"]
            rows = [(i, s, l, ("Sad" if l == "Happy" else "Happy") if i[-1] in wrong else l) for i, s, l, _ in rows]
            _write_run(layout, fold, name, rows)
            runs.append((fold, seed, name))
    return layout, runs


def test_summary_row_is_recomputed_from_the_predictions(hand_made):
    layout, runs = hand_made
    found = _collect(layout, "d", "x", runs)
    row = _summary_row(found, LABELS, seed=0, teacher_params=300)
    # per run: UA = mean recall of Happy (clips a, c) and Sad (b, d); seed 1 misses a, seed 2 misses a, b, c
    ua = {1: (0.5 + 1.0) / 2, 2: (0.0 + 0.5) / 2}
    per_run = [ua[seed] for _, seed, _ in runs]
    assert row[0] == "x" and row[1] == "100" and row[2] == "3.0x"
    assert row[4] == f"{np.mean(per_run):.3f} ± {np.std(per_run, ddof=1):.3f}"  # sample, not population, sd
    wa = [0.75, 0.25, 0.75, 0.25]  # one or three wrong of four
    assert row[3] == f"{np.mean(wa):.3f} ± {np.std(wa, ddof=1):.3f}"
    happy = np.mean([0, 1, 0, 0] * 2)  # a, c of each fold: seed 1 gets c, seed 2 gets neither
    sad = np.mean([1, 1, 0, 1] * 2)  # b, d: seed 1 both, seed 2 only d
    lo, hi = map(float, row[6].split("[")[1].rstrip("]").split(","))
    assert row[6].startswith(f"{(happy + sad) / 2:.3f}") and lo <= (happy + sad) / 2 <= hi
    assert row[7] == 4


def test_paired_rows_average_the_seeds_within_each_clip(hand_made):
    """Seed 1 misses clip a, seed 2 misses a, b and c: per clip the share of seeds right is a 0, b 1/2,
    c 1/2, d 1. Speaker spk{fold}False has a (Happy) and b (Sad): UA 1/4; spk{fold}True has c (Happy) and
    d (Sad): UA 3/4. Against an always-right baseline: d_s = -3/4, -1/4, -3/4, -1/4 over 4 speakers, one
    sign, so the exact sign-flip p is 2 / 2^4; 8 clips, not 16 (two seeds are not two clips)."""
    layout, runs = hand_made
    student = _collect(layout, "d", "x", runs)
    shares = seed_averaged(student).set_index("id")["correct"]
    assert shares.to_dict() == {"1a": 0.0, "1b": 0.5, "1c": 0.5, "1d": 1.0, "2a": 0.0, "2b": 0.5, "2c": 0.5, "2d": 1.0}
    baseline = Runs("ce", runs, student.details, student.predictions.assign(prediction=student.predictions["label"]))
    result = _paired(student, baseline, seed=0)
    assert result["diff"] == pytest.approx(-0.5) and result["p"] == 2 / 16
    assert (result["clips"], result["speakers"]) == (8, 4)


def _speaker_runs(name: str, rate: dict[str, float], seeds=(1,), speakers: int = 8, seed: int = 0) -> Runs:
    """A model's runs over `speakers` speakers (two per fold), 3 classes x 4 clips each; speaker s's
    clips are right with probability rate[s] (0.5 where not given)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(speakers):
        labels = ["a", "b", "c"] * 4
        for s in seeds:
            right = rng.random(12) < rate.get(f"s{k}", 0.5)
            frames.append(pd.DataFrame({"fold": k // 2 + 1, "seed": s, "id": [f"s{k}-{i}" for i in range(12)],
                                        "speaker": f"s{k}", "label": labels,
                                        "prediction": [l if r else "x" for l, r in zip(labels, right)]}))
    return Runs(name, [], [], pd.concat(frames, ignore_index=True))


def test_seeds_are_not_more_clips():
    """The same predictions copied as three seeds are the same evidence: the speaker-level p and interval
    are unchanged (pooling seeds as clips, as the report once did, made p smaller with every seed)."""
    one, base = _speaker_runs("x", {f"s{k}": 0.8 for k in range(8)}), _speaker_runs("ce", {}, seed=1)
    three = Runs("x", [], [], pd.concat([one.predictions.assign(seed=s) for s in (1, 2, 3)], ignore_index=True))
    assert _paired(three, base, seed=0) == _paired(one, base, seed=0)


def test_comparisons_are_each_student_with_ce_and_pl_distill_with_kd():
    assert comparison_pairs(["ce", "kd", "pl-distill"]) == [("kd", "ce"), ("pl-distill", "ce"), ("pl-distill", "kd")]
    assert comparison_pairs(["kd", "pl-distill", "ldist"]) == [("pl-distill", "kd")]
    assert comparison_pairs(["ce", "ldist"]) == [("ldist", "ce")] and comparison_pairs(["ce"]) == []


def test_holms_correction_decides_and_the_verdict_says_which_way():
    """kd is right on every clip of 8 speakers where ce guesses: 8 positive differences, p = 2/2^8, Holm
    over 3 comparisons 3 x 2/2^8 = 0.023: significant. pl-distill is kd on 6 speakers and ce on 2: against
    ce 6 positive differences and 2 zeros (a zero has no sign to flip), p = 2/2^6 = 0.031, below 5% alone
    but 2 x 0.031 = 0.0625 at Holm's second step: not significant. Against kd: 2 negative, p = 2/2^2."""
    ce = _speaker_runs("ce", {}, seeds=(1, 2))
    kd = _speaker_runs("kd", {f"s{k}": 1.0 for k in range(8)}, seeds=(1, 2))
    pl = Runs("pl-distill", [], [], ce.predictions.copy())
    pl.predictions.loc[pl.predictions["speaker"] < "s6", "prediction"] = pl.predictions["label"]
    found = {(a, b): r for a, b, r in compare({"teacher": ce, "ce": ce, "kd": kd, "pl-distill": pl}, seed=0)}
    assert list(found) == [("kd", "ce"), ("pl-distill", "ce"), ("pl-distill", "kd")]
    kd_ce, pl_ce, pl_kd = found.values()
    assert kd_ce["p"] == 2 / 256 and kd_ce["p_holm"] == pytest.approx(3 * 2 / 256)
    assert _verdict(kd_ce) == "significant (better)" and kd_ce["speakers"] == 8 and kd_ce["clips"] == 96
    assert pl_ce["diff"] > 0 and pl_ce["p"] == 2 / 64 < 0.05 and pl_ce["p_holm"] == pytest.approx(2 * 2 / 64)
    assert _verdict(pl_ce) == "not significant"
    assert pl_kd["diff"] < 0 and pl_kd["p"] == pl_kd["p_holm"] == 0.5 and _verdict(pl_kd) == "not significant"
    worse = {"diff": -0.1, "p_holm": 0.05}
    assert _verdict(worse) == "significant (worse)" and _verdict({**worse, "p_holm": 0.0501}) == "not significant"


def test_equal_ua_is_never_significant():
    """Two students with the same UA on every speaker but right on different clips: every d_s = 0, so
    p = 1 and the verdict is 'not significant'."""
    a = _speaker_runs("a", {})
    b = Runs("b", [], [], a.predictions.copy())
    b.predictions["id"] = b.predictions.groupby("speaker")["id"].transform(lambda ids: list(ids)[3:] + list(ids)[:3])
    b.predictions["label"] = a.predictions["label"]  # each clip keeps a's label; predictions moved three clips on
    result = compare({"ce": b, "a": a}, seed=0)[0][2]
    assert result["diff"] == 0 and result["p"] == 1.0 and _verdict(result) == "not significant"


def test_the_notes_say_when_nothing_can_be_significant():
    result = lambda n, detectable=0.1: {"speakers": n, "diff": 0.01, "p": 0.5, "p_holm": 1.0,  # noqa: E731
                                        "detectable": detectable, "min_p": 2 / 2 ** n}
    assert [speakers_needed(m) for m in (1, 3, 6)] == [6, 7, 8]  # 2/2^n <= 0.05 / m
    two = comparison_notes([("kd", "ce", result(2)), ("pl-distill", "kd", result(2))])
    assert two[0].startswith("No difference is significant at 5% after Holm's correction over the 2 comparisons")
    assert "2/2^2 = 0.500: no difference can be significant at 5% here, whatever the data" in two[1]
    assert "at least 6 speakers (7 for 2 comparisons" in two[1]
    assert detectable_cell(result(2)) == "none (2 speakers)" and detectable_cell(result(6, 0.0612)) == "0.061"
    six = comparison_notes([(m, "ce", result(6, d)) for m, d in (("kd", 0.2), ("ldist", 0.1), ("cka", 0.3))])
    assert "over 6 speakers: 0.100 (ldist − ce) to 0.300 (cka − ce)" in six[1]
    assert "2/2^6 = 0.031, and Holm's correction multiplies the smallest by 3" in six[2]
    assert "That takes at least 7 speakers" in six[2]
    mixed = comparison_notes([("kd", "ce", result(10)), ("pl-distill", "ce", result(2))])  # the fewer speakers rule
    assert "differences: 0.100 (the paired t" in mixed[1] and mixed[2].startswith("With 2 test speakers")
    ten = comparison_notes([("kd", "ce", result(10))])
    assert ten[0].startswith("No difference is significant at 5% (one comparison: nothing to correct)")
    assert len(ten) == 3 and ten[2].startswith("How: ") and "over 10 speakers: 0.100 (the paired t" in ten[1]


def test_the_predictions_table_has_the_columns_that_recompute_the_report(hand_made):
    layout, runs = hand_made
    student = _collect(layout, "d", "x", runs)
    teacher = Runs("teacher", [], [], student.predictions.query("seed == 1").assign(seed=None))
    frame = predictions_table("d", [teacher, student])
    assert tuple(frame.columns) == PREDICTION_COLUMNS and frame["model"].tolist() == ["teacher"] * 8 + ["x"] * 16
    text = frame.to_csv(index=False, lineterminator="\n")
    assert text.startswith("dataset,model,fold,seed,id,speaker,label,prediction\nd,teacher,1,,1a,spk1False,Happy,Sad\n")
    assert "d,x,1,2,1d,spk1True,Sad,Sad\nd,x,2,1,2a,spk2False,Happy,Sad\n" in text  # fold, then seed, then clip
    shuffled = [Runs(r.name, [], [], r.predictions.sample(frac=1, random_state=0)) for r in (teacher, student)]
    assert predictions_table("d", shuffled).to_csv(index=False, lineterminator="\n") == text  # the same bytes


def test_the_cluster_interval_resamples_speakers_not_clips():
    # speaker s0 is always right, s1 always wrong: resampling speakers gives UA anywhere from 0 to 1,
    # resampling clips a narrow interval around 0.5
    truth = ["a", "b"] * 20
    speakers = ["s0"] * 20 + ["s1"] * 20
    prediction = truth[:20] + [("b" if t == "a" else "a") for t in truth[20:]]
    lo, hi = cluster_bootstrap_ua(truth, prediction, speakers, seed=0)
    clip_lo, clip_hi = cluster_bootstrap_ua(truth, prediction, None, seed=0)
    assert (lo, hi) == (0.0, 1.0) and 0.3 < clip_lo < 0.5 < clip_hi < 0.7


def _epochs(*records: tuple[float, float, float]) -> list[dict]:
    """A distilled run's history: per epoch (0 = before training) its probed CKA and the projector's and
    KL's weighted gradient norms beside CE's (CE's gradient norm 2.0), and the epoch's mean terms."""
    return [{"epoch": e, "probe_cka": cka, "grad_ce": 2.0, "grad_projector": 2.0 * p, "grad_kl": 2.0 * k,
             **({"ce": 1.0 / (e + 1), "kl": 0.1} if e else {})} for e, (cka, p, k) in enumerate(records)]


def test_a_term_that_dies_after_the_first_epoch_is_named_inert():
    """Today's case (issue 22): the projector gradient falls from 0.49 of CE's to 0.04 at the evaluated
    epoch, CKA is 0.996 after the first epoch. The old rule took the larger of the start and end shares
    (0.49) and called the term alive; judged after the first epoch and at the evaluated epoch, it is inert.
    The last epochs, past the evaluated one, have recovered: they are not what was evaluated."""
    history = _epochs((0.8915, 0.49, 0.3), (0.996, 0.30, 0.4), *[(0.997, 0.2, 0.4)] * 5, (0.998, 0.04, 0.45),
                      *[(0.999, 0.5, 0.45)] * 6)
    rows, notes, inert = diagnostics({"pl-distill": [(history, 7)]}, attention_share=0.7)
    assert inert == ["pl-distill's projector term"]
    (note,) = notes
    assert note.startswith("pl-distill: the projector term is inert: ")
    assert "CKA is 0.9960 after the first epoch" in note and "CKA is 0.9980 at the evaluated epoch" in note
    assert "its gradient is 4.0% of CE's at the evaluated epoch (below 5%)" in note
    assert "after the first epoch (below" not in note  # 0.30 of CE's after epoch 1: that moment's CKA, not its share
    assert rows[0][:2] == ["pl-distill", "7"] and rows[0][3] == "0.8915 → 0.9960 → 0.9980"
    assert rows[0][5] == "0.49 → 0.30 → 0.04" and rows[0][6] == "0.30 → 0.40 → 0.45"
    assert rows[0][2] == f"{1 / 8:.3f}"  # CE at the evaluated epoch 7, not at the last (13)


def test_a_term_alive_where_it_is_judged_is_not_inert_whatever_the_last_epoch():
    alive = _epochs((0.6, 0.5, 0.3), (0.8, 0.4, 0.2), (0.85, 0.3, 0.2), (0.995, 0.01, 0.01))  # dies after epoch 2
    ce = [{"epoch": 0, "grad_ce": 1.0}, {"epoch": 1, "ce": 0.5, "grad_ce": 1.0}]
    rows, notes, inert = diagnostics({"pl-distill": [(alive, 2)], "ce": [(ce, 1)]}, attention_share=0.4)
    assert notes == [] and inert == []
    assert rows[0][5] == "0.50 → 0.40 → 0.30" and rows[1][3] == "- → - → -"
    # no selection recorded (no validation): the last epoch is the evaluated one, and there the term is dead
    _, notes, inert = diagnostics({"pl-distill": [(alive, None)]}, attention_share=0.4)
    assert inert == ["pl-distill's projector term", "pl-distill's KL term"]
    assert "CKA is 0.9950 at the evaluated epoch" in notes[0] and "1.0% of CE's at the evaluated epoch" in notes[1]


def test_the_judgement_averages_the_runs_of_a_method():
    """Two seeds: one projector share 0.02, one 0.10 at the evaluated epoch: mean 0.06, alive; with 0.02
    and 0.06 the mean 0.04 is inert."""
    run = lambda share: (_epochs((0.5, 0.5, 0.5), (0.6, 0.5, 0.5), (0.7, share, 0.5)), 2)  # noqa: E731
    assert diagnostics({"cka": [run(0.02), run(0.10)]}, 0.4)[2] == []
    assert diagnostics({"cka": [run(0.02), run(0.06)]}, 0.4)[2] == ["cka's projector term"]


def test_each_note_is_a_plain_sentence_that_states_its_conclusion():
    """README: 'a plain sentence for every mechanism that is inert': each note gives the numbers it rests on
    (computed here by hand) and says what follows from them, in full."""
    history = [{"epoch": 0, "probe_cka": 0.6, "grad_ce": 2.0, "grad_projector": 1.0, "grad_kl": 0.02},
               {"epoch": 1, "probe_cka": 0.8, "grad_ce": 2.0, "grad_projector": 1.0, "grad_kl": 0.01,
                "ce": 0.5, "kl": 0.004}]
    _, notes, _ = diagnostics({"kd": [(history, 1)]}, attention_share=0.97, soft_target=0.95)
    uniform, kl, confident = notes
    assert "97% of T" in uniform
    assert uniform.endswith("AW-CKA weights every step alike here, so it behaves as plain CKA.")
    # KL 0.004 at the evaluated epoch; its gradient 0.01 / 2.0 = 0.5% of CE's
    assert kl.startswith("kd: the KL term is inert: ") and "(0.0040; gradient 0.5% of CE's)" in kl
    assert kl.endswith("on its own training clips the teacher's targets carry little beyond the label.")
    assert "first token 0.95 on average" in confident
    assert confident.endswith("its soft targets are close to the one-hot label there.")


def test_the_teachers_answer_read_from_its_cached_top_k():
    """Logits over a 12-token vocabulary; labels begin with tokens 3, 5, 7 and 9 (two labels share 9).
    Cached: the top 6 log-probabilities at T = 2, as cache-teacher keeps them."""
    logits = np.array([4.0, 1.0, 0.5, 3.0, 0.1, 2.0, -1.0, 1.5, 0.2, 2.5, 0.0, -2.0])
    tempered = logits / 2 - np.log(np.exp(logits / 2).sum())
    top = np.argsort(-tempered)[:6]  # 0, 3, 9, 5, 7, 1: token 0 begins no label
    firsts = [3, 5, 7, 9, 9]
    found = answer_stats(top, tempered[top], 5, firsts, 2.0)
    at_one = np.exp(logits[[3, 5, 7, 9]])
    assert found["p_true"] == pytest.approx(at_one[1] / at_one.sum())  # temperature 1, among the labels
    assert found["soft_target"] == pytest.approx(np.exp(tempered[5]))
    assert found["off_labels"] == pytest.approx(1 - np.exp(tempered[[3, 5, 7, 9]]).sum())
    # a label's first token outside the top-k: the smallest cached log-probability stands in for it
    top = top[:4]  # 0, 3, 9, 5: 7 is gone
    found = answer_stats(top, tempered[top], 3, firsts, 2.0)
    stand_in = np.exp(2 * tempered[[3, 5, 5, 9]])  # 7's stand-in: 5's, the smallest kept
    assert found["p_true"] == pytest.approx(stand_in[0] / stand_in.sum())
    assert answer_stats(top, tempered[top], 7, firsts, 2.0)["soft_target"] == 0.0


def test_held_out_p_true_is_the_softmax_of_the_rank_scores():
    frame = pd.DataFrame({"label": ["Happy", "Sad"], "logp_Happy": [-1.0, -0.5], "logp_Sad": [-2.0, -3.0]})
    expected = np.mean([1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(2.5))])
    assert held_out_p_true(frame, LABELS) == pytest.approx(expected)
    assert np.isnan(held_out_p_true(frame.drop(columns="logp_Sad"), LABELS))  # generation scoring: no scores


def test_the_share_of_kl_positions_the_teacher_was_trained_on():
    stats = pd.DataFrame({"kl_positions": [99, 100], "answer_positions": [2, 3]})
    assert trained_share(stats, "pl-distill", "full") == pytest.approx(5 / 199)
    assert trained_share(stats, "kd", "full") == 1.0  # KD's KL is at the answer positions only
    assert trained_share(stats, "ldist", "lora") == 1.0  # a pretrained LM: every position
    assert np.isnan(trained_share(stats, "ce", "full"))


CLEAN = dict(chance=0.25, models={"teacher": 0.6, "ce": 0.55}, references={"duration": 0.3, "prosody": 0.4},
             test_speakers={1: 4, 2: 3}, not_independent=0, unknown_speakers=0, inert=[])


@pytest.mark.parametrize("planted, sentence", [
    ({"models": {"teacher": 0.29, "ce": 0.55}}, "**At chance**: teacher (UA 0.290) is within 0.05 of chance (0.250)"),
    ({"models": {"teacher": 0.40, "ce": 0.35}}, "**A shortcut wins**: the prosody reference (UA 0.400) scores at "
                                                 "least as well as every model (best: teacher, 0.400)"),
    ({"test_speakers": {1: 4, 2: 2}}, "**Too few test speakers**: fold 2 (2) tests fewer than 3 speakers"),
    ({"not_independent": 40}, "**Folds not speaker-independent**: the manifest marks 40 clips "
                              "`speaker_independent: false`"),
    ({"not_independent": 40, "unknown_speakers": 40}, "40 clips have no known speaker"),
    ({"inert": ["pl-distill's projector term"]}, "**Inert distillation term**: pl-distill's projector term"),
])
def test_the_sanity_box_names_each_planted_cause(planted, sentence):
    box = "\n".join(sanity_box(**{**CLEAN, **planted}))
    assert box.startswith("> **Read this first**") and sentence in box
    assert box.count("> - ") == 1  # only the planted cause
    assert "Sanity checks" not in box


def test_a_clean_dataset_gets_one_line_and_the_fixes_are_named():
    assert sanity_box(**CLEAN)[0].startswith("> **Sanity checks**: every model is above chance")
    box = " ".join(sanity_box(**{**CLEAN, "unknown_speakers": 3, "not_independent": 3}))
    assert "`--speaker-pattern REGEX`" in box and "`speaker` column" in box


def test_split_facts_read_the_manifest():
    manifest = pd.DataFrame({"fold": [1, 1, 1, 2, 2, 3], "speaker": ["a", "b", "c", "d", "unknown", "e"],
                             "speaker_independent": [True, True, True, False, False, True]})
    assert split_facts(manifest, [1, 2, 4]) == ({1: 3, 2: 2, 4: 0}, 2, 1)


def test_an_interval_from_too_few_speakers_is_not_given(hand_made):
    assert interval(0.437, 0.438, 2) == "n/a (2 speakers)" and interval(0, 0, 1) == "n/a (1 speaker)"
    assert interval(0.4, 0.5, MIN_SPEAKERS) == "[0.400, 0.500]"
    layout, runs = hand_made
    pooled = _summary_row(_collect(layout, "d", "x", runs), LABELS, seed=0, teacher_params=None)[6]
    one_fold = _summary_row(_collect(layout, "d", "x", runs[:2]), LABELS, seed=0, teacher_params=None)[6]
    assert pooled.count("[") == 1 and one_fold.endswith("n/a (2 speakers)")  # folds 1 and 2 pool 4 speakers


def test_latency_is_called_noisy_when_its_spread_covers_the_difference():
    assert latency_notes({"teacher": [3.0], "ce": [1.0]})[0].startswith("Each model was timed once")
    assert latency_notes({"teacher": [3.0, 3.1, 3.2], "ce": [1.0, 1.1, 1.05]}) == []
    noisy = latency_notes({"teacher": [3.0, 3.1, 30.0], "ce": [1.0, 1.1, 1.05]})
    assert noisy[0].startswith("Latency is noisy") and "teacher and ce" in noisy[0]
    assert "teacher 3.10 ms, spread 27.00" in noisy[0] and "timings of teacher vary" in noisy[1]
    assert repeated_timings([{"encoder_ms": 1, "llm_ms": 2, "repeats": [{"encoder_ms": 1, "llm_ms": 2},
                                                                        {"encoder_ms": 3, "llm_ms": 4}]},
                             {"encoder_ms": 5, "llm_ms": 6}]) == ([1, 3, 5], [2, 4, 6])


def test_the_confusion_matrices_are_legible_at_the_pages_width():
    """Five models of eight classes: no wider than the page (1100 px: shown at full size), counts in 9 pt
    or larger, and every label inside the picture (none clipped)."""
    labels = ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear", "Calm")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"label": rng.choice(labels, 400), "prediction": rng.choice(labels, 400)})
    fig = confusion_figure({n: frame for n in ("teacher", "ce", "kd", "pl-distill", "prosody")}, labels, "d", [1])
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    assert width <= 1100
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes if ax.get_visible() for t in ax.texts]
    assert len(texts) == 5 * 64 and min(t.get_fontsize() for t in texts) >= 9
    shown = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text() and a.get_visible())]
    assert any(t.get_text() == "predicted" for t in shown)
    for t in shown:
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, t.get_text()


def test_a_pipe_in_a_cell_stays_in_its_cell():
    page = render_html("\n".join(table([["a | b", 1]], ["model", "n"])), Path("."))
    assert page.count("<td>") == 2 and "<td>a | b</td>" in page


def test_the_page_is_self_contained_and_renders_in_a_real_browser(tmp_path):
    pytest.importorskip("playwright", reason="no headless browser check: `pip install playwright` for it")
    if shutil.which("chromium") is None:
        pytest.skip("no headless browser check: Debian's chromium is not installed (`apt-get install chromium`)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    (tmp_path / "figures").mkdir()
    fig.savefig(tmp_path / "figures" / "plot.png")
    markdown = "\n".join(["# r", "", *table([["x|y", 1]], ["m", "n"]), "", "![a plot](figures/plot.png)"])
    page = tmp_path / "report.html"
    page.write_text(render_html(markdown, tmp_path))
    shutil.rmtree(tmp_path / "figures")  # the page must not need its figure files
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report_html.py"), str(page),
                             str(tmp_path / "shot.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 images, 0 broken, 0 external requests" in result.stdout

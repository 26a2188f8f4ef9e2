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
from pldistill_cli.metrics import classification_metrics, cluster_bootstrap_ua, paired_comparison
from pldistill_cli.report import Runs, _collect, _paired, _summary_row, _verdict, diagnostics, render_html, table

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


def test_paired_rows_pair_the_same_clips_of_the_same_fold_and_seed(hand_made):
    layout, runs = hand_made
    student = _collect(layout, "d", "x", runs)
    baseline = Runs("ce", runs, student.details, student.predictions.assign(prediction=student.predictions["label"]))
    result = _paired(student, baseline, seed=0)
    truth = student.predictions["label"]
    expected = (classification_metrics(truth, student.predictions["prediction"], LABELS)["ua"] - 1.0)
    assert result["n"] == 16 and result["clusters"] == 4 and result["diff"] == pytest.approx(expected)


def test_paired_comparison_statistics():
    rng = np.random.default_rng(0)
    truth = list(rng.choice(["a", "b", "c"], 300))
    speakers = list(rng.choice([f"s{i}" for i in range(10)], 300))
    good = [t if rng.random() < 0.8 else "a" for t in truth]
    bad = [t if rng.random() < 0.4 else "a" for t in truth]
    result = paired_comparison(truth, good, bad, speakers, seed=1)
    ua = lambda p: classification_metrics(truth, p, ("a", "b", "c"))["ua"]  # noqa: E731
    assert result["diff"] == pytest.approx(ua(good) - ua(bad)) and result["p"] < 0.01
    assert result["ci95"][0] > 0 and result["clusters"] == 10
    flipped = paired_comparison(truth, bad, good, speakers, seed=1)
    assert flipped["diff"] == pytest.approx(-result["diff"]) and flipped["p"] == pytest.approx(result["p"])
    same = paired_comparison(truth, good, good, speakers, seed=1)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["ci95"] == (0.0, 0.0)


def test_the_cluster_interval_resamples_speakers_not_clips():
    # speaker s0 is always right, s1 always wrong: resampling speakers gives UA anywhere from 0 to 1,
    # resampling clips a narrow interval around 0.5
    truth = ["a", "b"] * 20
    speakers = ["s0"] * 20 + ["s1"] * 20
    prediction = truth[:20] + [("b" if t == "a" else "a") for t in truth[20:]]
    lo, hi = cluster_bootstrap_ua(truth, prediction, speakers, seed=0)
    clip_lo, clip_hi = cluster_bootstrap_ua(truth, prediction, None, seed=0)
    assert (lo, hi) == (0.0, 1.0) and 0.3 < clip_lo < 0.5 < clip_hi < 0.7


def test_diagnostics_say_when_a_term_is_inert():
    inert = [[{"epoch": 0, "probe_cka": 0.996, "grad_ce": 1.0, "grad_projector": 0.004, "grad_kl": 0.2},
              {"epoch": 1, "probe_cka": 0.999, "grad_ce": 1.0, "grad_projector": 0.001, "grad_kl": 0.001,
               "ce": 0.5, "kl": 0.004, "cka": 0.999}]]
    alive = [[{"epoch": 0, "probe_cka": 0.6, "grad_ce": 1.0, "grad_projector": 0.5, "grad_kl": 0.3},
              {"epoch": 1, "probe_cka": 0.8, "grad_ce": 1.0, "grad_projector": 0.4, "grad_kl": 0.2,
               "ce": 0.5, "kl": 0.3, "cka": 0.8}]]
    rows, notes = diagnostics({"pl-distill": inert}, attention_share=0.99, confidence=0.5)
    assert rows[0][2:5] == ["0.9960", "0.9990", "0.0040"] and rows[0][5] == "0.00 → 0.00"
    text = " ".join(notes)
    assert "nearly uniform" in text and "projector term is inert" in text and "KL term is near zero" in text
    rows, notes = diagnostics({"pl-distill": alive}, attention_share=0.4, confidence=0.5)
    assert notes == [] and rows[0][5] == "0.50 → 0.40"


def test_each_note_is_a_plain_sentence_that_states_its_conclusion():
    """README: 'a plain sentence for every mechanism that is inert': each note gives the numbers it rests on
    (computed here by hand) and says what follows from them, in full."""
    history = [[{"epoch": 0, "probe_cka": 0.6, "grad_ce": 2.0, "grad_projector": 1.0, "grad_kl": 0.02},
                {"epoch": 1, "probe_cka": 0.8, "grad_ce": 2.0, "grad_projector": 1.0, "grad_kl": 0.01,
                 "ce": 0.5, "kl": 0.004}]]
    _, notes = diagnostics({"kd": history}, attention_share=0.97, confidence=0.95)
    uniform, kl, confident = notes
    assert "97% of T" in uniform
    assert uniform.endswith("AW-CKA weights every step alike here, so it behaves as plain CKA.")
    # KL 0.004 at the end; its gradient 0.01 / 2.0 = 0.5% of CE's
    assert kl.startswith("kd: ") and "(0.0040; gradient 0.5% of CE's)" in kl
    assert kl.endswith("on its own training clips the teacher's targets carry little beyond the label.")
    assert "p(true label) 0.95 on average" in confident
    assert confident.endswith("its soft targets are close to the one-hot label there.")
    assert all(n[0].isupper() or n.startswith("kd: ") for n in notes)


def test_equal_ua_is_never_significant():
    """Two students with the same UA but right on different clips: d = 0, so every swap's |d*| >= |d| and
    p = 1; the verdict is 'not significant' whatever the interval."""
    truth = ["a", "a", "b", "b"] * 5
    first = ["a", "b", "b", "b"] * 5  # recall of a 1/2 (first clip), of b 1
    second = ["b", "a", "b", "b"] * 5  # recall of a 1/2 (second clip), of b 1
    result = paired_comparison(truth, first, second, n_boot=50, n_perm=200)
    assert result["diff"] == 0 and result["p"] == 1.0
    assert _verdict(result) == "not significant"


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

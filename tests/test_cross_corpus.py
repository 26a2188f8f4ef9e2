"""Cross-corpus evaluation (EmoBox's cross-corpus track): a fold's models, trained on one corpus, scored on a SAVEE
fixture tree's test split of the same fold, on the labels the two share, with a label map the user sets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from pldistill_cli.config import CorpusParams, CrossCorpus, PreprocessParams
from pldistill_cli.datasets import CORPORA
from pldistill_cli.errors import PldistillError
from pldistill_cli.layout import Layout
from pldistill_cli.scoring import Scored

SAVEE = {"JE": 1, "KL": 2, "DC": 3, "JK": 4}  # EmoBox's test speaker -> fold
CODES = {"a": "Angry", "d": "Disgust", "f": "Fear", "h": "Happy", "n": "Neutral", "sa": "Sad", "su": "Surprise"}


def savee_tree(root: Path) -> None:
    """Every SAVEE speaker says each emotion code once, under the corpus's own names (half-second tones)."""
    for k, speaker in enumerate(SAVEE):
        for j, code in enumerate(CODES):
            t = np.arange(22050) / 44100
            path = root / "AudioData" / speaker / f"{code}01.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, 0.3 * np.sin(2 * np.pi * (120 + 20 * j + 5 * k) * t), 44100)


@pytest.fixture(scope="module")
def scored_on_savee(prepared, tiny_teacher, tmp_path_factory):
    """The synthetic fixture's fold 1 with an (untrained) teacher and student saved as train-teacher and distill
    save them, SAVEE prepared beside it, and both models scored on SAVEE's fold 1 with Neutral renamed Calm."""
    from pldistill_cli.evaluate import evaluate_model
    from pldistill_cli.models import StudentMeta, TeacherMeta, save_model
    from pldistill_cli.preprocess import preprocess
    from pldistill_cli.prompt import PromptLayout

    params, shared = prepared
    root = tmp_path_factory.mktemp("cross")
    layout = Layout(data=root / "data", metrics_root=root / "metrics")
    (layout.data / "prepared").mkdir(parents=True)
    layout.prepared("synthetic").symlink_to(shared.prepared("synthetic"))
    savee_tree(root / "SAVEE")
    params = dataclasses.replace(
        params, corpora={**params.corpora, "savee": CorpusParams(adapter="savee", root=str(root / "SAVEE"))},
        preprocess=PreprocessParams(workers=1),
        cross_corpus=(CrossCorpus(train="synthetic", test="savee", label_map={"Neutral": "Calm"}),))
    preprocess("savee", params, layout)
    model, processor = tiny_teacher
    labels = CORPORA["synthetic"].labels
    common = dict(dataset="synthetic", fold=1, labels=labels, prompt=PromptLayout.from_processor(processor, labels).text,
                  preset="tiny", seed=42, params={}, versions={})
    save_model(model, processor, layout.teacher("synthetic", 1), TeacherMeta(**common, mode="full"))
    save_model(model, processor, layout.student("synthetic", 1, "student-kd-s42"), StudentMeta(
        **common, method="kd", cache={}, teacher={"path": "teacher", "weights": "f00d"}))
    teacher = evaluate_model("synthetic", 1, "teacher", params, layout, on="savee")
    student = evaluate_model("synthetic", 1, "student", params, layout, "kd", 42, on="savee")
    return params, layout, teacher, student


def test_models_are_scored_on_the_other_corpus_on_the_labels_the_two_share(scored_on_savee):
    params, layout, teacher, student = scored_on_savee
    # SAVEE's fold 1 tests speaker JE: 7 clips, Neutral renamed Calm; synthetic's prompt order, Neutral left out
    shared = ("Happy", "Sad", "Angry", "Disgust", "Surprise", "Fear", "Calm")
    for name, details in (("teacher", teacher), ("student-kd-s42", student)):
        assert tuple(details["labels"]) == shared and details["n"] == 7 and details["on"] == "savee"
        assert details["dataset"] == "synthetic" and details["speakers"] == 1
        written = json.loads(layout.metrics("synthetic", 1, name, "savee").read_text())["test"]
        assert written["ua"] == pytest.approx(details["ua"], abs=1e-6)
        rows = pd.read_csv(layout.predictions("synthetic", 1, name, "savee"))
        assert sorted(rows["label"]) == sorted(shared) and set(rows["prediction"]) <= set(shared)
        assert [c.removeprefix("logp_") for c in rows.columns if c.startswith("logp_")] == list(shared)
        # the answer is the best-scored shared label
        best = rows[[f"logp_{w}" for w in shared]].to_numpy().argmax(1)
        assert list(rows["prediction"]) == [shared[j] for j in best]
    assert student["method"] == "kd" and teacher["method"] is None
    # the model's own fold keeps its files: nothing was written beside them
    assert not layout.metrics("synthetic", 1, "teacher").exists()
    assert not layout.latency("synthetic", 1, "teacher").exists()


def test_a_ranked_answer_is_the_best_shared_label_and_a_generated_one_outside_them_is_unmatched():
    from pldistill_cli.evaluate import among
    from pldistill_cli.metrics import UNMATCHED

    labels, shared = ("Happy", "Sad", "Calm"), ("Happy", "Sad")
    ranked = Scored(["Calm", "Calm"], np.array([[-2.0, -3.0, -0.1], [-5.0, -1.0, -0.2]]), None, 1.0, 1.0)
    kept = among(ranked, labels, shared)
    assert kept.predictions == ["Happy", "Sad"] and kept.scores.tolist() == [[-2.0, -3.0], [-5.0, -1.0]]
    generated = Scored(["Calm", "Sad", UNMATCHED], None, ["Calm", "Sad", "hm"], 1.0, 1.0)
    assert among(generated, labels, shared).predictions == [UNMATCHED, "Sad", UNMATCHED]


def test_a_label_map_naming_a_missing_label_or_too_few_shared_labels_is_one_line(scored_on_savee):
    from pldistill_cli.evaluate import cross_corpus_test

    params, layout, _, _ = scored_on_savee
    with_map = lambda label_map: dataclasses.replace(  # noqa: E731
        params, cross_corpus=(CrossCorpus(train="synthetic", test="savee", label_map=label_map),))
    with pytest.raises(PldistillError, match=r"label_map: maps Joy to Happy, but savee's labels are Happy, Sad"):
        cross_corpus_test("synthetic", "savee", 1, with_map({"Joy": "Happy"}), layout)
    with pytest.raises(PldistillError, match=r"maps Neutral to Bored, .* map a label of savee to one of synthetic"):
        cross_corpus_test("synthetic", "savee", 1, with_map({"Neutral": "Bored"}), layout)
    # no entry for the pair: the same words (SAVEE's 7 labels are all synthetic's too)
    rows, shared = cross_corpus_test("synthetic", "savee", 1, dataclasses.replace(params, cross_corpus=()), layout)
    assert shared == ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear") and len(rows) == 7
    many_to_one = {word: "Happy" for word in CODES.values()}
    with pytest.raises(PldistillError, match=r"synthetic and savee share 1 label\(s\) in fold 1's test split \(Happy\)"):
        cross_corpus_test("synthetic", "savee", 1, with_map(many_to_one), layout)

"""pretrain-teacher: labelled emotional speech from the corpus's generator in voices and sentences that no fold
uses, a teacher pretrained on it, and fold teachers that start from it (or refuse a stale one)."""

from __future__ import annotations

import collections
import dataclasses
import shutil

import pytest
import torch

from pldistill_cli.config import PretrainTeacherParams, TrainTeacherParams
from pldistill_cli import synthesis as S
from pldistill_cli.errors import PldistillError
from pldistill_cli.models import pretrained_teacher
from pldistill_cli.pretrain_teacher import pretrain_teacher


def test_the_pool_shares_no_voice_or_sentence_with_the_corpus_and_is_balanced():
    plan = S.plan_emotion_pool(seed=3, n_voices=12, n_sentences=5)
    assert len(plan) == 12 * 8 * 5 and len({u.utt_id for u in plan}) == len(plan)
    assert {u.voice for u in plan} == set(S.PRETRAIN_VOICES[:12]) and not {u.voice for u in plan} & set(S.VOICES)
    assert {u.sentence for u in plan} <= set(S.PRETRAIN_SENTENCES) and not {u.sentence for u in plan} & set(S.SENTENCES)
    # every voice says every emotion equally often, and every sentence is spoken equally often
    assert set(collections.Counter((u.speaker, u.label) for u in plan).values()) == {5}
    assert set(collections.Counter(u.sentence for u in plan).values()) == {12 * 8 * 5 // 12}
    assert plan == S.plan_emotion_pool(seed=3, n_voices=12, n_sentences=5)
    assert plan[:40] == S.plan_emotion_pool(seed=3, n_voices=1, n_sentences=5)  # a voice's clips do not depend on the count
    assert plan[:40] != S.plan_emotion_pool(seed=4, n_voices=1, n_sentences=5)
    with pytest.raises(ValueError, match="n_voices must be between 1 and 84"):
        S.plan_emotion_pool(seed=3, n_voices=85, n_sentences=1)


@pytest.fixture(scope="module")
def pretrained(prepared, layout_beside):
    layout = layout_beside("prepared", "encoder")
    params = dataclasses.replace(prepared[0], pretrain_teacher=PretrainTeacherParams(
        voices=3, sentences=1, validation_voices=1, epochs=2, batch_size=8))
    return params, layout, pretrain_teacher(params, layout)


def test_the_teacher_is_pretrained_on_the_pool_and_saved(pretrained):
    _, layout, meta = pretrained
    assert meta.source == "pretrained" and meta.clips == 3 * 8 and meta.best_epoch in (1, 2)
    assert [h["epoch"] for h in meta.history] == [1, 2] and meta.validation_ua == pytest.approx(
        max(h["validation_ua"] for h in meta.history), abs=1e-4)
    again, weights = pretrained_teacher(layout.teacher_init(), "tiny", meta.encoder)
    assert again == meta and meta.weights and weights is not None and any(k.startswith("lm_head") for k in weights)


def test_a_fold_teacher_starts_from_the_pretrained_teacher(pretrained):
    from pldistill_cli.models import build_teacher, get_preset
    from pldistill_cli.train_teacher import train_teacher

    params, layout, meta = pretrained
    _, weights = pretrained_teacher(layout.teacher_init(), "tiny", meta.encoder)
    run = dataclasses.replace(params, train_teacher=TrainTeacherParams(epochs=1, batch_size=8, lr=1e-12))
    made = train_teacher("synthetic", 1, run, layout)
    assert made.params["init"] == {"source": "pretrained", "weights": meta.weights}
    # at a learning rate of 1e-12 one epoch leaves the pretrained weights as they were; a random start differs
    from pldistill_cli.models import load_model

    model, _ = load_model(layout.teacher("synthetic", 1))
    state = model.state_dict()
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in weights.items())
    random = build_teacher(get_preset("tiny"), params.seed)[0].state_dict()
    assert not torch.allclose(random["lm_head.weight"], weights["lm_head.weight"])


def test_a_stale_or_foreign_pretrained_teacher_is_refused(pretrained):
    _, layout, meta = pretrained
    with pytest.raises(PldistillError, match="pretrained for model.preset tiny, not small; run `pldistill pretrain-teacher`"):
        pretrained_teacher(layout.teacher_init(), "small", meta.encoder)
    with pytest.raises(PldistillError, match="another encoder than data/encoder's; run `pldistill pretrain-teacher`"):
        pretrained_teacher(layout.teacher_init(), "tiny", "0" * 16)


def test_with_nothing_to_pretrain_the_record_says_which_and_holds_no_weights(prepared, tmp_path):
    """voices 0 keeps the preset's random start (the small test params); model.preset hub's checkpoint comes
    pretrained. Either way train-teacher reads a record without weights and starts as it did before."""
    params, layout = prepared
    meta, weights = pretrained_teacher(layout.teacher_init(), "tiny", None)
    assert (meta.source, weights, meta.params["voices"]) == ("random", None, 0)
    hub = dataclasses.replace(params, model=dataclasses.replace(params.model, preset="hub"),
                              pretrain_teacher=PretrainTeacherParams())
    here = dataclasses.replace(layout, data=tmp_path)
    assert pretrain_teacher(hub, here).source == "checkpoint"
    meta, weights = pretrained_teacher(here.teacher_init(), "hub", None)
    assert (meta.source, weights, meta.params["voices"]) == ("checkpoint", None, 84)


def test_a_missing_broken_or_truncated_record_is_one_line_that_names_the_stage(pretrained, tmp_path):
    _, layout, meta = pretrained
    with pytest.raises(PldistillError, match=r"no pldistill.json; not a pldistill pretrained teacher folder "
                                             r"\(run `pldistill pretrain-teacher`"):
        pretrained_teacher(tmp_path / "teacher-init", "tiny", meta.encoder)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pldistill.json").write_text('{"source": "pretrained"}')
    with pytest.raises(PldistillError, match="not a valid pretrained teacher description; re-run `pldistill pretrain-teacher`"):
        pretrained_teacher(tmp_path / "broken", "tiny", meta.encoder)
    truncated = tmp_path / "truncated"
    shutil.copytree(layout.teacher_init(), truncated)
    weights = truncated / "teacher.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PldistillError, match="unreadable model files"):
        pretrained_teacher(truncated, "tiny", meta.encoder)


def test_too_few_voices_for_the_held_out_ones_is_refused_before_any_work(prepared, tmp_path):
    params, layout = prepared
    params = dataclasses.replace(params, pretrain_teacher=PretrainTeacherParams(voices=2, validation_voices=2))
    with pytest.raises(PldistillError, match=r"pretrain_teacher.validation_voices \(2\) must be fewer than "
                                             r"pretrain_teacher.voices \(2\)"):
        pretrain_teacher(params, dataclasses.replace(layout, data=tmp_path))
    assert not any(tmp_path.iterdir())

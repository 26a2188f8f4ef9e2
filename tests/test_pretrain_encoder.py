"""pretrain-encoder: emotion-free speech that no fold has heard, pooled statistics over real steps only,
and a teacher that starts from (and, frozen, keeps) the pretrained encoder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pldistill_cli.config import PretrainEncoderParams, TrainTeacherParams
from pldistill_cli import synthesis as S
from pldistill_cli.errors import PldistillError
from pldistill_cli.models import ModelMeta, load_encoder, pretrained_encoder
from pldistill_cli.pretrain_encoder import pooled, pretrain_encoder


def test_pretraining_speech_shares_no_voice_or_sentence_with_the_corpus_and_every_voice_speaks():
    plan = S.plan_pretraining(seed=3, n_clips=400)
    assert not set(S.PRETRAIN_VOICES) & set(S.VOICES) and not set(S.PRETRAIN_SENTENCES) & set(S.SENTENCES)
    assert {u.voice for u in plan} <= set(S.PRETRAIN_VOICES) and {u.sentence for u in plan} <= set(S.PRETRAIN_SENTENCES)
    assert {u.label for u in plan} == {""} and len({u.voice for u in plan}) > 40
    assert plan == S.plan_pretraining(seed=3, n_clips=400) and plan[:5] != S.plan_pretraining(seed=4, n_clips=5)
    assert plan[:7] == S.plan_pretraining(seed=3, n_clips=7)  # a clip's draw does not depend on the count
    # every voice is one espeak-ng knows (a misspelt one raises) and speaks
    for voice in S.PRETRAIN_VOICES:
        wave, _ = S.synthesize(dataclasses.replace(plan[0], voice=voice, utt_id=f"voice-{voice}"))
        assert np.abs(wave).max() > 0.01, voice


def test_prosody_targets_are_the_drawn_settings():
    utt = dataclasses.replace(S.plan_pretraining(seed=0, n_clips=1)[0], volume=100, gain_db=-6.0, ending="?")
    values, tune = S.prosody_targets(utt)
    assert dict(zip(S.PROSODY_TARGETS, values)) == pytest.approx(dict(
        rate=utt.rate, pitch=utt.pitch, range=utt.pitch_range, loudness=40.0 - 6.0, gap=utt.word_gap,
        breathiness=utt.breathiness, tilt=utt.tilt))
    assert tune == 2


def test_pooled_statistics_see_real_steps_only():
    torch.manual_seed(0)
    hidden, lengths = torch.randn(3, 9, 5), torch.tensor([9, 4, 6])
    padded = hidden.clone()
    for i, n in enumerate(lengths.tolist()):
        padded[i, n:] = 1e3  # whatever padding holds must not count
    out = pooled(padded, lengths)
    for i, n in enumerate(lengths.tolist()):
        x = hidden[i, :n].double()
        expected = torch.cat([x.mean(0), x.std(0, unbiased=False), x.amax(0), x[(3 * n) // 4:].mean(0)])
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pretrained(prepared, layout_beside):
    layout = layout_beside("prepared", "teacher-init")
    params = dataclasses.replace(prepared[0], pretrain_encoder=PretrainEncoderParams(clips=96, epochs=6, batch_size=8))
    return params, layout, pretrain_encoder(params, layout)


def test_the_encoder_learns_to_hear_loudness(pretrained):
    """96 clips and 6 epochs are enough to beat a constant guess clearly on the easiest setting
    (targets misaligned with their clips, or pooling over padding, leave R^2 at or below 0)."""
    _, layout, meta = pretrained
    assert meta.source == "pretrained" and set(meta.held_out) == {*S.PROSODY_TARGETS, "tune"}
    assert meta.held_out["loudness"] > 0.25, meta.held_out
    scores = [h["held_out_r2"] for h in meta.history]
    assert len(scores) == 6 and scores[meta.best_epoch - 1] == max(scores) > scores[0]
    again, weights = pretrained_encoder(layout.encoder(), "tiny")
    assert again == meta and meta.weights and weights is not None  # what it returned is what it saved


def test_a_teacher_starts_from_the_pretrained_encoder_and_keeps_it_frozen(pretrained):
    from pldistill_cli.train_teacher import train_teacher

    params, layout, _ = pretrained
    saved_meta, weights = pretrained_encoder(layout.encoder(), "tiny")
    for setting, kept in (("frozen", True), ("trained", False)):
        run = dataclasses.replace(params, train_teacher=TrainTeacherParams(epochs=1, batch_size=8, encoder=setting))
        made = train_teacher("synthetic", 1, run, layout)
        assert made.params["encoder"] == {"source": "pretrained", "weights": saved_meta.weights}
        _, saved, _ = load_encoder(layout.teacher("synthetic", 1))
        same = all(torch.equal(saved[k], v) for k, v in weights.items())
        assert same == kept, setting
    assert ModelMeta.read(layout.teacher("synthetic", 1)).params["train_teacher"]["encoder"] == "trained"


def test_an_encoder_pretrained_for_another_preset_is_refused(pretrained):
    _, layout, _ = pretrained
    with pytest.raises(PldistillError, match="pretrained for model.preset tiny, not small; run `pldistill pretrain-encoder`"):
        pretrained_encoder(layout.encoder(), "small")

"""pretrain-teacher: the teacher that every fold's teacher of a preset built from configs starts from.

In the paper the teacher, Qwen2-Audio-7B, was pretrained on far more (emotional) speech than any fold holds
before it was fine-tuned; a preset's teacher is random, and trained on one fold's 288 clips it knows no more
than a student trained on the same labels. So first it learns the task on a labelled pool of emotional speech
that shares no voice and no sentence with any fold: the corpus's own generator (synthesis.plan_emotion_pool:
the same emotions, prosody offsets, spread and speaker baselines) speaking `voices` of PRETRAIN_VOICES and
`sentences` of PRETRAIN_SENTENCES, voices x 8 emotions x sentences clips. The teacher (the pretrained encoder,
frozen, and the preset's random LLM) learns, as train-teacher does, the answer tokens of the prompt

    L = -(1/|A|) sum_{p in A} log p_theta(x_{p+1} | x_{<=p}),   A = the answer positions,

and the epoch kept is the one with the best UA on the last `validation_voices` voices (held out: whole
speakers, as a fold's validation split is). train-teacher then fine-tunes it on the fold's training split.
With model.preset hub the checkpoint is the pretrained teacher and this stage only records that;
`pretrain_teacher.voices: 0` keeps the random start."""

from __future__ import annotations

import functools

import pandas as pd
import torch

from .config import Params, fingerprint
from .data import AudioBatch, Clips, text_batch
from .errors import PldistillError
from .families import family_of
from .forward import audio_features, encode_audio, forward_from_encoder
from .layout import Layout
from .losses import answer_cross_entropy
from .metrics import classification_metrics
from .models import (TeacherInitMeta, begin_pretraining, build_teacher, environment, get_preset, pretrained_encoder,
                     save_pretrained)
from .scoring import predict_clips
from .synthesis import LABELS, plan_emotion_pool, render_features
from .training import LoopResult, LoopSettings, Run, TrainingStep, autocast, fit, resolve_device, seed_everything, \
    shuffled_batches
from .ui import console, progress


class _PoolClips(Clips):
    """Clips whose log-mels `processor` computed from rendered audio in memory (no files): rows need `label`
    and `duration` only."""

    def __init__(self, rows: pd.DataFrame, features: torch.Tensor, feature_mask: torch.Tensor, processor):
        self.rows, self.features, self.feature_mask = rows.reset_index(drop=True), features, feature_mask
        self.processor = processor


def pretrain_teacher(params: Params, layout: Layout = Layout()) -> TeacherInitMeta:
    p, preset, device = params.pretrain_teacher, params.model.preset, resolve_device(params.pretrain_teacher.device)
    made_by, skipped = begin_pretraining(TeacherInitMeta, params, layout.teacher_init(), device)
    if skipped is not None:
        return skipped
    if p.validation_voices >= p.voices:
        raise PldistillError(f"params.yaml: pretrain_teacher.validation_voices ({p.validation_voices}) must be fewer "
                             f"than pretrain_teacher.voices ({p.voices})")
    encoder, encoder_weights = pretrained_encoder(layout.encoder(), preset)
    labels = LABELS
    plan = plan_emotion_pool(params.seed, p.voices, p.sentences)
    seed_everything(params.seed)
    model, processor = build_teacher(get_preset(preset), params.seed)
    if encoder_weights is not None:
        family_of(model).encoder(model).load_state_dict(encoder_weights)
    family_of(model).encoder(model).requires_grad_(False)  # as train-teacher's default (train_teacher.encoder: frozen)
    model.to(device)
    prompt = family_of(processor, "processor").prompt(processor, labels)
    with progress("synthesise the teacher's pretraining speech", len(plan)) as bar:
        features, feature_mask, durations = render_features(plan, processor.feature_extractor.sampling_rate,
                                                            functools.partial(audio_features, processor), bar.advance)
    rows = pd.DataFrame({"speaker": [u.speaker for u in plan], "label": [u.label for u in plan],
                         "duration": durations})
    held = set(sorted(set(rows["speaker"]))[-p.validation_voices:])
    is_held = torch.tensor(rows["speaker"].isin(held).to_numpy())
    train = _PoolClips(rows[~is_held.numpy()], features[~is_held], feature_mask[~is_held], processor)
    validation = _PoolClips(rows[is_held.numpy()], features[is_held], feature_mask[is_held], processor)
    console.print(f"teacher ({preset}) pretraining: {len(train)} clips of {p.voices - p.validation_voices} voices, "
                  f"{len(validation)} of {p.validation_voices} held out")

    def terms(batch: AudioBatch) -> dict[str, torch.Tensor]:
        text = text_batch(prompt, batch.n_audio.tolist(), train.rows["label"].iloc[batch.rows].tolist()).to(device)
        with autocast(device):
            encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
            hidden, _, _ = forward_from_encoder(model, encoded, lengths, text.input_ids, text.attention_mask,
                                                logits=False)
            return {"loss": answer_cross_entropy(hidden, model.get_output_embeddings(), text.input_ids,
                                                 text.answer_mask)}

    def validate() -> float:
        predictions = predict_clips(model, processor.tokenizer, prompt, validation, list(range(len(validation))),
                                    p.batch_size, device, "validate").predictions
        return classification_metrics(validation.rows["label"].tolist(), predictions, labels)["ua"]

    batches = lambda epoch: train.loader(shuffled_batches(len(train), p.batch_size, params.seed + epoch))

    def save(result: LoopResult, _refit: None, _write: bool) -> TeacherInitMeta:
        meta = TeacherInitMeta(source="pretrained", versions=environment(device), encoder=encoder.weights,
                               labels=labels, clips=len(plan), validation_ua=round(result.best_score, 4),
                               best_epoch=result.best_epoch, history=tuple(result.history), **made_by)
        return save_pretrained(layout.teacher_init(), {k: v.cpu() for k, v in model.state_dict().items()}, meta)

    run = Run(TrainingStep({"teacher": model}, terms), batches, -(-len(train) // p.batch_size))
    meta = fit(run, validate, LoopSettings.of(p), layout.work(None, None, "pretrain-teacher"),
               fingerprint({**made_by, "encoder": encoder.weights}), "pretrain teacher", save)
    console.print(f"teacher: pretrained on {len(train)} clips; held-out voices' UA {meta.validation_ua:.3f} "
                  f"at epoch {meta.best_epoch}")
    return meta

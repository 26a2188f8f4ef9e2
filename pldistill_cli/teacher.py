"""train-teacher: train the teacher on a fold's training split, keep the best on validation."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .config import Params, fingerprint
from .data import AudioClips, AudioCollate, text_batch
from .evaluation import classification_metrics, predict_audio
from .forward import PromptLayout, encode_audio, forward_from_encoder
from .layout import Layout
from .losses import answer_cross_entropy
from .manifest import manifest_labels, read_manifest, select_split
from .models import build_teacher, count_parameters, get_preset, save_model
from .training import LoopSettings, autocast, finish_work, resolve_device, seed_everything, train_with_validation
from .ui import console


def train_teacher(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> dict:
    labels = manifest_labels(layout.manifest(dataset))
    manifest = read_manifest(layout.manifest(dataset))
    train = select_split(manifest, fold, "train")
    validation = select_split(manifest, fold, "validation")
    p = params.train_teacher
    seed_everything(params.seed)
    preset = get_preset(params.model.preset)
    model, processor = build_teacher(preset, params.seed)
    device = resolve_device(p.device)
    model.to(device)
    prompt = PromptLayout.from_processor(processor, labels)
    console.print(f"teacher ({preset.name}): {count_parameters(model):,} parameters; "
                  f"{len(train)} train / {len(validation)} validation clips")

    clips = AudioClips(train)
    collate = AudioCollate(processor)

    def batches(epoch: int):
        shuffle = torch.Generator().manual_seed(params.seed + epoch)
        return DataLoader(clips, batch_size=p.batch_size, shuffle=True, generator=shuffle, collate_fn=collate)

    def step(batch) -> dict[str, torch.Tensor]:
        text = text_batch(prompt, batch.n_audio.tolist(), train["label"].iloc[batch.rows].tolist()).to(device)
        with autocast(device):
            encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
            logits, _, _ = forward_from_encoder(model, encoded, lengths, text.input_ids, text.attention_mask)
        return {"loss": answer_cross_entropy(logits, text.input_ids, text.answer_mask)}

    def validate() -> float:
        scored = predict_audio(model, processor, prompt, validation, p.batch_size, device, "validate")
        return classification_metrics(validation["label"].tolist(), scored.predictions, labels)["ua"]

    made_by = {"stage": "train-teacher", "dataset": dataset, "fold": fold, "labels": list(labels),
               "prompt": prompt.text, "preset": preset.name,
               "seed": params.seed, "params": {"train_teacher": params.section("train_teacher"),
                                               "model": params.section("model")}}
    work = layout.work(dataset, fold, "train-teacher")
    settings = LoopSettings(p.epochs, p.lr, p.weight_decay, p.max_grad_norm)
    result = train_with_validation(model, batches, step, validate, settings, len(batches(0)), work,
                                   fingerprint(made_by), f"train teacher {dataset} fold {fold}")
    summary = {**made_by, "best_epoch": result.best_epoch, "validation_ua": result.best_score,
               "history": result.history}
    save_model(model, processor, layout.teacher(dataset, fold), summary)
    finish_work(work)
    console.print(f"teacher: best validation UA {result.best_score:.3f} at epoch {result.best_epoch}")
    return summary

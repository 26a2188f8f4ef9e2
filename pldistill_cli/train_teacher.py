"""train-teacher: the teacher of a fold, in one of three modes (train_teacher.mode):
full       the teacher pretrain-teacher made (or, with pretrain_teacher.voices 0, the preset's LLM from
           random init on the encoder pretrain-encoder made), the encoder frozen or trained on
           (train_teacher.encoder), fine-tuned on the fold's training split (tiny, small);
lora       a real checkpoint (model.preset hub) fine-tuned with peft LoRA on its LLM, the audio
           encoder and projector frozen; saved as the adapter plus a reference to the checkpoint;
zero-shot  a real checkpoint used as is; saved as a reference to it.
Training keeps the epoch that scores best on the validation split."""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch
from transformers import AutoProcessor

from .checkpoints import checked_config, resolve_checkpoint
from .config import Params, fingerprint, preprocessing
from .data import Clips, spec_augment, text_batch
from .errors import PldistillError
from .families import family_of
from .forward import encode_audio, forward_from_encoder
from .layout import Layout
from .losses import answer_cross_entropy
from .manifest import manifest_labels, read_manifest, select_split
from .metrics import classification_metrics
from .models import (TeacherMeta, add_lora, build_processor, build_teacher, check_sample_rate, count_parameters,
                     environment, get_preset, pretrained_encoder, pretrained_teacher, save_model, save_reference,
                     weights_dtype)
from .scoring import predict_clips
from .training import (LoopResult, LoopSettings, Run, TrainingStep, autocast, fit, resolve_device, seed_everything,
                       shard, sharded_predictions, shuffled_batches, start_processes)
from .ui import console


def train_teacher(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> TeacherMeta:
    labels = manifest_labels(layout.manifest(dataset))
    manifest = read_manifest(layout.manifest(dataset))
    train = select_split(manifest, fold, "train")
    validation = select_split(manifest, fold, "validation")
    p = params.train_teacher
    device = resolve_device(p.device)
    processes = start_processes(device, params.world_size)
    sections = {"train_teacher": params.section("train_teacher"), "model": params.section("model"),
                "preprocess": preprocessing(params)}
    folder = layout.teacher(dataset, fold)
    base = None
    if params.model.preset == "hub":
        if p.mode == "full":
            raise PldistillError("params.yaml: train_teacher.mode full trains a teacher from random weights; with "
                                 "model.preset hub use lora or zero-shot")
        base = resolve_checkpoint(params.model.teacher, params.model.teacher_revision, "model.teacher")
        checked_config(base, "qwen2_audio", "model.teacher")
        processor = AutoProcessor.from_pretrained(base.path)
    elif p.mode == "full":
        processor = build_processor(get_preset(params.model.preset))
    else:
        raise PldistillError(f"params.yaml: train_teacher.mode {p.mode} needs a real checkpoint (model.preset hub); "
                             f"the {params.model.preset} preset's teacher is random, use full")
    encoder, encoder_weights = pretrained_encoder(layout.encoder(), params.model.preset)
    sections["encoder"] = {"source": encoder.source, "weights": encoder.weights}
    init, init_weights = (None, None) if base is not None else \
        pretrained_teacher(layout.teacher_init(), params.model.preset, encoder.weights)
    if init is not None:
        sections["init"] = {"source": init.source, "weights": init.weights}
    check_sample_rate(processor, params.preprocess.sample_rate)
    family = family_of(processor, "processor")
    prompt = family.prompt(processor, labels)
    made_by = TeacherMeta(
        dataset=dataset, fold=fold, labels=labels, prompt=prompt.text, preset=params.model.preset, seed=params.seed,
        params=sections, versions=environment(device), mode=p.mode,
        checkpoint={"source": base.source, "revision": base.revision} if base else None)
    if p.mode == "zero-shot":
        if processes.is_main_process:
            save_reference(folder, processor, base, made_by)
        console.print(f"teacher: {base.source} at {base.revision}, zero-shot")
        return made_by

    def fresh():
        """The teacher before training (the same weights every time): built from the preset, or the
        checkpoint with new LoRA layers."""
        seed_everything(params.seed)
        if base is None:
            model = build_teacher(get_preset(params.model.preset), params.seed, p.dropout, p.attention_dropout)[0]
            if init_weights is not None:  # pretrain-teacher's: every weight (its encoder is data/encoder's: checked)
                model.load_state_dict(init_weights)
            elif encoder_weights is not None:
                family.encoder(model).load_state_dict(encoder_weights)
            if init_weights is not None or encoder_weights is not None:
                family.encoder(model).requires_grad_(p.encoder == "trained")
        else:
            model = family.load(base.path, weights_dtype(params.model.dtype, device, frozen=True))
        model.to(device)
        if params.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = add_lora(model, p.lora_r, p.lora_alpha, p.lora_dropout, projector="frozen") if p.mode == "lora" else None
        return model, lora

    model, lora = fresh()
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    in_memory = Clips.nbytes(len(train) + len(validation), processor) <= p.feature_memory_mb * 2**20
    console.print(f"teacher ({params.model.preset}, {p.mode}): {count_parameters(model):,} parameters, "
                  f"{trainable:,} trainable; {len(train)} train / {len(validation)} validation clips"
                  + ("; log-mels kept in memory" if in_memory else ""))
    held_out = Clips(validation, processor, in_memory)
    augment = dataclasses.asdict(p.spec_augment)

    def own(clips: Clips, epoch: int) -> list[list[int]]:
        return shard(shuffled_batches(len(clips), p.batch_size, params.seed + epoch), processes, p.grad_accum)

    def batches(clips: Clips):
        return lambda epoch: clips.loader(own(clips, epoch))

    def step(clips: Clips, model) -> TrainingStep:
        def terms(batch) -> dict[str, torch.Tensor]:
            text = text_batch(prompt, batch.n_audio.tolist(), clips.rows["label"].iloc[batch.rows].tolist()).to(device)
            features = spec_augment(batch.features, batch.feature_mask, **augment)  # training only
            with autocast(device):
                encoded, lengths = encode_audio(model, features.to(device), batch.feature_mask.to(device))
                hidden, _, _ = forward_from_encoder(model, encoded, lengths, text.input_ids, text.attention_mask,
                                                    logits=False)
                return {"loss": answer_cross_entropy(hidden, model.get_output_embeddings(), text.input_ids,
                                                     text.answer_mask)}
        return TrainingStep({"teacher": model}, terms)

    def validate() -> float:
        def predict(rows: list[int]) -> list[str]:
            return predict_clips(model, processor.tokenizer, prompt, held_out, rows, p.batch_size, device,
                                 "validate").predictions

        predictions = sharded_predictions(len(validation), predict, processes)
        return classification_metrics(validation["label"].tolist(), predictions, labels)["ua"]

    def run_on(clips: Clips, fresh_start: bool = False) -> Run:
        nonlocal model, lora
        if fresh_start:  # a refit: the same start as the validated run
            model, lora = fresh()
        return Run(step(clips, model), batches(clips), len(own(clips, 0)), len(clips))

    def save(result: LoopResult, refit: dict | None, write: bool) -> TeacherMeta:
        summary = dataclasses.replace(made_by, best_epoch=result.best_epoch, validation_ua=result.best_score,
                                      history=tuple(result.history), refit=refit)
        if write and lora is not None:
            save_reference(folder, processor, base, summary, adapter=lora)
        elif write:
            save_model(model, processor, folder, summary)
        return summary

    def refit() -> Run:  # the chosen epoch count, from the same start, on train + validation
        return run_on(Clips(pd.concat([train, validation], ignore_index=True), processor, in_memory), fresh_start=True)

    summary = fit(run_on(Clips(train, processor, in_memory)), validate, LoopSettings.of(p),
                  layout.work(dataset, fold, "train-teacher"), fingerprint(dataclasses.asdict(made_by)),
                  f"train teacher {dataset} fold {fold}", save, refit=refit if p.refit else None, processes=processes)
    console.print(f"teacher: best validation UA {summary.validation_ua:.3f} at epoch {summary.best_epoch}"
                  + (" (refit on train + validation)" if summary.refit else ""))
    return summary

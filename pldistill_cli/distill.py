"""distill: train the student from the teacher cache alone (the teacher model is never loaded).

L = CE + lambda_P * (1 - AW-CKA(student projector output, teacher projector output; w))
       + lambda_L * bucketed KL(teacher top-k || student) at every cached LDist position.
The student's audio encoder is the teacher's (copied and frozen), so its input is the cached
encoder output and training never runs the encoder.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .config import Params, fingerprint
from .errors import PldistillError
from .evaluation import classification_metrics
from .forward import PromptLayout, forward_from_encoder, score_labels, step_mask
from .manifest import manifest_labels
from .layout import Layout
from .losses import answer_cross_entropy, aw_cka, bucketed_kl
from .models import (assemble_student, build_student_llm, count_parameters, get_preset, load_encoder, read_metadata,
                     save_model)
from .teacher_cache import CachedTargets, TeacherCache, cache_identity
from .training import LoopSettings, autocast, finish_work, resolve_device, seed_everything, train_with_validation
from .ui import console, progress


class TargetCollate:
    """Pads cached rows into a batch (right padding)."""

    def __init__(self, prompt: PromptLayout):
        self.prompt = prompt

    def __call__(self, items: list[dict]) -> dict:
        b = len(items)
        t_max = max(len(i["attention"]) for i in items)
        s_max = max(len(i["input_ids"]) for i in items)
        d, k = items[0]["encoded"].shape[1], items[0]["topk_ids"].shape[1]
        out = {
            "index": torch.tensor([i["index"] for i in items]),
            "labels": [i["label"] for i in items],
            "encoded": torch.zeros(b, t_max, d),
            "lengths": torch.tensor([len(i["attention"]) for i in items]),
            "attention": torch.zeros(b, t_max),
            "input_ids": torch.full((b, s_max), self.prompt.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(b, s_max, dtype=torch.long),
            "answer_mask": torch.zeros(b, s_max, dtype=torch.bool),
            "topk_ids": torch.zeros(b, s_max - 1, k, dtype=torch.long),
            "topk_logprobs": torch.zeros(b, s_max - 1, k),
            "kl_mask": torch.zeros(b, s_max - 1, dtype=torch.bool),
        }
        for j, item in enumerate(items):
            t, s = len(item["attention"]), len(item["input_ids"])
            a = len(self.prompt.answer_ids(item["label"]))
            out["encoded"][j, :t] = item["encoded"]
            out["attention"][j, :t] = item["attention"]
            out["input_ids"][j, :s] = item["input_ids"]
            out["attention_mask"][j, :s] = 1
            out["answer_mask"][j, s - 1 - a : s - 1] = True
            out["topk_ids"][j, : s - 1] = item["topk_ids"]
            out["topk_logprobs"][j, : s - 1] = item["topk_logprobs"]
            out["kl_mask"][j, : s - 1] = True
        return out


def distillation_terms(student, batch: dict, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor,
                       lambda_p: float, lambda_l: float, temperature: float) -> dict[str, torch.Tensor]:
    """The three loss terms and their weighted sum for one batch of cached targets."""
    logits, projected, _ = forward_from_encoder(student, batch["encoded"], batch["lengths"], batch["input_ids"],
                                                batch["attention_mask"])
    terms = {"ce": answer_cross_entropy(logits, batch["input_ids"], batch["answer_mask"])}
    loss = terms["ce"]
    if lambda_p:
        teacher_features = batch["encoded"].float() @ teacher_weight.T + teacher_bias  # exact teacher projector output
        mask = step_mask(batch["lengths"], projected.shape[1])
        terms["cka"] = aw_cka(projected, teacher_features, batch["attention"], mask).mean()
        loss = loss + lambda_p * (1 - terms["cka"])
    if lambda_l:
        terms["kl"] = bucketed_kl(logits[:, :-1], batch["topk_ids"], batch["topk_logprobs"], batch["kl_mask"],
                                  temperature).mean()
        loss = loss + lambda_l * terms["kl"]
    return {"loss": loss, **terms}


@torch.no_grad()
def predict_cached(student, prompt: PromptLayout, targets: CachedTargets, batch_size: int, device) -> list[str]:
    loader = DataLoader(targets, batch_size=batch_size, collate_fn=TargetCollate(prompt))
    predictions = [""] * len(targets)
    with progress("validate", len(targets)) as bar:
        for batch in loader:
            with autocast(device):
                scores = score_labels(student, prompt, batch["encoded"].to(device), batch["lengths"].to(device))
            for i, j in zip(batch["index"].tolist(), scores.argmax(1).tolist()):
                predictions[i] = prompt.labels[j]
            bar.advance(len(batch["labels"]))
    return predictions


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def distill(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> dict:
    p = params.distill
    labels = manifest_labels(layout.manifest(dataset))
    teacher_dir = layout.teacher(dataset, fold)
    encoder_config, encoder_weights, audio_token = load_encoder(teacher_dir)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(teacher_dir)  # the student always uses the teacher's processor
    prompt = PromptLayout.from_processor(processor, labels)
    cache = TeacherCache.open(layout.cache(dataset, fold), cache_identity(teacher_dir, prompt, params), prompt)
    train, validation = cache.split("train"), cache.split("validation")
    if not len(train) or not len(validation):
        raise PldistillError(f"{cache.folder}: the cache needs train and validation rows; re-run cache-teacher")

    seed_everything(params.seed)
    preset = get_preset(params.model.preset)
    llm = build_student_llm(preset, len(processor.tokenizer), params.seed)
    student = assemble_student(encoder_config, encoder_weights, audio_token, llm, params.seed)
    if p.train_llm == "frozen":
        student.model.language_model.requires_grad_(False)
        student.lm_head.requires_grad_(False)
    device = resolve_device(p.device)
    student.to(device)
    teacher_weight, teacher_bias = cache.projector_weight.to(device), cache.projector_bias.to(device)
    trainable = sum(x.numel() for x in student.parameters() if x.requires_grad)
    console.print(f"student ({preset.name}): {count_parameters(student):,} parameters, {trainable:,} trainable; "
                  f"{len(train)} train / {len(validation)} validation cached clips")

    collate = TargetCollate(prompt)

    def batches(epoch: int):
        shuffle = torch.Generator().manual_seed(params.seed + epoch)
        return DataLoader(train, batch_size=p.batch_size, shuffle=True, generator=shuffle, collate_fn=collate)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        with autocast(device):
            return distillation_terms(student, _to(batch, device), teacher_weight, teacher_bias, p.lambda_p,
                                      p.lambda_l, cache.meta["cache"]["temperature"])

    truth = validation.rows["label"].tolist()

    def validate() -> float:
        return classification_metrics(truth, predict_cached(student, prompt, validation, p.batch_size, device), labels)["ua"]

    made_by = {"stage": "distill", "dataset": dataset, "fold": fold, "preset": preset.name, "seed": params.seed,
               "teacher": {"path": str(teacher_dir), "weights": read_metadata(teacher_dir).get("weights")},
               "cache": cache.meta, "params": {"distill": params.section("distill"), "model": params.section("model")}}
    work = layout.work(dataset, fold, "distill")
    settings = LoopSettings(p.epochs, p.lr, p.weight_decay, p.max_grad_norm, p.grad_accum)
    result = train_with_validation(student, batches, step, validate, settings, len(batches(0)), work,
                                   fingerprint(made_by), f"distill {dataset} fold {fold}")
    summary = {**made_by, "best_epoch": result.best_epoch, "validation_ua": result.best_score, "history": result.history}
    save_model(student, processor, layout.student(dataset, fold), summary)
    finish_work(work)
    console.print(f"student: best validation UA {result.best_score:.3f} at epoch {result.best_epoch}")
    return summary

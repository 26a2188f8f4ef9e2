"""distill: train the student from the teacher cache alone (the teacher model is never loaded).

L = CE + lambda_P * (1 - AW-CKA(student projector output, teacher projector output; w))
       + lambda_L * bucketed KL(teacher top-k || student) at every cached LDist position.
The student's audio encoder is the teacher's (copied and frozen), so its input is the cached
encoder output and training never runs the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .config import Params, fingerprint
from .errors import PldistillError
from .evaluation import classification_metrics
from .forward import PromptLayout, forward_from_encoder, score_labels, step_mask
from .manifest import manifest_labels
from .layout import Layout, student_name
from .losses import answer_cross_entropy, aw_cka, aw_cka_gram, bucketed_kl
from .checkpoints import load_student_llm
from .models import (add_lora, assemble_student, build_student_llm, count_parameters, get_preset, load_encoder,
                     provenance, save_model, weights_dtype)
from .teacher_cache import CachedTargets, TeacherCache, cache_identity
from .training import (LoopSettings, TrainingStep, autocast, finish_work, resolve_device, seed_everything, shard,
                       start_processes, train_with_validation)
from .ui import console, progress


class TargetCollate:
    """Pads cached rows into a batch (right padding); attention and top-k only where the rows carry them."""

    def __init__(self, prompt: PromptLayout):
        self.prompt = prompt

    def __call__(self, items: list[dict]) -> dict:
        b = len(items)
        lengths = [len(i["encoded"]) for i in items]
        t_max, s_max = max(lengths), max(len(i["input_ids"]) for i in items)
        out = {
            "index": torch.tensor([i["index"] for i in items]),
            "labels": [i["label"] for i in items],
            "encoded": torch.zeros(b, t_max, items[0]["encoded"].shape[1]),
            "lengths": torch.tensor(lengths),
            "input_ids": torch.full((b, s_max), self.prompt.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(b, s_max, dtype=torch.long),
            "answer_mask": torch.zeros(b, s_max, dtype=torch.bool),
            "kl_mask": torch.zeros(b, s_max - 1, dtype=torch.bool),
        }
        if "attention" in items[0]:
            out["attention"] = torch.zeros(b, t_max)
        if "gram" in items[0]:
            out["gram"] = torch.zeros(b, t_max, t_max)
        if "topk_ids" in items[0]:
            k = items[0]["topk_ids"].shape[1]
            out["topk_ids"] = torch.zeros(b, s_max - 1, k, dtype=torch.long)
            out["topk_logprobs"] = torch.zeros(b, s_max - 1, k)
        for j, item in enumerate(items):
            t, s = lengths[j], len(item["input_ids"])
            a = len(self.prompt.answer_ids(item["label"]))
            out["encoded"][j, :t] = item["encoded"]
            out["input_ids"][j, :s] = item["input_ids"]
            out["attention_mask"][j, :s] = 1
            out["answer_mask"][j, s - 1 - a : s - 1] = True
            out["kl_mask"][j, : s - 1] = True
            for key, width in (("attention", t), ("topk_ids", s - 1), ("topk_logprobs", s - 1)):
                if key in out:
                    out[key][j, :width] = item[key]
            if "gram" in out:
                out["gram"][j, :t, :t] = item["gram"]
        return out


@dataclass(frozen=True)
class Method:
    """Which loss terms a method switches on (CE is always on)."""

    kl: str | None  # None | "answer" (KD: answer positions) | "all" (LDist: audio + text positions)
    projector: str | None  # None | "aw_cka" | "cka" (uniform weights) | "fitnets" (MSE via a learned adapter)

    @property
    def columns(self) -> tuple[str, ...]:
        """The cache columns the method reads."""
        cols = ["id", "label", "split", "n_audio", "input_ids"]  # + encoder output, from the encoder store
        cols += ["topk_ids", "topk_logprobs"] if self.kl else []
        cols += ["attention"] if self.projector == "aw_cka" else []
        return tuple(cols)


METHODS = {
    "ce": Method(None, None),
    "kd": Method("answer", None),
    "ldist": Method("all", None),
    "pdist": Method(None, "aw_cka"),
    "fitnets": Method("all", "fitnets"),
    "cka": Method("all", "cka"),
    "pl-distill": Method("all", "aw_cka"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PldistillError(f"params.yaml: unknown distill method `{name}`; known: {', '.join(METHODS)}")
    return METHODS[name]


def distillation_terms(student, batch: dict, method: Method, teacher_weight: torch.Tensor,
                       teacher_bias: torch.Tensor, lambda_p: float, lambda_l: float, temperature: float,
                       adapter: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The method's loss terms and their weighted sum for one batch of cached targets."""
    logits, projected, _ = forward_from_encoder(student, batch["encoded"], batch["lengths"], batch["input_ids"],
                                                batch["attention_mask"])
    terms = {"ce": answer_cross_entropy(logits, batch["input_ids"], batch["answer_mask"])}
    loss = terms["ce"]
    if method.projector:
        mask = step_mask(batch["lengths"], projected.shape[1])

        def teacher_features() -> torch.Tensor:  # the exact teacher projector output X W^T + b
            return batch["encoded"].float() @ teacher_weight.T + teacher_bias

        if method.projector == "fitnets":
            error = (adapter(projected.float()) - teacher_features()).square().mean(-1)
            terms["mse"] = (error * mask).sum() / mask.sum()
            loss = loss + lambda_p * terms["mse"]
        else:
            weights = batch["attention"] if method.projector == "aw_cka" else mask.float()
            if "gram" in batch:  # a gram cache: the teacher side is its raw Gram K = Z Z^T
                terms["cka"] = aw_cka_gram(projected, batch["gram"], weights, mask).mean()
            else:
                terms["cka"] = aw_cka(projected, teacher_features(), weights, mask).mean()
            loss = loss + lambda_p * (1 - terms["cka"])
    if method.kl:
        positions = batch["kl_mask"] if method.kl == "all" else batch["answer_mask"][:, :-1]
        terms["kl"] = bucketed_kl(logits[:, :-1], batch["topk_ids"], batch["topk_logprobs"], positions,
                                  temperature).mean()
        loss = loss + lambda_l * terms["kl"]
    return {"loss": loss, **terms}


@torch.no_grad()
def predict_cached(student, prompt: PromptLayout, targets: CachedTargets, batch_size: int, device) -> list[str]:
    loader = DataLoader(targets, batch_sampler=targets.batches(batch_size), collate_fn=TargetCollate(prompt))
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


def build_student(params: Params, processor, teacher_dir, seed: int) -> tuple[torch.nn.Module, dict]:
    """The student: the teacher's audio encoder (frozen), a new projector and the LLM of the preset
    (random) or, with preset hub, the `model.student_llm` checkpoint; returns it and where its
    LLM came from."""
    encoder_config, encoder_weights, audio_token = load_encoder(teacher_dir)
    dtype = weights_dtype(params.model.dtype, torch.device("cpu"), frozen=False)
    if params.model.preset == "hub":
        llm, untrained, checkpoint = load_student_llm(params.model.student_llm, params.model.student_llm_revision,
                                                      processor.tokenizer, dtype)
        origin = {"source": checkpoint.source, "revision": checkpoint.revision, "initialised_rows": untrained}
    else:
        llm = build_student_llm(get_preset(params.model.preset), len(processor.tokenizer), seed).to(dtype)
        origin = {"preset": params.model.preset}
    return assemble_student(encoder_config, encoder_weights, audio_token, llm, seed).to(dtype), origin


def distill(dataset: str, fold: int, params: Params, layout: Layout = Layout(), method_name: str | None = None,
            seed: int | None = None) -> dict:
    """Train the student of one method (default `distill.method`) with one seed (default `seed`) on the
    fold's cached targets; data-parallel over the processes torchrun or accelerate launch started."""
    p = params.distill
    method_name = method_name or p.method
    seed = params.seed if seed is None else seed
    name = student_name(method_name, seed)
    method = get_method(method_name)
    device = resolve_device(p.device)
    processes = start_processes(device, params.world_size)
    labels = manifest_labels(layout.manifest(dataset))
    teacher_dir = layout.teacher(dataset, fold)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(teacher_dir)  # the student always uses the teacher's processor
    prompt = PromptLayout.from_processor(processor, labels)
    cache = TeacherCache.open(layout.cache(dataset, fold), cache_identity(teacher_dir, prompt, params), prompt)
    columns = method.columns
    if cache.meta["cache"]["projector_targets"] == "gram" and method.projector in ("aw_cka", "cka"):
        columns += ("gram",)
    train, validation = cache.split("train", columns), cache.split("validation", columns)
    if not len(train) or not len(validation):
        raise PldistillError(f"{cache.folder}: the cache needs train and validation rows; re-run cache-teacher")

    seed_everything(seed)
    student, llm_origin = build_student(params, processor, teacher_dir, seed)
    if p.train_llm == "frozen":
        student.model.language_model.requires_grad_(False)
        student.lm_head.requires_grad_(False)
    if params.model.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # LoRA layers are injected into `student` in place; the wrapper is kept only to merge them at the end.
    lora = add_lora(student, p.lora_r, p.lora_alpha, p.lora_dropout, p.lora_projector) if p.train_llm == "lora" else None
    cache.check_student_encoder(student.model.audio_tower)  # after every change to what trains
    # FitNets' learned adapter maps student projector features to the teacher's width; it trains
    # with the student and is not part of the saved model.
    adapter = torch.nn.Linear(student.config.text_config.hidden_size, cache.projector_weight.shape[0])
    trained = {"student": student, **({"adapter": adapter} if method.projector == "fitnets" else {})}
    for module in trained.values():
        module.to(device)
    teacher_weight, teacher_bias = cache.projector_weight.to(device), cache.projector_bias.to(device)
    trainable = sum(x.numel() for x in student.parameters() if x.requires_grad)
    console.print(f"student ({params.model.preset}, {method_name}): {count_parameters(student):,} parameters "
                  f"(shared storage counted once), {trainable:,} trainable; {len(train)} train / "
                  f"{len(validation)} validation cached clips; {processes.num_processes} process(es)")

    collate = TargetCollate(prompt)

    def batches(epoch: int):
        own = shard(train.batches(p.batch_size, seed + epoch), processes)
        return DataLoader(train, batch_sampler=own, collate_fn=collate, num_workers=p.loader_workers,
                          persistent_workers=False)

    def terms(batch: dict) -> dict[str, torch.Tensor]:
        with autocast(device):
            return distillation_terms(student, _to(batch, device), method, teacher_weight, teacher_bias, p.lambda_p,
                                      p.lambda_l, cache.meta["cache"]["temperature"], adapter)

    truth = validation.rows["label"].tolist()

    def validate() -> float:
        return classification_metrics(truth, predict_cached(student, prompt, validation, p.batch_size, device), labels)["ua"]

    made_by = {"stage": "distill", "method": method_name, "dataset": dataset, "fold": fold, "labels": list(labels),
               "prompt": prompt.text, "preset": params.model.preset, "student_llm": llm_origin,
               "seed": seed, "teacher": provenance(teacher_dir),
               "cache": cache.meta, "params": {"distill": params.section("distill"), "model": params.section("model")}}
    work = layout.work(dataset, fold, name)
    settings = LoopSettings(p.epochs, p.lr, p.weight_decay, p.max_grad_norm, p.grad_accum)
    result = train_with_validation(TrainingStep(trained, terms), batches, validate, settings, len(batches(0)), work,
                                   fingerprint(made_by), f"distill {name} {dataset} fold {fold}")
    summary = {**made_by, "best_epoch": result.best_epoch, "validation_ua": result.best_score, "history": result.history}
    if processes.is_main_process:
        if lora is not None:
            lora.merge_and_unload()  # the saved student is a plain Qwen2-Audio model
        save_model(student, processor, layout.student(dataset, fold, name), summary)
        finish_work(work)
    processes.wait_for_everyone()
    console.print(f"{name}: best validation UA {result.best_score:.3f} at epoch {result.best_epoch}")
    return summary

"""distill: train the student from the teacher cache alone (the teacher model is never loaded).

L = CE + lambda_P * (1 - AW-CKA(student projector output, teacher projector output; w))
       + lambda_L * bucketed KL(teacher top-k || student) at every cached LDist position.
The student's audio encoder is the teacher's (copied and frozen), so its input is the cached
encoder output and training never runs the encoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cache import CachedTargets, TeacherCache, expected_meta
from .checkpoints import load_student_llm
from .config import DISTILL_KEYS, Params, fingerprint, preprocessing
from .data import labelled_clips
from .errors import PldistillError
from .families import family_of
from .forward import score_labels
from .layout import Layout, student_name
from .manifest import manifest_labels
from .methods import METHODS, Method
from .terms import TargetCollate, Teacher, distillation_terms, weighted
from .metrics import classification_metrics
from .models import (StudentMeta, add_lora, assemble_student, build_student_llm, check_sample_rate, count_parameters,
                     environment, get_preset, load_encoder, provenance, save_model, weights_dtype)
from .prompt import PromptLayout
from .training import (LoopResult, LoopSettings, Run, TrainingStep, autocast, fit, resolve_device, seed_everything,
                       shard, sharded_predictions, start_processes)
from .ui import console, progress


@torch.no_grad()
def predict_cached(student, prompt: PromptLayout, targets: CachedTargets, rows: list[int], batch_size: int,
                   device) -> list[str]:
    """The student's label for each of `rows` of the cached split, ranked from the cached encoder output."""
    loader = DataLoader(targets, batch_sampler=targets.batches(batch_size, rows=rows), collate_fn=TargetCollate(prompt))
    predictions = {}
    with progress("validate", len(rows)) as bar:
        for batch in loader:
            with autocast(device):
                scores = score_labels(student, prompt, batch["encoded"].to(device), batch["lengths"].to(device))
            for i, j in zip(batch["index"].tolist(), scores.argmax(1).tolist()):
                predictions[i] = prompt.labels[j]
            bar.advance(len(batch["labels"]))
    return [predictions[i] for i in rows]


def probe(student, batch: dict, method: Method, teacher: Teacher, lambda_p: float, lambda_l: float, adapter,
          device) -> dict[str, float]:
    """Whether each distillation term is alive, on one fixed training batch: its value, and the norm of
    its (weighted) gradient on the trainable parameters beside CE's (the report's diagnostics)."""
    params = [x for x in student.parameters() if x.requires_grad]
    with autocast(device):
        terms = distillation_terms(student, _to(batch, device), method, teacher, lambda_p, lambda_l, adapter)
    out = {f"probe_{k}": float(v.detach()) for k, v in terms.items() if k != "loss"}
    for name, value in weighted(terms, lambda_p, lambda_l).items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        out[f"grad_{name}"] = float(torch.sqrt(sum(g.float().square().sum() for g in grads if g is not None)))
    return out


@torch.no_grad()
def teacher_constants(targets: CachedTargets, method: Method, teacher: Teacher, prompt: PromptLayout, batch_size: int,
                      vocab: int, memory_mb: int) -> None:
    """Compute what the teacher contributes that is a constant of the clip (AW-CKA's teacher side, the KL's
    buckets) once, before training, and keep it with the rows, so a training step computes only the
    student's side. Past memory_mb only the CKA normalisers (one number per clip) are kept."""
    rows: list[dict[str, torch.Tensor]] = [{} for _ in range(len(targets))]
    size, everything = 0, True

    def kept(row: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return row if everything else {k: v for k, v in row.items() if k == "teacher_norm"}

    for batch in DataLoader(targets, batch_sampler=targets.batches(batch_size), collate_fn=TargetCollate(prompt)):
        for i, row in zip(batch["index"].tolist(), teacher.constants(method, batch, vocab)):
            size += sum(v.numel() * v.element_size() for v in row.values())
            if everything and size > memory_mb * 2**20:
                everything = False
                console.print(f"the teacher's constants of the {len(rows)} clips exceed distill.teacher_memory_mb "
                              f"({memory_mb}): only its CKA normalisers are kept, every step recomputes the rest")
                rows = [kept(r) for r in rows]
            rows[i] = kept(row)
    targets.constants = rows


def with_labels(targets: CachedTargets, method: Method, fraction: float) -> CachedTargets:
    """Mark the training clips whose labels CE may read (data.labelled_clips; validation clips keep theirs:
    they choose the epoch). A method without distillation terms trains on those clips only: it has nothing
    to learn from the others."""
    rows = targets.rows
    train = (rows["split"] == "train").to_numpy()
    targets.labelled = np.ones(len(rows), dtype=bool)
    targets.labelled[train] = labelled_clips(rows["id"][train].tolist(), rows["label"][train].tolist(), fraction)
    return targets if method.projector or method.kl else targets.subset(targets.labelled)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_student(params: Params, processor, teacher_dir, seed: int) -> tuple[torch.nn.Module, dict, dict]:
    """The student: the teacher's audio encoder (frozen), a new projector and the LLM of the preset
    (random) or, with preset hub, the `model.student_llm` checkpoint; returns it, where its LLM came
    from, and the encoder's weights as the teacher's files store them."""
    encoder_config, encoder_weights, audio_token = load_encoder(teacher_dir)
    dtype = weights_dtype(params.model.dtype, torch.device("cpu"), frozen=False)
    if params.model.preset == "hub":
        llm, untrained, checkpoint = load_student_llm(params.model.student_llm, params.model.student_llm_revision,
                                                      processor.tokenizer, dtype)
        origin = {"source": checkpoint.source, "revision": checkpoint.revision, "initialised_rows": untrained}
    else:
        llm = build_student_llm(get_preset(params.model.preset), len(processor.tokenizer), seed).to(dtype)
        origin = {"preset": params.model.preset}
    return assemble_student(encoder_config, encoder_weights, audio_token, llm, seed).to(dtype), origin, encoder_weights


@dataclass
class Student:
    """A freshly built student and what trains with it (the same weights for the same seed)."""

    model: torch.nn.Module
    lora: object  # the peft wrapper (LoRA layers live in `model`), kept only to merge them at the end
    adapter: torch.nn.Module  # FitNets' learned map from student to teacher width (not saved)
    trained: dict[str, torch.nn.Module]
    origin: dict


def fresh_student(params: Params, processor, teacher_dir, seed: int, cache: TeacherCache, method: Method,
                  device) -> Student:
    p = params.distill
    seed_everything(seed)
    student, origin, encoder_weights = build_student(params, processor, teacher_dir, seed)
    family = family_of(student)
    if p.train_llm == "frozen":
        family.llm(student).requires_grad_(False)
        family.head(student).requires_grad_(False)
    if params.model.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = add_lora(student, p.lora_r, p.lora_alpha, p.lora_dropout, p.lora_projector) if p.train_llm == "lora" else None
    cache.check_student_encoder(family.encoder(student), encoder_weights)  # after every change to what trains
    adapter = torch.nn.Linear(family.llm(student).config.hidden_size, cache.projector_weight.shape[0])
    trained = {"student": student, **({"adapter": adapter} if method.projector == "fitnets" else {})}
    for module in trained.values():
        module.to(device)
    return Student(student, lora, adapter, trained, origin)


def distill(dataset: str, fold: int, params: Params, layout: Layout = Layout(), method_name: str | None = None,
            seed: int | None = None) -> StudentMeta:
    """Train the student of one method (default `distill.method`) with one seed (default `seed`) on the
    fold's cached targets, keeping the epoch that scores best on validation (with `refit`, then
    retraining afresh on train + validation for that many epochs); data-parallel over the processes
    torchrun or accelerate launch started."""
    p = params.distill
    method_name = method_name or p.method
    seed = params.seed if seed is None else seed
    name = student_name(method_name, seed)
    method = METHODS[method_name]
    weights = dataclasses.asdict(p.weights[method_name])  # only the weights of the method's terms
    lambda_p, lambda_l = weights.get("lambda_p", 0.0), weights.get("lambda_l", 0.0)  # 0.0: a term it lacks
    device = resolve_device(p.device)
    processes = start_processes(device, params.world_size)
    labels = manifest_labels(layout.manifest(dataset))
    teacher_dir = layout.teacher(dataset, fold)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(teacher_dir)  # the student always uses the teacher's processor
    check_sample_rate(processor, params.preprocess.sample_rate)
    family = family_of(processor, "processor")  # the student's is the teacher's family
    prompt = family.prompt(processor, labels)
    cache = TeacherCache(layout.cache(dataset, fold), expected_meta(teacher_dir, prompt, params), prompt)
    columns = method.columns
    if cache.meta.cache.projector_targets == "gram" and method.projector in ("aw_cka", "cka"):
        columns += ("gram",)
    train = with_labels(cache.split("train", columns), method, p.label_fraction)
    validation = cache.split("validation", columns)
    if not len(train) or not len(validation):
        raise PldistillError(f"{cache.folder}: the cache needs train and validation rows; re-run cache-teacher")
    teacher = Teacher.of(cache.projector_weight, cache.projector_bias, cache.meta.cache.temperature,
                         weights.get("cka_estimator", "biased"))
    student = fresh_student(params, processor, teacher_dir, seed, cache, method, device)
    vocab = family.llm(student.model).config.vocab_size
    teacher_constants(train, method, teacher, prompt, p.batch_size, vocab, p.teacher_memory_mb)
    teacher = teacher.to(device)
    trainable = sum(x.numel() for x in student.model.parameters() if x.requires_grad)
    console.print(f"student ({params.model.preset}, {method_name}): {count_parameters(student.model):,} parameters "
                  f"(shared storage counted once), {trainable:,} trainable; {len(train)} train / "
                  f"{len(validation)} validation cached clips ({int(train.labelled.sum())} of the training clips with their label); "
                  f"{processes.num_processes} process(es)")
    collate = TargetCollate(prompt)

    def batches(rows: CachedTargets):
        def epoch_batches(epoch: int):
            own = shard(rows.batches(p.batch_size, seed + epoch), processes, p.grad_accum)
            return DataLoader(rows, batch_sampler=own, collate_fn=collate, num_workers=p.loader_workers)
        return epoch_batches

    def step(s: Student) -> TrainingStep:
        def terms(batch: dict) -> dict[str, torch.Tensor]:
            with autocast(device):
                return distillation_terms(s.model, _to(batch, device), method, teacher, lambda_p, lambda_l,
                                          s.adapter)
        return TrainingStep(s.trained, terms)

    truth = validation.rows["label"].tolist()

    def validate() -> float:
        predict = lambda rows: predict_cached(student.model, prompt, validation, rows, p.batch_size, device)  # noqa: E731
        return classification_metrics(truth, sharded_predictions(len(truth), predict, processes), labels)["ua"]

    # the same batch every epoch: the first that holds a labelled clip (the gradients are shares of CE's)
    probe_batch = collate([train[i] for i in next(b for b in train.batches(p.batch_size) if train.labelled[b].any())])
    made_by = StudentMeta(
        dataset=dataset, fold=fold, labels=labels, prompt=prompt.text, preset=params.model.preset, seed=seed,
        params={"distill": {**{k: getattr(p, k) for k in DISTILL_KEYS}, "weights": {method_name: weights}},
                "model": params.section("model"), "preprocess": preprocessing(params)},
        versions=environment(device), method=method_name, student_llm=student.origin, teacher=provenance(teacher_dir),
        cache=dataclasses.asdict(cache.meta))
    def refit() -> Run:  # the chosen epoch count, from the same start, on train + validation
        nonlocal student
        everything = with_labels(cache.split(("train", "validation"), columns), method, p.label_fraction)
        teacher_constants(everything, method, teacher.to("cpu"), prompt, p.batch_size, vocab, p.teacher_memory_mb)
        student = fresh_student(params, processor, teacher_dir, seed, cache, method, device)
        return Run(step(student), batches(everything), len(batches(everything)(0)), len(everything))

    def save(result: LoopResult, refit: dict | None, write: bool) -> StudentMeta:
        summary = dataclasses.replace(made_by, best_epoch=result.best_epoch, validation_ua=result.best_score,
                                      history=tuple(result.history), refit=refit)
        if write:
            if student.lora is not None:
                student.lora.merge_and_unload()  # the saved student is a plain Qwen2-Audio model
            save_model(student.model, processor, layout.student(dataset, fold, name), summary)
        return summary

    summary = fit(Run(step(student), batches(train), len(batches(train)(0))), validate, LoopSettings.of(p),
                  layout.work(dataset, fold, name), fingerprint(dataclasses.asdict(made_by)),
                  f"distill {name} {dataset} fold {fold}", save, refit=refit if p.refit else None, processes=processes,
                  diagnose=lambda: probe(student.model, probe_batch, method, teacher, lambda_p, lambda_l,
                                         student.adapter, device))
    console.print(f"{name}: best validation UA {summary.validation_ua:.3f} at epoch {summary.best_epoch}"
                  + (" (refit on train + validation)" if p.refit else ""))
    return summary

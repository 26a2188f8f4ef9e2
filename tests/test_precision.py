"""What CUDA changes, reproduced on the CPU: with PLDISTILL_CPU_AS_CUDA=1 a CPU takes CUDA's choices (frozen
weights in bf16 under `model.dtype: auto`, bf16 autocast), so the GPU path runs in CI.

The first GPU run failed at distill: cache-teacher's teacher was loaded in bf16 and hashed its rounded encoder,
while distill built the fp32 student from the saved weights, so no cache was ever this student's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pldistill_cli.cache import EncoderStore, TeacherCache, encoder_fingerprint, expected_meta
from pldistill_cli.cache_teacher import build_cache
from pldistill_cli.distill import distill
from pldistill_cli.evaluate import evaluate_model
from pldistill_cli.models import CPU_AS_CUDA, load_encoder, load_model, weights_dtype
from pldistill_cli.train_teacher import train_teacher
from pldistill_cli.training import autocast


@pytest.fixture(scope="module")
def gpu_like_run(prepared, tmp_path_factory):
    """The small pipeline with CUDA's precision choices on the CPU: a bf16 teacher caches, fp32 students
    (pl-distill, kd, and pl-distill with gradient checkpointing) distil, and both are evaluated."""
    params, layout = prepared
    layout = dataclasses.replace(layout, data=tmp_path_factory.mktemp("gpu-like") / "data",
                                 metrics_root=tmp_path_factory.mktemp("gpu-like-metrics"))
    layout.data.mkdir()
    for folder in ("prepared", "encoder", "teacher-init"):
        (layout.data / folder).symlink_to(prepared[1].data / folder)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CPU_AS_CUDA, "1")
        train_teacher("synthetic", 1, params, layout)
        build_cache("synthetic", 1, params, layout)
        students = {}
        for method, checkpointing in (("pl-distill", False), ("kd", False), ("ldist", True)):
            run = dataclasses.replace(params, model=dataclasses.replace(params.model, gradient_checkpointing=checkpointing))
            students[method] = distill("synthetic", 1, run, layout, method)
            evaluate_model("synthetic", 1, "student", params, layout, method)
        evaluate_model("synthetic", 1, "teacher", params, layout)
    return params, layout, students


def test_the_cuda_choices_are_taken_on_the_cpu_when_asked(monkeypatch):
    cpu = torch.device("cpu")
    assert weights_dtype("auto", cpu, frozen=True) == torch.float32
    assert not torch.is_autocast_enabled("cpu") and _autocast_dtype(cpu) is None
    monkeypatch.setenv(CPU_AS_CUDA, "1")
    assert weights_dtype("auto", cpu, frozen=True) == torch.bfloat16
    assert weights_dtype("auto", cpu, frozen=False) == torch.float32  # trained weights stay fp32
    assert _autocast_dtype(cpu) == torch.bfloat16


def _autocast_dtype(device):
    with autocast(device):
        x = torch.ones(2, 2)
        return (x @ x).dtype if torch.is_autocast_enabled("cpu") else None


def test_a_bf16_teacher_caches_for_fp32_students(gpu_like_run):
    params, layout, students = gpu_like_run
    cache = layout.cache("synthetic", 1)
    meta = json.loads((cache / "meta.json").read_text())
    stored = load_encoder(layout.teacher("synthetic", 1))[1]
    assert {v.dtype for v in stored.values()} == {torch.float32}  # the teacher was saved in fp32 ...
    assert meta["encoder"]["precision"] == "bf16"  # ... and cached its encoder output in bf16
    assert meta["encoder"]["weights"] == encoder_fingerprint(stored)  # the stored weights, not the bf16 copy
    rounded = {k: v.bfloat16() for k, v in stored.items()}
    assert encoder_fingerprint(rounded) != encoder_fingerprint(stored)  # what the check used to compare
    for method, made in students.items():
        student = layout.student("synthetic", 1, f"student-{method}-s{params.seed}")
        weights = load_file(str(student / "model.safetensors"))
        assert {v.dtype for v in weights.values()} == {torch.float32}, method  # trained in fp32 under autocast
        encoder = load_encoder(student)[1]  # the teacher's encoder, unrounded
        assert encoder.keys() == stored.keys() and all(torch.equal(encoder[k], v) for k, v in stored.items())
        losses = [h for h in made.history if "loss" in h]
        assert losses and all(torch.isfinite(torch.tensor(h["loss"])) for h in losses)
        assert 0 <= json.loads(layout.metrics("synthetic", 1, f"student-{method}-s{params.seed}").read_text())["test"]["ua"] <= 1


def test_the_cached_encoder_output_is_the_bf16_teachers(gpu_like_run, monkeypatch):
    """X in the store is what the bf16 teacher computed under autocast, and a run at another precision
    gets a store of its own (the store is keyed by the precision too)."""
    params, layout, _ = gpu_like_run
    teacher_dir = layout.teacher("synthetic", 1)
    meta = json.loads((layout.cache("synthetic", 1) / "meta.json").read_text())
    store = EncoderStore(Path(meta["encoder"]["store"]), 64)
    from pldistill_cli.data import AudioClips, AudioCollate
    from pldistill_cli.forward import encode_audio
    from pldistill_cli.manifest import read_manifest, select_split

    rows = select_split(read_manifest(layout.manifest("synthetic")), 1, "train").head(2)
    cpu = torch.device("cpu")
    outputs = {}
    for emulate in ("1", "0"):
        monkeypatch.setenv(CPU_AS_CUDA, emulate)
        model, processor = load_model(teacher_dir, cpu, dtype=weights_dtype("auto", cpu, frozen=True))
        clips = AudioClips(rows, processor.feature_extractor.sampling_rate)
        batch = AudioCollate(processor)([clips[i] for i in range(len(rows))])
        with torch.no_grad(), autocast(cpu):
            x, lengths = encode_audio(model, batch.features, batch.feature_mask)
        outputs[emulate] = [x[i, : int(t)].float() for i, t in enumerate(lengths)]
    for i, clip in enumerate(rows["id"]):
        torch.testing.assert_close(store.get(clip), outputs["1"][i], rtol=0, atol=1e-6)
        assert not torch.allclose(outputs["0"][i], outputs["1"][i], rtol=0, atol=1e-6)  # fp32 differs


def test_a_cache_of_another_encoder_is_still_refused(gpu_like_run):
    """The fix compares stored weights: a student built on another encoder is refused as before."""
    from transformers import AutoProcessor

    from pldistill_cli.distill import build_student
    from pldistill_cli.errors import PldistillError
    from pldistill_cli.datasets import CORPORA
    from pldistill_cli.prompt import PromptLayout

    params, layout, _ = gpu_like_run
    teacher_dir = layout.teacher("synthetic", 1)
    processor = AutoProcessor.from_pretrained(teacher_dir)
    prompt = PromptLayout.from_processor(processor, CORPORA["synthetic"].labels)
    cache = TeacherCache(layout.cache("synthetic", 1), expected_meta(teacher_dir, prompt, params), prompt)
    student, _, stored = build_student(params, processor, teacher_dir, seed=0)
    cache.check_student_encoder(student.model.audio_tower, stored)
    bf16 = dataclasses.replace(params, model=dataclasses.replace(params.model, dtype="bf16"))
    student16, _, _ = build_student(bf16, processor, teacher_dir, seed=0)  # the same weights, held in bf16
    cache.check_student_encoder(student16.model.audio_tower, stored)
    with pytest.raises(PldistillError, match="not this student's encoder"):
        cache.check_student_encoder(student.model.audio_tower, {k: v * 1.001 for k, v in stored.items()})

"""Speed and memory of one distillation training step of the paper-sized student, with random weights.

The student is built the way the package builds it (preset `paper`: Qwen2-Audio-7B's encoder, a new
projector, a Qwen2-0.5B-sized LLM, about 1.1B parameters) directly on the GPU; its input is random
cached-like targets of a 30 s window (T = 750 audio steps), batched by the package's TargetCollate
and scored by its distillation_terms, so the step is the one `pldistill distill` takes.

    python scripts/gpu_student_step.py                   # GPU: paper preset, batch 8, with and without checkpointing
    python scripts/gpu_student_step.py --tiny-check      # CPU: small preset, short window, same code path
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from transformers.models.qwen2_audio.configuration_qwen2_audio import (
    Qwen2AudioEncoderConfig,
)
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from pldistill_cli.methods import METHODS
from pldistill_cli.terms import TargetCollate, Teacher, distillation_terms
from pldistill_cli.prompt import PromptLayout
from pldistill_cli.labels import LABEL_SETS
from pldistill_cli.models import (
    AUDIO_TOKEN,
    assemble_student,
    build_processor,
    build_student_llm,
    count_parameters,
    get_preset,
)
from pldistill_cli.training import autocast


def build(preset_name: str, device: torch.device, seed: int = 0):
    """The student of the preset on `device` (random weights), the tiny offline processor's prompt, and the
    teacher's sizes that shape the cache: encoder width, LLM width (teacher projector W [width, enc]) and
    vocabulary (top-k ids; the paper teacher's 156032 exceeds the student's 151936, as in the real pair)."""
    preset = get_preset(preset_name)
    processor = build_processor(preset)  # byte-level BPE trained offline; ids fit any student vocabulary
    prompt = PromptLayout.from_processor(processor, LABEL_SETS["ravdess"])
    audio_token = processor.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    encoder_config = Qwen2AudioEncoderConfig(num_mel_bins=128, max_source_positions=1500, **preset.encoder)
    with device:  # create the weights on the GPU directly: building 1.1B parameters on the CPU is slow
        torch.manual_seed(seed)
        encoder_weights = Qwen2AudioEncoder(encoder_config).state_dict()
        llm = build_student_llm(preset, len(processor.tokenizer), seed)
        student = assemble_student(encoder_config, encoder_weights, audio_token, llm, seed)
    del encoder_weights, llm
    student.to(device)  # any buffer made outside the device context
    teacher = (encoder_config.d_model, preset.teacher_llm["hidden_size"],
               preset.teacher_llm.get("vocab_size", len(processor.tokenizer)))
    return student, prompt, teacher


def cached_batch(prompt: PromptLayout, batch: int, steps: int, enc_width: int, vocab: int, top_k: int, device,
                 seed: int = 0) -> dict:
    """Random rows shaped as the teacher cache stores them (encoder output, attention, top-k), collated."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(batch):
        label = prompt.labels[i % len(prompt.labels)]
        ids = prompt.prompt_ids(steps) + list(prompt.answer_ids(label))
        s = len(ids)
        # top-k log-probs: the k largest of a softmax over k + 1 buckets, so some mass is left in the tail
        logp = torch.randn(s - 1, top_k + 1, generator=g).mul(2).log_softmax(-1)[:, :top_k].sort(-1, descending=True).values
        items.append({
            "index": i, "label": label, "input_ids": torch.tensor(ids),
            "encoded": torch.randn(steps, enc_width, generator=g),
            "attention": torch.randn(steps, generator=g).mul(2).softmax(-1),
            "topk_ids": torch.randint(0, vocab, (s - 1, top_k), generator=g),
            "topk_logprobs": logp,
        })
    out = TargetCollate(prompt)(items)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def time_steps(student, batch, method, projector, optimizer, device, warmup: int, steps: int) -> dict:
    """Mean time of full training steps (forward, loss, backward, clip, AdamW) after `warmup` steps."""
    weight, bias = projector
    params = [p for p in student.parameters() if p.requires_grad]

    def one_step():
        with autocast(device):
            terms = distillation_terms(student, batch, method, Teacher.of(weight, bias, 2.0), 1.0, 1.0)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return terms

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        one_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        terms = one_step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": seconds * 1000, "clips_s": batch["input_ids"].shape[0] / seconds, "peak_gib": peak,
            "loss": {k: round(float(v.detach()), 4) for k, v in terms.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch-size", type=int, default=8, help="per-device batch (clips)")
    ap.add_argument("--audio-steps", type=int, default=750, help="T: encoder steps per clip (30 s = 750)")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                    help="LLM gradient checkpointing")
    ap.add_argument("--ce-baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the CE-only step (KD overhead = pl-distill / ce)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny-check", action="store_true",
                    help="CPU smoke test: small preset, T=100, batch 2, 1 warm-up + 2 steps")
    args = ap.parse_args()
    if args.tiny_check:
        args.preset, args.audio_steps, args.batch_size, args.warmup, args.steps = "small", 100, 2, 1, 2
        args.device = "cpu" if args.device == "auto" else args.device
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":  # TF32 left as the package leaves it (off), so the step is distill's
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    start = time.perf_counter()
    student, prompt, (enc_width, teacher_width, teacher_vocab) = build(args.preset, device)
    student.train()  # gradient checkpointing is active only in training mode
    trainable = [p for p in student.parameters() if p.requires_grad]
    print(f"student ({args.preset}) on {device}: {count_parameters(student):,} parameters, "
          f"{sum(p.numel() for p in trainable):,} trainable; built in {time.perf_counter() - start:.1f} s")
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01, fused=True)  # as training.py
    g = torch.Generator().manual_seed(1)
    projector = (torch.randn(teacher_width, enc_width, generator=g).div(math.sqrt(enc_width)).to(device),
                 torch.randn(teacher_width, generator=g).mul(0.02).to(device))
    batch = cached_batch(prompt, args.batch_size, args.audio_steps, enc_width, teacher_vocab, args.top_k, device)
    print(f"batch: {args.batch_size} clips x {batch['input_ids'].shape[1]} tokens (T={args.audio_steps} audio steps), "
          f"top-{args.top_k} over {teacher_vocab} teacher ids, teacher projector {teacher_width}x{enc_width}")

    runs = [("pl-distill", c) for c in {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]]
    if args.ce_baseline:
        runs.append(("ce", runs[0][1]))
    # transformers 5.24 deprecates gradient_checkpointing_* for activation_checkpointing_*, which 5.17
    # (the GPU image's) lacks: keep the old name, as the package does, and hide the FutureWarning.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_(en|dis)able.*", category=FutureWarning)
    results = {}
    for method_name, ckpt in runs:
        llm = student.model.language_model
        if ckpt:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_disable()
        name = f"{method_name}, batch {args.batch_size}, checkpointing {'on' if ckpt else 'off'}"
        try:
            r = time_steps(student, batch, METHODS[method_name], projector, optimizer, device, args.warmup, args.steps)
        except torch.OutOfMemoryError as exc:
            print(f"{name}: out of memory ({str(exc).splitlines()[0]})")
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        results[(method_name, ckpt)] = r
        print(f"{name}: {r['ms']:.1f} ms/step, {r['clips_s']:.1f} clips/s, peak {r['peak_gib']:.2f} GiB; "
              f"loss terms {r['loss']}", flush=True)
    base, ce = results.get(("pl-distill", runs[0][1])), results.get(("ce", runs[0][1]))
    if base and ce:
        print(f"pl-distill / ce step time: {base['ms'] / ce['ms']:.2f}x (ce computes logits at the answer positions "
              "only; scripts/benchmark.py's KD overhead compares with a CE step computing them everywhere)")
    if device.type == "cuda":  # what the settings measured here fit, leaving 10% for the allocator and the context
        for (method_name, ckpt), r in results.items():
            fits = ", ".join(f"{gb} GB {'yes' if r['peak_gib'] * 2**30 <= 0.9 * gb * 1e9 else 'no'}" for gb in (24, 40, 80))
            print(f"{method_name}, batch {args.batch_size}, checkpointing {'on' if ckpt else 'off'}: peak "
                  f"{r['peak_gib']:.1f} GiB; fits a GPU of {fits}")


if __name__ == "__main__":
    main()

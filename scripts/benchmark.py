"""Regenerate BENCHMARKS.md: every figure a ratio or time measured side by side in this one run.

1. Distillation speed and cache size on the `small` preset (the real 30 s encoder window, the paper's
   proportions, random weights), per clip length, and again on `proxy` (Qwen's real vocabularies,
   151,936 student and 156,032 teacher ids, one layer of the real student's width: what dominates at the
   paper's sizes, the output layer and the KL over every id, at a size two cores run):
     online / cached   a pl-distill step with the teacher run online vs the same step from the cache
     KD overhead       a pl-distill step vs a CE step of the same student that computes the logits at
                       every position too (what distillation's terms cost), both from the cache (the
                       teacher's constants of the clip precomputed, as distill does)
     pl-distill / CE   a pl-distill step vs the `ce` method's step (logits at the answer positions only)
     cached / encoder  a pl-distill step from the cache vs a CE step that runs the frozen encoder
     cache / naive     cache bytes vs fp32 teacher features + dense logits at every position
     PDist / fp16      PDist target bytes vs fp16 teacher projector features
     cache / bare      cache-teacher's work per batch vs bare teacher forward passes
   Each ratio times its two sides alternately (A, B, A, B, ...) after a warm-up, adding pairs until the
   ratio of the first half of the pairs and of the second half agree within 3% (KD overhead: 1.5%, at
   least 40 pairs), and prints the median of the per-pair ratios (the machine's drift cancels within a
   pair) and the ratio of the minima.
2. The default pipeline's stage times: a fresh `dvc repro` of this repository's dvc.yaml and
   params.yaml in a scratch copy, with where each stage's time goes (startup imports, and the time
   under each kind of progress bar: train, validate, cache, distill, evaluate, ...).
3. The bucketed-vs-full KL gap as k varies, on that run's trained teacher and `ce` student.

Usage: python scripts/benchmark.py [--sections small proxy pipeline] [--lengths 3 10 30] [--batch 2]
                                   [--out BENCHMARKS.md]
       python scripts/benchmark.py --print --preset paper --teacher-dtype bf16 --lengths 30 --batch 8  (GPU)
--sections rewrites only those sections of the file, keeping every other one; --print writes nothing and
prints one preset's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pldistill_cli.cache import CACHE_SCHEMA, ENCODER_SCHEMA, write_rows
from pldistill_cli.data import text_batch
from pldistill_cli.forward import (audio_features, encode_audio, forward_from_encoder, forward_with_audio_attention,
                                   topk_from_hidden)
from pldistill_cli.labels import label_set
from pldistill_cli.layout import Layout, student_name
from pldistill_cli.losses import answer_cross_entropy, bucketed_kl, full_kl, topk_logprobs
from pldistill_cli.methods import METHODS
from pldistill_cli.terms import CONSTANTS, TargetCollate, Teacher, distillation_terms
from pldistill_cli.models import (Preset, assemble_student, build_student_llm, build_teacher, count_parameters, get_preset,
                                  load_model, weights_dtype)
from pldistill_cli.prompt import PromptLayout
from pldistill_cli.training import autocast, resolve_device

ROOT = Path(__file__).resolve().parents[1]
TOP_K, TEMPERATURE = 16, 2.0


@dataclass
class Pair:
    """Side-by-side timings of two steps: medians and minima in seconds, and how many pairs it took."""

    a: list[float]
    b: list[float]

    @property
    def ratio(self) -> float:
        return _ratio(self.a, self.b)

    @property
    def ratio_min(self) -> float:
        return min(self.a) / min(self.b)

    def cell(self, digits: int = 2) -> str:
        return f"{self.ratio:.{digits}f}x (min {self.ratio_min:.{digits}f}x)"


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _ratio(a: list[float], b: list[float]) -> float:
    """The median of the per-pair ratios: each pair runs back to back, so the machine's drift cancels."""
    return statistics.median(x / y for x, y in zip(a, b))


def compare(a, b, device, least: int = 8, most: int = 120, agree: float = 0.03) -> Pair:
    """Time a and b alternately after a warm-up of each, until the ratio of the first and of the second
    half of the pairs agree within `agree` (at least `least`, at most `most` pairs)."""
    a(), b()
    pair = Pair([], [])
    while True:
        pair.a.append(_time(a, device))
        pair.b.append(_time(b, device))
        n = len(pair.a)
        if n >= least and n % 2 == 0:
            h = n // 2
            first, second = _ratio(pair.a[:h], pair.b[:h]), _ratio(pair.a[h:], pair.b[h:])
            if abs(first / second - 1) <= agree or n >= most:
                return pair


def bench_preset(name: str) -> Preset:
    """A preset of the package, or `proxy`: `small` with Qwen's real vocabularies (the paper teacher's 156,032
    ids, the student's 151,936, tied as in Qwen2-0.5B) and a narrow student LLM (hidden 128): the KL runs over
    every id, and per id the output layer costs 7 times less than at the real width (896), so the KL's own
    passes weigh more in a step than they do at the paper's sizes."""
    if name != "proxy":
        return get_preset(name)
    small, paper = get_preset("small"), get_preset("paper")
    vocab = {k: paper.student_llm[k] for k in ("vocab_size", "tie_word_embeddings", "rope_theta")}
    return dataclasses.replace(small, name="proxy",
                               teacher_llm={**small.teacher_llm, "vocab_size": paper.teacher_llm["vocab_size"]},
                               student_llm={**small.student_llm, "hidden_size": 128, "intermediate_size": 384, **vocab})


def build(preset: Preset, device, teacher_dtype: torch.dtype):
    """Teacher and student of the preset, random weights, made on the device (1.1B parameters are slow to make
    on a CPU and then copy); the teacher held in `teacher_dtype`, as cache-teacher holds it."""
    with torch.device(device):
        torch.manual_seed(0)
        teacher, processor = build_teacher(preset, 0)
        student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                                   teacher.config.audio_token_index,
                                   build_student_llm(preset, len(processor.tokenizer), 0), 0)
    return teacher.to(device, teacher_dtype).eval(), processor, student.to(device)


def ratios(lengths: list[float], batch_size: int, device, preset_name: str = "small",
           teacher_dtype: torch.dtype | None = None, quick: bool = False) -> tuple[list[str], list[tuple], str]:
    """The speed and size table of one preset. `quick`: two pairs per ratio, a rehearsal whose figures mean little."""
    least, most = (2, 2) if quick else (4, 120)
    preset = bench_preset(preset_name)
    teacher_dtype = teacher_dtype or weights_dtype("auto", device, frozen=True)
    teacher, processor, student = build(preset, device, teacher_dtype)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, fused=True)  # as training.py
    prompt = PromptLayout.from_processor(processor, label_set("synthetic"))
    projector = teacher.model.multi_modal_projector.linear
    cached_teacher = Teacher.of(projector.weight.detach().float().cpu(), projector.bias.detach().float().cpu(),
                                TEMPERATURE)
    targets_teacher = cached_teacher.to(device)
    vocab, teacher_vocab = student.config.text_config.vocab_size, teacher.config.text_config.vocab_size
    about = (f"`{preset_name}` preset on {device} ({torch.get_num_threads()} threads), teacher in {teacher_dtype}: teacher "
             f"{count_parameters(teacher):,} / student {count_parameters(student):,} parameters (encoder "
             f"{count_parameters(student.model.audio_tower):,}); batch {batch_size}; vocabulary {vocab:,} (student) / "
             f"{teacher_vocab:,} (teacher)" + (" (the tiny offline tokenizer)" if vocab == teacher_vocab else ""))
    print(about, flush=True)
    header = ["clip s", "online / cached", "online / CE", "KD overhead", "pl-distill / CE", "cached / encoder",
              "cache / naive", "PDist / fp16", "cache / bare", "steps (ms): pl-distill, CE every logit, CE, online",
              "store B per audio s", "targets B per audio s"]
    rows = []
    rng = np.random.default_rng(0)
    for seconds in lengths:
        waves = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(batch_size)]
        labels = ["Happy", "Sad"] * batch_size
        features, mask = (t.to(device) for t in audio_features(processor, waves))

        def teacher_targets():  # what cache-teacher computes per batch (cache_teacher.build_cache)
            with torch.no_grad(), autocast(device):
                encoded, lengths_ = encode_audio(teacher, features.to(teacher_dtype), mask)
                text = text_batch(prompt, lengths_.tolist(), labels[:batch_size]).to(device)
                hidden, w = forward_with_audio_attention(teacher, prompt, encoded.to(teacher_dtype), lengths_,
                                                         text.input_ids, text.attention_mask, -1, logits=False)
                ids, lps = topk_from_hidden(teacher.lm_head, hidden[:, :-1], TOP_K, TEMPERATURE)
            return encoded, lengths_, text, w, ids, lps

        encoded, lengths_, text, w, ids, lps = teacher_targets()
        items = []
        for i in range(batch_size):
            t, s = int(lengths_[i]), int(text.attention_mask[i].sum())
            items.append({"index": i, "label": labels[i], "input_ids": text.input_ids[i, :s].cpu(),
                          "encoded": encoded[i, :t].float().cpu(), "attention": w[i].cpu(),
                          "topk_ids": ids[i, : s - 1].cpu(), "topk_logprobs": lps[i, : s - 1].cpu()})
        kept = cached_teacher.constants(METHODS["pl-distill"], TargetCollate(prompt)(items), vocab)  # as distill does
        batch = TargetCollate(prompt)([{**item, **row} for item, row in zip(items, kept)])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

        def update(loss):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def step(method, targets):
            with autocast(device):
                loss = distillation_terms(student, targets, METHODS[method], targets_teacher, 1.0, 1.0)["loss"]
            update(loss)

        def ce_every_logit():  # CE as it was computed before logits were taken at the answer positions only
            with autocast(device):
                logits, _, _ = forward_from_encoder(student, batch["encoded"], batch["lengths"], batch["input_ids"],
                                                    batch["attention_mask"])
                loss = answer_cross_entropy(logits, lambda x: x, batch["input_ids"], batch["answer_mask"])
            update(loss)

        def online_step():  # the teacher runs inside every step
            enc, _, _, w_, ids_, lps_ = teacher_targets()
            attention = torch.stack([torch.nn.functional.pad(x, (0, enc.shape[1] - len(x))) for x in w_])
            online = {k: v for k, v in batch.items() if k not in CONSTANTS}
            step("pl-distill", dict(online, encoded=enc.float(), attention=attention, topk_ids=ids_, topk_logprobs=lps_))

        def encoder_ce_step():  # plain CE fine-tuning that runs the (frozen) encoder
            with autocast(device):
                enc, lens = encode_audio(student, features, mask)
                hidden, _, _ = forward_from_encoder(student, enc, lens, batch["input_ids"], batch["attention_mask"],
                                                    logits=False)
                loss = answer_cross_entropy(hidden, student.lm_head, batch["input_ids"], batch["answer_mask"])
            update(loss)

        def bare_teacher():
            with torch.no_grad(), autocast(device):
                encd, lens = encode_audio(teacher, features.to(teacher_dtype), mask)
                forward_from_encoder(teacher, encd, lens, text.input_ids, text.attention_mask, logits=False)

        def cache_rows():  # what cache-teacher does per batch, Parquet writes included: (store, target) bytes
            enc, lens, txt, w_, ids_, lps_ = teacher_targets()
            encoder_rows, target_rows = [], []
            for i in range(batch_size):
                t, s = int(lens[i]), int(txt.attention_mask[i].sum())
                encoder_rows.append({"id": str(i), "n_audio": t, "encoder_out": enc[i, :t].float().flatten().cpu().numpy()})
                target_rows.append({"id": str(i), "label": labels[i], "split": "train", "n_audio": t,
                                    "input_ids": txt.input_ids[i, :s].int().cpu().numpy(),
                                    "attention": w_[i].cpu().numpy(), "effective_steps": float(1 / w_[i].square().sum()),
                                    "topk_ids": ids_[i, : s - 1].flatten().int().cpu().numpy(),
                                    "topk_logprobs": lps_[i, : s - 1].flatten().cpu().numpy()})
            sizes = []
            for rows_, schema in ((encoder_rows, ENCODER_SCHEMA), (target_rows, CACHE_SCHEMA)):
                buffer = io.BytesIO()
                write_rows(buffer, rows_, schema)  # as cache-teacher writes them
                sizes.append(buffer.getbuffer().nbytes)
            return sizes

        overhead = compare(lambda: step("pl-distill", batch), ce_every_logit, device, least=2 if quick else 40,
                           most=2 if quick else 200, agree=0.015)
        vs_ce = compare(lambda: step("pl-distill", batch), lambda: step("ce", batch), device, least, most)
        online = compare(online_step, lambda: step("pl-distill", batch), device, least, most)
        bound = compare(online_step, lambda: step("ce", batch), device, least, most)  # online / cached, no KD overhead
        encoder = compare(lambda: step("pl-distill", batch), encoder_ce_step, device, least, most)
        cache_vs_bare = compare(cache_rows, bare_teacher, device, least, most)
        store_bytes, target_bytes = cache_rows()
        steps_, positions = lengths_.tolist(), (text.attention_mask.sum(-1) - 1).tolist()
        # a naive cache: fp32 teacher projector features and dense full-vocabulary logits at every position
        naive = sum(4 * (t * projector.weight.shape[0] + s * teacher_vocab) for t, s in zip(steps_, positions))
        pdist = sum(int(l) * encoded.shape[-1] * 4 for l in lengths_)  # fp32 encoder output (+ W, b once)
        fp16_teacher = sum(int(l) * projector.weight.shape[0] * 2 for l in lengths_)
        audio = seconds * batch_size
        ms = lambda xs: f"{statistics.median(xs) * 1e3:.0f}"  # noqa: E731
        rows.append((f"{seconds:g}", online.cell(1), bound.cell(1), overhead.cell(), vs_ce.cell(), encoder.cell(),
                     f"{(store_bytes + target_bytes) / naive:.4f}x", f"{pdist / fp16_teacher:.2f}x",
                     cache_vs_bare.cell(), f"{ms(overhead.a)}, {ms(overhead.b)}, {ms(vs_ce.b)}, {ms(online.a)}",
                     f"{store_bytes / audio:,.0f}", f"{target_bytes / audio:,.0f}"))
        print(f"  {seconds:g} s: KD overhead {overhead.cell()} over {len(overhead.a)} pairs; pl-distill / CE "
              f"{vs_ce.cell()}; online/cached {online.cell(1)}", flush=True)
    return header, rows, about


def pipeline_stages(workdir: Path) -> tuple[list[tuple], float, Path]:
    """A fresh `dvc repro` of the default in a scratch copy; per stage: wall time, startup, phases."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, workdir)
    # the stages' code dependencies, as in a fresh clone
    shutil.copytree(ROOT / "pldistill_cli", workdir / "pldistill_cli", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PLDISTILL_TIMINGS": str(workdir / "timings.jsonl"), "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(workdir), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=workdir, check=True, env=env)
    shutil.copytree(ROOT / ".dvc" / "plots", workdir / ".dvc" / "plots", dirs_exist_ok=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=workdir, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"error: dvc repro failed in {workdir}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    rows = []
    for line in (workdir / "timings.jsonl").read_text().splitlines():
        r = json.loads(line)
        wall = r["startup"] + r["work"]
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1]) if v >= 0.5)
        rows.append((r["command"], f"{wall:.0f}", f"{r['startup']:.0f}", phases or "-"))
    return rows, total, workdir


@torch.no_grad()
def kl_gap(workdir: Path, device, dataset: str = "synthetic", fold: int = 1, clips: int = 32) -> tuple[list[tuple], str]:
    """Bucketed KL (teacher top-k + tail) vs the full KL, as k varies, on the pipeline's trained teacher and
    `ce` student over training clips (every LDist position)."""
    from pldistill_cli.config import load_params
    from pldistill_cli.data import AudioClips, AudioCollate
    from pldistill_cli.manifest import manifest_labels, read_manifest, select_split

    params = load_params(workdir / "params.yaml")
    layout = Layout(data=workdir / "data")
    teacher, processor = load_model(layout.teacher(dataset, fold), device)
    student, _ = load_model(layout.student(dataset, fold, student_name("ce", params.seeds[0])), device)
    labels = manifest_labels(layout.manifest(dataset))
    rows = select_split(read_manifest(layout.manifest(dataset)), fold, "train").head(clips)
    clips_ = AudioClips(rows, processor.feature_extractor.sampling_rate)
    batch = AudioCollate(processor)([clips_[i] for i in range(len(rows))])
    prompt = PromptLayout.from_processor(processor, labels)
    encoded, lengths = encode_audio(teacher, batch.features.to(device), batch.feature_mask.to(device))
    text = text_batch(prompt, lengths.tolist(), rows["label"].tolist()).to(device)
    t_logits, _, _ = forward_from_encoder(teacher, encoded, lengths, text.input_ids, text.attention_mask)
    s_logits, _, _ = forward_from_encoder(student, encoded, lengths, text.input_ids, text.attention_mask)
    mask = text.attention_mask[:, 1:].bool()
    vocab = t_logits.shape[-1]
    full = full_kl(s_logits[:, :-1], t_logits[:, :-1], mask, TEMPERATURE).mean()
    table = []
    for k in sorted({1, 4, 16, 64, 128, vocab}):
        bucketed = bucketed_kl(s_logits[:, :-1], *topk_logprobs(t_logits[:, :-1], k, TEMPERATURE), mask,
                               TEMPERATURE).mean()
        table.append((str(k), f"{float(bucketed):.4f}", f"{float(full):.4f}", f"{float(bucketed / full):.3f}"))
    return table, (f"{len(rows)} training clips ({int(mask.sum())} positions), the trained tiny teacher vs the `ce` "
                   f"student of the run above, T = {TEMPERATURE}, vocabulary {vocab}")


def markdown(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


NOTES = {
    "small": ["- **KD overhead**: a pl-distill step (CE + AW-CKA + bucketed KL at every position) over a CE step of "
              "the same student that computes the logits at every position too, both from the cache: what "
              "distillation's terms cost. What the teacher contributes is a constant of the clip, computed once "
              "before training and kept with the cached rows (`distill.teacher_memory_mb`): AW-CKA's teacher side in "
              "encoder space (Y = centred [X | 1] F, never the teacher's projector output; its step weights; its "
              "normaliser) and the KL's buckets (renormalised p, tail mass, entropy, ids). A step computes only the "
              "student's side: its centring, the cross term against Y and its own self term, and the KL through the "
              "output layer a chunk of positions at a time (`losses.linear_kl`: no [B, S, V] logits, gradients taken "
              "in the forward pass, about seven passes over each chunk's logits).",
              "- **pl-distill / CE**: the same step over the `ce` method's, which computes logits at the answer "
              "positions only: the price of LDist's logits at every position, which no fusion removes.",
              "- **online / cached** (target at least 5x): what the cache saves. Its ceiling is **online / CE** (a "
              "cached step is at least the student's own CE step): 1 + the teacher's forward pass over the student's "
              "step.",
              "- **cached / encoder**: a cached step against a CE step that runs the frozen encoder (the encoder "
              "dominates short clips).",
              "- **cache / naive**, **PDist / fp16**: bytes (a naive cache: fp32 teacher projector features and dense "
              "logits at every position). **cache / bare**: cache-teacher's work per batch (attention capture, top-k, "
              "Parquet) over bare teacher forward passes."],
    "proxy": ["- The `proxy` preset is `small` with Qwen's real vocabularies (151,936 student ids, tied as in "
              "Qwen2-0.5B; 156,032 teacher ids) and one layer of the real student LLM's width (896): per logit, the "
              "output layer costs what it costs at the paper's sizes, and the KL runs over every id. The `small` "
              "table's 384 ids cannot show that cost. Columns as above (KD overhead target: at most 1.10x)."],
}


def ratio_section(preset: str, lengths, batch, device) -> list[str]:
    header, rows, about = ratios(lengths, batch, device, preset)
    title = {"small": "## Distillation speed and cache size", "proxy": "## Distillation speed at Qwen's vocabulary"}
    return [title[preset], "", f"Measured on {MACHINE(device)}. " + about, "", *markdown(header, rows), "",
            *NOTES[preset], ""]


def pipeline_sections(device) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        stages, total, workdir = pipeline_stages(Path(scratch))
        table, about_kl = kl_gap(workdir, device)
    return ["## The default pipeline", "",
            f"A fresh `dvc repro` of the committed dvc.yaml and params.yaml took **{total / 60:.1f} min** on "
            f"{MACHINE(device)} (target: at most 5). Per stage: wall time, the startup share (importing torch, "
            "transformers and the stage), and the time under each kind of progress bar (nested bars count in both: "
            "validation runs inside training).", "",
            *markdown(("stage", "wall s", "startup s", "where it goes"), stages), "",
            "## Bucketed vs full KL as k varies", "", about_kl + ". The bucketed KL is a lower bound of the full KL; "
            "the cache's value equals the bucketed estimator computed from dense logits (tests).", "",
            *markdown(("k", "bucketed KL", "full KL", "bucketed / full"), table), ""]


def MACHINE(device) -> str:  # noqa: N802
    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, python "
            f"{platform.python_version()}, torch {torch.__version__}, "
            f"{'GPU ' + torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU fp32'}")


INTRO = ["# Benchmarks", "",
         "Regenerated by `python scripts/benchmark.py` (`--sections` redoes some sections and keeps the others; each "
         "says when and where it was measured). Every figure is a ratio or time measured side by side in one run: "
         "each ratio times its two sides alternately after a warm-up, adding pairs until the ratios of the first and "
         "second halves agree within 3% (KD overhead: at least 40 pairs, within 1.5%); it shows the median of the "
         "per-pair ratios (each pair runs back to back, so the machine's drift cancels) and, in brackets, the ratio "
         "of the minima. Times and ratios hold for the machine named (a GPU changes the balance between the "
         "encoder, the LLM and the losses; `bash scripts/gpu_check.sh` is the prepared GPU measurement); byte ratios "
         "and the KL table do not depend on it.", ""]
ORDER = ["## Distillation speed and cache size", "## Distillation speed at Qwen's vocabulary", "## The default pipeline",
         "## Bucketed vs full KL as k varies"]


def sections_of(text: str) -> dict[str, list[str]]:
    """The file's `## ` sections by heading (the intro before the first one is dropped: INTRO replaces it)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line
            out[current] = []
        if current is not None:
            out[current].append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=["small", "proxy", "pipeline"],
                        default=["small", "proxy", "pipeline"])
    parser.add_argument("--lengths", type=float, nargs="+", help="clip seconds (default 3 10 30; proxy 1 3)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="with --print: two pairs per ratio (a rehearsal)")
    parser.add_argument("--print", action="store_true", help="print --preset's table only; write nothing")
    parser.add_argument("--preset", default="small", help="with --print: small, proxy or paper")
    parser.add_argument("--teacher-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the teacher's weights (auto: bf16 on CUDA as cache-teacher holds it, else fp32)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.print:
        dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.teacher_dtype]
        header, rows, about = ratios(args.lengths or [30], args.batch, device, args.preset, dtype, args.quick)
        print("\n".join([f"{MACHINE(device)}. {about}", "", *markdown(header, rows)]))
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        return
    found = sections_of(args.out.read_text()) if args.out.exists() else {}
    for name in args.sections:
        if name == "pipeline":
            made = pipeline_sections(device)
        else:
            made = ratio_section(name, args.lengths or ([3, 10, 30] if name == "small" else [1, 3]), args.batch,
                                 device)
        found.update(sections_of("\n".join(made)))
    order = [h for h in ORDER if h in found] + [h for h in found if h not in ORDER]
    body = [line for heading in order for line in found[heading]]
    args.out.write_text("\n".join(INTRO + body).rstrip("\n") + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

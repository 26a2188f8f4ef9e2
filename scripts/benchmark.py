"""Regenerate BENCHMARKS.md: every figure a ratio or time measured side by side in this one run.

1. Distillation speed and cache size on the `small` preset (the real 30 s encoder window, the paper's
   proportions, random weights), per clip length:
     online / cached   a pl-distill step with the teacher run online vs the same step from the cache
     KD overhead       a pl-distill step vs a CE-only step, both from the cache (the teacher's
                       constants of the clip precomputed, as distill does)
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

Usage: python scripts/benchmark.py [--lengths 3 10 30] [--batch 2] [--skip-pipeline] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
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
from pldistill_cli.forward import audio_features, encode_audio, forward_from_encoder, forward_with_audio_attention
from pldistill_cli.labels import label_set
from pldistill_cli.layout import Layout, student_name
from pldistill_cli.losses import answer_cross_entropy, bucketed_kl, full_kl, topk_logprobs
from pldistill_cli.methods import CONSTANTS, METHODS, TargetCollate, Teacher, distillation_terms
from pldistill_cli.models import assemble_student, build_student_llm, build_teacher, count_parameters, get_preset, load_model
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


def ratios(lengths: list[float], batch_size: int, device) -> tuple[list[str], list[tuple], str]:
    torch.manual_seed(0)
    preset = get_preset("small")
    teacher, processor = build_teacher(preset, 0)
    teacher.to(device).eval()
    student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                               teacher.config.audio_token_index,
                               build_student_llm(preset, len(processor.tokenizer), 0), 0).to(device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, fused=True)  # as training.py
    prompt = PromptLayout.from_processor(processor, label_set("synthetic"))
    projector = teacher.model.multi_modal_projector.linear
    cached_teacher = Teacher.of(projector.weight.detach().float().cpu(), projector.bias.detach().float().cpu(),
                                TEMPERATURE)
    targets_teacher = cached_teacher.to(device)
    about = (f"`small` preset on {device} ({torch.get_num_threads()} threads): teacher {count_parameters(teacher):,} / "
             f"student {count_parameters(student):,} parameters (encoder {count_parameters(student.model.audio_tower):,}); "
             f"batch {batch_size}; vocabulary {teacher.config.text_config.vocab_size} (the tiny offline tokenizer)")
    print(about, flush=True)
    header = ["clip s", "online / cached", "online / CE", "KD overhead", "cached / encoder", "cache / naive", "PDist / fp16",
              "cache / bare", "steps (ms): pl-distill, CE, online", "store B per audio s", "targets B per audio s"]
    rows = []
    rng = np.random.default_rng(0)
    for seconds in lengths:
        waves = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(batch_size)]
        labels = ["Happy", "Sad"] * batch_size
        features, mask = (t.to(device) for t in audio_features(processor, waves))

        def teacher_targets():
            with torch.no_grad(), autocast(device):
                encoded, lengths_ = encode_audio(teacher, features, mask)
                text = text_batch(prompt, lengths_.tolist(), labels[:batch_size]).to(device)
                logits, w = forward_with_audio_attention(teacher, prompt, encoded, lengths_, text.input_ids,
                                                         text.attention_mask, -1)
                ids, lps = topk_logprobs(logits[:, :-1], TOP_K, TEMPERATURE)
            return encoded, lengths_, text, logits, w, ids, lps

        encoded, lengths_, text, logits, w, ids, lps = teacher_targets()
        items = []
        for i in range(batch_size):
            t, s = int(lengths_[i]), int(text.attention_mask[i].sum())
            items.append({"index": i, "label": labels[i], "input_ids": text.input_ids[i, :s].cpu(),
                          "encoded": encoded[i, :t].float().cpu(), "attention": w[i].cpu(),
                          "topk_ids": ids[i, : s - 1].cpu(), "topk_logprobs": lps[i, : s - 1].cpu()})
        kept = cached_teacher.constants(METHODS["pl-distill"], TargetCollate(prompt)(items),
                                        student.config.text_config.vocab_size)  # once per clip, as distill does
        batch = TargetCollate(prompt)([{**item, **row} for item, row in zip(items, kept)])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

        def step(method, targets):
            with autocast(device):
                loss = distillation_terms(student, targets, METHODS[method], targets_teacher, 1.0, 1.0)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def online_step():  # the teacher runs inside every step
            enc, _, _, _, w_, ids_, lps_ = teacher_targets()
            attention = torch.stack([torch.nn.functional.pad(x, (0, enc.shape[1] - len(x))) for x in w_])
            online = {k: v for k, v in batch.items() if k not in CONSTANTS}
            step("pl-distill", dict(online, encoded=enc.float(), attention=attention, topk_ids=ids_, topk_logprobs=lps_))

        def encoder_ce_step():  # plain CE fine-tuning that runs the (frozen) encoder
            with autocast(device):
                enc, lens = encode_audio(student, features, mask)
                out, _, _ = forward_from_encoder(student, enc, lens, batch["input_ids"], batch["attention_mask"])
                loss = answer_cross_entropy(out, batch["input_ids"], batch["answer_mask"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def bare_teacher():
            with torch.no_grad(), autocast(device):
                encd, lens = encode_audio(teacher, features, mask)
                forward_from_encoder(teacher, encd, lens, text.input_ids, text.attention_mask)

        def cache_rows():  # what cache-teacher does per batch, Parquet writes included: (store, target) bytes
            enc, lens, txt, _, w_, ids_, lps_ = teacher_targets()
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

        overhead = compare(lambda: step("pl-distill", batch), lambda: step("ce", batch), device, least=40,
                           most=200, agree=0.015)
        online = compare(online_step, lambda: step("pl-distill", batch), device, least=4)
        bound = compare(online_step, lambda: step("ce", batch), device, least=4)  # online / cached with no KD overhead
        encoder = compare(lambda: step("pl-distill", batch), encoder_ce_step, device, least=4)
        cache_vs_bare = compare(cache_rows, bare_teacher, device, least=4)
        store_bytes, target_bytes = cache_rows()
        naive = io.BytesIO()  # fp32 teacher projector features + dense full-vocabulary logits at every position
        for i in range(batch_size):
            t, s = int(lengths_[i]), int(text.attention_mask[i].sum())
            np.save(naive, cached_teacher.features(encoded[i, :t].cpu()).numpy())
            np.save(naive, logits[i, : s - 1].float().cpu().numpy())
        pdist = sum(int(l) * encoded.shape[-1] * 4 for l in lengths_)  # fp32 encoder output (+ W, b once)
        fp16_teacher = sum(int(l) * projector.weight.shape[0] * 2 for l in lengths_)
        audio = seconds * batch_size
        ms = lambda xs: f"{statistics.median(xs) * 1e3:.0f}"  # noqa: E731
        rows.append((f"{seconds:g}", online.cell(1), bound.cell(1), overhead.cell(), encoder.cell(),
                     f"{(store_bytes + target_bytes) / naive.getbuffer().nbytes:.4f}x", f"{pdist / fp16_teacher:.2f}x",
                     cache_vs_bare.cell(), f"{ms(overhead.a)}, {ms(overhead.b)}, {ms(online.a)}",
                     f"{store_bytes / audio:,.0f}", f"{target_bytes / audio:,.0f}"))
        print(f"  {seconds:g} s: KD overhead {overhead.cell()} over {len(overhead.a)} pairs; online/cached "
              f"{online.cell(1)}", flush=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=float, nargs="+", default=[3, 10, 30])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the ratios (no dvc repro, no KL table)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, torch "
               f"{torch.__version__}, {'GPU ' + torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU fp32'}")
    header, rows, about = ratios(args.lengths, args.batch, device)
    md = ["# Benchmarks", "",
          f"Regenerated by `python scripts/benchmark.py` on {time.strftime('%Y-%m-%d')} ({machine}). Every figure is "
          "a ratio or time measured side by side in that one run: each ratio times its two sides alternately after "
          "a warm-up, adding pairs until the ratios of the first and second halves agree within 3% (KD overhead: "
          "at least 40 pairs, within 1.5%); it shows the median of the per-pair ratios (each pair runs back to "
          "back, so the machine's drift cancels) and, in brackets, the ratio of the minima.", "",
          "## Distillation speed and cache size", "", about, "", *markdown(header, rows), "",
          "- **KD overhead** (target at most 1.05x): a pl-distill step (CE + AW-CKA + bucketed KL "
          "at every position) over a CE-only step, both from the cache. What the teacher contributes is a constant of "
          "the clip, computed once before training and kept with the cached rows (`distill.teacher_memory_mb`): "
          "AW-CKA's teacher side in encoder space (Y = centred [X | 1] F, never the teacher's projector output; its "
          "step weights; its normaliser) and the KL's buckets (renormalised p, tail mass, entropy, ids). A step "
          "computes only the student's side: its centring, the cross term against Y and its own self term, and the "
          "KL from its logits with one exp per log-sum-exp (a hand-written backward).",
          "- **online / cached** (target at least 5x): what the cache saves. Its ceiling is **online / CE** (a "
          "cached step is at least the student's own CE step): 1 + the teacher's forward pass over the student's "
          "step; measured in separate pairs, the two can cross by noise where the KD overhead is small. At 30 s the student's LLM over 750 audio tokens is a large share of the teacher's pass on the "
          "`small` preset, so that bound itself is near 5x on this machine; at the paper's sizes (a 7B teacher, a "
          "0.5B student LLM) it is far larger.",
          "- **cached / encoder**: a cached step against a CE step that runs the frozen encoder (the encoder "
          "dominates short clips).",
          "- **cache / naive**, **PDist / fp16**: bytes; at Qwen's 151,936-id vocabulary the naive cache's dense "
          "logits would be about 400 times larger, the ratio that much smaller. **cache / bare**: cache-teacher's "
          "work per batch (attention capture, top-k, Parquet) over bare teacher forward passes.", ""]
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory() as scratch:
            stages, total, workdir = pipeline_stages(Path(scratch))
            table, about_kl = kl_gap(workdir, device)
        md += ["## The default pipeline", "",
               f"A fresh `dvc repro` of the committed dvc.yaml and params.yaml took **{total / 60:.1f} min** "
               "(target: at most 5). Per stage: wall time, the startup share (importing torch, transformers and "
               "the stage), and the time under each kind of progress bar (nested bars count in both: validation "
               "runs inside training).", "",
               *markdown(("stage", "wall s", "startup s", "where it goes"), stages), "",
               "## Bucketed vs full KL as k varies", "", about_kl + ". The bucketed KL is a lower bound of the full KL; "
               "the cache's value equals the bucketed estimator computed from dense logits (tests).", "",
               *markdown(("k", "bucketed KL", "full KL", "bucketed / full"), table), ""]
    md += ["Figures that hold only for this machine: every time and ratio above (a GPU changes the balance between "
           "the encoder, the LLM and the losses; `bash scripts/gpu_check.sh` is the prepared GPU measurement). Byte "
           "ratios and the KL table do not depend on the machine.", ""]
    args.out.write_text("\n".join(md))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

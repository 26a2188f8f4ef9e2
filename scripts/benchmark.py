"""Distillation speed and cache size, measured side by side in one run, on the `small` preset (the
real 30 s encoder window, the paper's parameter proportions, random weights).

Per clip length it prints the ratios the cache is for:
  online / cached      a distill step with the teacher run online vs the same step from cached targets
  KD overhead          a pl-distill step vs a CE-only step, both on cached encoder output
  cached / encoder     a pl-distill step on cached encoder output vs a CE step that runs the encoder
  cache / naive        cache bytes per second of audio vs fp32 teacher features + dense logits everywhere
  PDist / fp16         bytes of the PDist targets (encoder output) vs fp16 teacher projector features
  cache / bare         cache-teacher wall time vs bare teacher forward passes over the same clips
Cache bytes are the encoder store's row (once per corpus) plus the fold's target row.

Then, when the default pipeline has run (`dvc repro`: a trained tiny teacher and `ce` student),
the gap between the bucketed KL (top-k + tail) and the full KL as k varies, on their logits over
training clips.

Usage: python scripts/benchmark.py [--lengths 3 10 30] [--batch 2] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

from pldistill_cli.data import text_batch
from pldistill_cli.methods import METHODS, TargetCollate, distillation_terms
from pldistill_cli.prompt import PromptLayout
from pldistill_cli.forward import (audio_features, encode_audio, forward_from_encoder,
                                   forward_with_audio_attention)
from pldistill_cli.labels import label_set
from pldistill_cli.layout import Layout, student_name
from pldistill_cli.losses import answer_cross_entropy, bucketed_kl, full_kl, topk_logprobs
from pldistill_cli.models import (assemble_student, build_student_llm, build_teacher, count_parameters, get_preset,
                                  load_model)
from pldistill_cli.cache import CACHE_SCHEMA, ENCODER_SCHEMA, write_rows
from pldistill_cli.training import autocast, resolve_device

TOP_K, TEMPERATURE = 16, 2.0


def timed(fn, device, repeats):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=float, nargs="+", default=[3, 10, 30])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    preset = get_preset("small")
    teacher, processor = build_teacher(preset, 0)
    teacher.to(device).eval()
    student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                               teacher.config.audio_token_index,
                               build_student_llm(preset, len(processor.tokenizer), 0), 0).to(device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    prompt = PromptLayout.from_processor(processor, label_set("synthetic"))
    weight = teacher.model.multi_modal_projector.linear.weight.detach().float()
    bias = teacher.model.multi_modal_projector.linear.bias.detach().float()
    vocab = teacher.config.text_config.vocab_size
    print(f"small preset on {device}: teacher {count_parameters(teacher):,} / student {count_parameters(student):,} "
          f"parameters (encoder {count_parameters(student.model.audio_tower):,}); batch {args.batch}, "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}")

    header = ("clip s", "online/cached", "KD overhead", "cached/encoder", "cache/naive", "PDist/fp16",
              "cache/bare", "store B per audio s", "targets B per audio s")
    rows = []
    rng = np.random.default_rng(0)
    for seconds in args.lengths:
        waves = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(args.batch)]
        labels = ["Happy", "Sad"] * args.batch
        features, mask = audio_features(processor, waves)
        features, mask = features.to(device), mask.to(device)

        def teacher_targets():
            with torch.no_grad(), autocast(device):
                encoded, lengths = encode_audio(teacher, features, mask)
                text = text_batch(prompt, lengths.tolist(), labels[: args.batch]).to(device)
                logits, w = forward_with_audio_attention(teacher, prompt, encoded, lengths, text.input_ids,
                                                         text.attention_mask, -1)
                ids, lps = topk_logprobs(logits[:, :-1], TOP_K, TEMPERATURE)
            return encoded, lengths, text, logits, w, ids, lps

        encoded, lengths, text, logits, w, ids, lps = teacher_targets()
        items = []
        for i in range(args.batch):
            t, s = int(lengths[i]), int(text.attention_mask[i].sum())
            items.append({"index": i, "label": labels[i], "input_ids": text.input_ids[i, :s].cpu(),
                          "encoded": encoded[i, :t].float().cpu(), "attention": w[i].cpu(),
                          "topk_ids": ids[i, : s - 1].cpu(), "topk_logprobs": lps[i, : s - 1].cpu()})
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in TargetCollate(prompt)(items).items()}

        def step(method, targets):
            with autocast(device):
                loss = distillation_terms(student, targets, METHODS[method], weight, bias, 1.0, 1.0, TEMPERATURE)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def online_step():  # the teacher runs inside every step
            enc, lens, txt, _, w_, ids_, lps_ = teacher_targets()
            attention = torch.stack([torch.nn.functional.pad(x, (0, enc.shape[1] - len(x))) for x in w_])
            online = dict(batch, encoded=enc.float(), attention=attention, topk_ids=ids_, topk_logprobs=lps_)
            step("pl-distill", online)

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
            for i in range(args.batch):
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

        t_cached = timed(lambda: step("pl-distill", batch), device, args.repeats)
        t_ce = timed(lambda: step("ce", batch), device, args.repeats)
        t_online = timed(online_step, device, args.repeats)
        t_encoder = timed(encoder_ce_step, device, args.repeats)
        t_bare = timed(bare_teacher, device, args.repeats)
        t_cache = timed(cache_rows, device, args.repeats)
        store_bytes, target_bytes = cache_rows()
        cache_bytes = store_bytes + target_bytes

        naive = io.BytesIO()  # fp32 teacher projector features + dense full-vocabulary logits at every position
        for i in range(args.batch):
            t, s = int(lengths[i]), int(text.attention_mask[i].sum())
            np.save(naive, (encoded[i, :t].float() @ weight.T + bias).cpu().numpy())
            np.save(naive, logits[i, : s - 1].float().cpu().numpy())
        pdist = sum(int(l) * encoded.shape[-1] * 4 for l in lengths)  # fp32 encoder output (+ W, b once)
        fp16_teacher = sum(int(l) * weight.shape[0] * 2 for l in lengths)
        audio_seconds = seconds * args.batch
        rows.append((f"{seconds:g}", f"{t_online / t_cached:.1f}x", f"{t_cached / t_ce:.2f}x",
                     f"{t_cached / t_encoder:.2f}x", f"{cache_bytes / naive.getbuffer().nbytes:.4f}x",
                     f"{pdist / fp16_teacher:.2f}x", f"{t_cache / t_bare:.2f}x",
                     f"{store_bytes / audio_seconds:,.0f}", f"{target_bytes / audio_seconds:,.0f}"))
        print(f"  {seconds:g} s: cached step {t_cached * 1e3:.0f} ms, CE step {t_ce * 1e3:.0f} ms, online step "
              f"{t_online * 1e3:.0f} ms, encoder CE step {t_encoder * 1e3:.0f} ms, bare teacher {t_bare * 1e3:.0f} ms, "
              f"cache-teacher {t_cache * 1e3:.0f} ms; vocab {vocab}", flush=True)

    print_table(header, rows)
    kl_gap(device)


def print_table(header, rows) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("\n| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


@torch.no_grad()
def kl_gap(device, dataset: str = "synthetic", fold: int = 1, clips: int = 32) -> None:
    """Bucketed KL (teacher top-k + tail) vs the full KL, as k varies, on the default pipeline's trained
    tiny teacher and `ce` student over training clips (every LDist position)."""
    from pldistill_cli.data import AudioClips, AudioCollate
    from pldistill_cli.manifest import manifest_labels, read_manifest, select_split

    layout = Layout()
    teacher_dir, student_dir = layout.teacher(dataset, fold), layout.student(dataset, fold, student_name("ce", 42))
    if not (teacher_dir.exists() and student_dir.exists()):
        print(f"\nKL gap: skipped ({teacher_dir} or {student_dir} missing; run `dvc repro` first)")
        return
    teacher, processor = load_model(teacher_dir, device)
    student, _ = load_model(student_dir, device)
    labels = manifest_labels(layout.manifest(dataset))
    rows = select_split(read_manifest(layout.manifest(dataset)), fold, "train").head(clips)
    batch = AudioCollate(processor)([AudioClips(rows)[i] for i in range(len(rows))])
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
    print(f"\nKL gap on {len(rows)} training clips ({int(mask.sum())} positions), trained tiny teacher vs ce "
          f"student, T = {TEMPERATURE}, vocabulary {vocab}:")
    print_table(("k", "bucketed KL", "full KL", "bucketed / full"), table)


if __name__ == "__main__":
    main()

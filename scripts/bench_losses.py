"""Timings of the PDist and LDist losses, forward + backward, on one thread (CPU) or the GPU.

PDist: AW-CKA against the linear teacher Z_T = X W^T + b, three ways, interleaved (A, B, C, A, B,
C, ... after a warm-up) so that drifts of the machine hit all of them alike:
  full+proj   aw_cka(student, X W^T + b)        what distill.py does with an encoder cache
  full        aw_cka(student, Z_T)              Z_T given (a feature cache)
  encoded     aw_cka_encoded(student, X, F, teacher_norm=...)   F, teacher_norm precomputed
  step        aw_cka_teacher(student, teacher_side(X, F, ...))  the teacher side kept, as distill does
for each estimator; prints the median and min over the repeats (ms) and median ratios.

LDist (--kl): bucketed_kl, forward + backward, next to what distill's step computes (kl_from_targets,
the teacher's side kl_targets kept) and to kl_targets alone.

Usage: python scripts/bench_losses.py [--lengths 75 250 750] [--batch 2] [--repeats 15]
                                      [--threads 1] [--device cpu] [--kl]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pldistill_cli.losses import (ESTIMATORS, aw_cka, aw_cka_encoded, aw_cka_teacher, bucketed_kl, kl_from_targets,
                                  kl_targets, teacher_factor, teacher_self_norm, teacher_side, topk_logprobs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall times (s) of each callable, run in turn A, B, C, A, B, C, ... after `warmup` rounds."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def fwd_bwd(fn, student: torch.Tensor):
    def run() -> None:
        student.grad = None
        fn().sum().backward()

    return run


def bench_pdist(lengths, batch, ds, denc, dt, repeats, device) -> None:
    print(f"PDist: B={batch} Ds={ds} Denc={denc} Dt={dt} float32, forward+backward, ms (median / min)")
    for t in lengths:
        gen = torch.Generator().manual_seed(t)
        encoded = torch.randn(batch, t, denc, generator=gen).to(device)
        weight = (torch.randn(dt, denc, generator=gen) / denc**0.5).to(device)
        bias = torch.randn(dt, generator=gen).to(device)
        student = torch.randn(batch, t, ds, generator=gen).to(device).requires_grad_(True)
        w = torch.rand(batch, t, generator=gen).to(device)
        mask = torch.ones(batch, t, dtype=torch.bool, device=device)
        mask[-1, t - t // 5:] = False  # one padded clip
        teacher = encoded @ weight.T + bias
        factor = teacher_factor(weight, bias)
        for est in ESTIMATORS:
            norm = teacher_self_norm(encoded, factor, w, mask, estimator=est)
            side = teacher_side(encoded, factor, w, mask, estimator=est)
            fns = {
                "full+proj": fwd_bwd(lambda: aw_cka(student, encoded @ weight.T + bias, w, mask, estimator=est),
                                     student),
                "full": fwd_bwd(lambda: aw_cka(student, teacher, w, mask, estimator=est), student),
                "encoded": fwd_bwd(lambda: aw_cka_encoded(student, encoded, factor, w, mask, estimator=est,
                                                          teacher_norm=norm), student),
                "step": fwd_bwd(lambda: aw_cka_teacher(student, side), student),
            }
            times = interleaved(fns, device, repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = "  ".join(f"{k} {1e3 * med[k]:7.2f} / {1e3 * min(v):7.2f}" for k, v in times.items())
            print(f"T={t:4d} {est:8s}  {cells}   full/encoded {med['full'] / med['encoded']:.2f}x"
                  f"  full+proj/encoded {med['full+proj'] / med['encoded']:.2f}x")


def bench_kl(batch, positions, k, vocabs, repeats, device) -> None:
    print(f"LDist: B={batch} L={positions} k={k}, ms (median / min)")
    for v in vocabs:
        gen = torch.Generator().manual_seed(v)
        student = (2 * torch.randn(batch, positions, v, generator=gen)).to(device).requires_grad_(True)
        ids, logprobs = topk_logprobs((2 * torch.randn(batch, positions, v, generator=gen)).to(device), k, 2.0)
        mask = torch.ones(batch, positions, dtype=torch.bool, device=device)
        targets = kl_targets(ids, logprobs, mask, v)
        fns = {
            "bucketed_kl fwd+bwd": fwd_bwd(lambda: bucketed_kl(student, ids, logprobs, mask, 2.0), student),
            "step": fwd_bwd(lambda: kl_from_targets(student, targets, mask, 2.0), student),
            "teacher-only part": lambda: kl_targets(ids, logprobs, mask, v),
        }
        times = interleaved(fns, device, repeats)
        med = {name: statistics.median(t) for name, t in times.items()}
        cells = "  ".join(f"{name} {1e3 * med[name]:8.3f} / {1e3 * min(t):8.3f}" for name, t in times.items())
        print(f"V={v:6d}  {cells}   share {100 * med['teacher-only part'] / med['bucketed_kl fwd+bwd']:.2f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[75, 250, 750])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ds", type=int, default=256)
    parser.add_argument("--denc", type=int, default=256)
    parser.add_argument("--dt", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kl", action="store_true", help="also time bucketed_kl (B=2, L=800, k=16)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[384, 151936])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bench_pdist(args.lengths, args.batch, args.ds, args.denc, args.dt, args.repeats, device)
    if args.kl:
        bench_kl(2, 800, 16, args.vocabs, max(3, args.repeats // 3), device)


if __name__ == "__main__":
    main()

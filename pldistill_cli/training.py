"""The training loop shared by train-teacher and distill: AdamW, cosine schedule, gradient
accumulation, clipping, bf16 autocast on CUDA, selection on the validation split, and resumption
from a per-epoch state kept in a work folder that DVC does not delete."""

from __future__ import annotations

import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from .errors import PldistillError
from .ui import progress


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PldistillError("device `cuda` requested but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    lr: float
    weight_decay: float
    max_grad_norm: float
    grad_accum: int = 1
    warmup_steps: int = 0


@dataclass
class LoopResult:
    best_score: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}


def train_with_validation(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable],
    step: Callable[[object], dict[str, torch.Tensor]],
    validate: Callable[[], float],
    settings: LoopSettings,
    steps_per_epoch: int,
    work_dir: Path,
    fingerprint: str,
    description: str,
) -> LoopResult:
    """Train the model's trainable parameters; keep the weights that score best on validation.

    `batches(epoch)` yields the epoch's batches, `step(batch)` returns the loss terms with the total
    under "loss", `validate()` scores the model (higher is better). State is saved after every
    epoch in work_dir and picked up again by a re-run with the same fingerprint; on return the
    model holds the best weights; the caller removes the work folder once its output is saved."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    updates = max(1, settings.epochs * steps_per_epoch // settings.grad_accum)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, updates)
    result, start, best_state = LoopResult(float("-inf"), -1), 0, None
    state_file = work_dir / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["rng"])
            result, start, best_state = state["result"], state["epoch"] + 1, state["best"]

    with progress(description, settings.epochs * steps_per_epoch) as bar:
        bar.update(completed=start * steps_per_epoch)
        for epoch in range(start, settings.epochs):
            model.train()
            totals: dict[str, float] = {}
            n = 0
            for i, batch in enumerate(batches(epoch)):
                terms = step(batch)
                (terms["loss"] / settings.grad_accum).backward()
                if (i + 1) % settings.grad_accum == 0 or i + 1 == steps_per_epoch:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
                n += 1
                info = " ".join(f"{k} {v / n:.3f}" for k, v in totals.items())
                bar.advance(1, info=f"epoch {epoch + 1} {info}")
            model.eval()
            score = validate()
            record = {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in totals.items()}, "validation_ua": score}
            result.history.append(record)
            if score > result.best_score:
                result.best_score, result.best_epoch, best_state = score, epoch + 1, _trainable_state(model)
            bar.update(info=f"epoch {epoch + 1} val UA {score:.3f} (best {result.best_score:.3f})")
            work_dir.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            torch.save(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": _trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),
                    "result": result,
                    "best": best_state,
                },
                tmp,
            )
            tmp.replace(state_file)
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return result


def finish_work(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)

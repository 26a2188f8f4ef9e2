"""The training loop and fitting routine shared by every training stage (pretrain-encoder, pretrain-teacher,
train-teacher, distill): AdamW, cosine schedule, gradient
accumulation, clipping, bf16 autocast on CUDA, selection on the validation split, resumption
from a per-epoch state kept in a work folder that DVC does not delete, and data parallelism over
the processes that torchrun or `accelerate launch` started (accelerate's DDP)."""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from .errors import PldistillError
from .files import atomic_path, write_json
from .ui import console, interrupted, progress


def resolve_device(name: str) -> torch.device:
    """The device of this process: with several processes on CUDA, the GPU of its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PldistillError("device `cuda` requested but no CUDA GPU is visible; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def start_processes(device: torch.device, world_size: int = 0):
    """This process's place in the run (accelerate's PartialState: process_index, num_processes,
    wait_for_everyone). Under torchrun or `accelerate launch` it joins the process group (NCCL on
    GPUs, gloo on CPU); started plainly it is the only process. `world_size` > 0 is the number of
    processes the run expects: any other count is an error, not a silently repeated run."""
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if world_size and state.num_processes != world_size:
        raise PldistillError(
            f"params.yaml: world_size is {world_size} but {state.num_processes} process(es) started; launch with "
            f"`torchrun --nproc-per-node {world_size} -m pldistill_cli ...` or set world_size: 0")
    return state


def shard(batches: list[list[int]], state, grad_accum: int = 1) -> list[list[int]]:
    """This process's share of an epoch's batches: every process gets the same number of whole
    accumulation groups (DDP needs equal steps), floor(batches / processes / grad_accum) of them;
    the batches left over are dropped (at most processes x grad_accum - 1)."""
    n = state.num_processes
    per_process = len(batches) // n // grad_accum * grad_accum
    if per_process == 0:
        raise PldistillError(f"{len(batches)} batches per epoch cannot feed {n} process(es) x grad_accum {grad_accum}; "
                             "lower batch_size, grad_accum or the number of processes")
    return batches[state.process_index :: n][:per_process]


def sharded_predictions(n_items: int, predict: Callable[[list[int]], list[str]], state) -> list[str]:
    """Every process predicts its share of the n items (every num_processes-th); every process gets
    all n predictions back, in order (validation costs 1 / num_processes of one process's time)."""
    mine = list(range(state.process_index, n_items, state.num_processes))
    pairs = list(zip(mine, predict(mine)))
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    out = [""] * n_items
    for i, prediction in pairs:
        out[i] = prediction
    return out


def shuffled_batches(n_items: int, batch_size: int, seed: int) -> list[list[int]]:
    """The batches of a RandomSampler with a generator seeded `seed`, cut by a BatchSampler (a shuffling
    DataLoader given that generator draws other ones: it first takes its workers' base seed from it)."""
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (or on a CPU told to take CUDA's choices: models.bf16_device); plain fp32 on CPU."""
    from .models import bf16_device

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16_device(device) else nullcontext()


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
    patience: int = 0  # stop after this many epochs without a better validation score (0 = never)

    @classmethod
    def of(cls, section) -> "LoopSettings":
        """A stage's params section (`epochs`, `lr`, `weight_decay`; `max_grad_norm`, `grad_accum`, `patience`
        where the stage has them)."""
        return cls(section.epochs, section.lr, section.weight_decay, getattr(section, "max_grad_norm", 1.0),
                   getattr(section, "grad_accum", 1), patience=getattr(section, "patience", 0))


@dataclass
class LoopResult:
    best_score: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)  # per epoch (epoch 0: before training, if diagnosed)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}


class TrainingStep(torch.nn.Module):
    """The trained modules and the function computing their loss terms for a batch, as one module,
    so that DDP sees the forward pass it synchronises gradients for."""

    def __init__(self, modules: dict[str, torch.nn.Module], terms: Callable[[object], dict[str, torch.Tensor]]):
        super().__init__()
        self.parts = torch.nn.ModuleDict(modules)
        self.terms = terms

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return self.terms(batch)


def train_with_validation(
    model: TrainingStep,
    batches: Callable[[int], Iterable],
    validate: Callable[[], float] | None,
    settings: LoopSettings,
    steps_per_epoch: int,
    work_dir: Path,
    fingerprint: str,
    description: str,
    diagnose: Callable[[], dict] | None = None,
    score_name: str = "validation_ua",
) -> LoopResult:
    """Train the model's trainable parameters; keep the weights that score best on validation.

    `batches(epoch)` yields this process's batches of the epoch (whole accumulation groups: see
    shard), `model(batch)` returns the loss terms with the total under "loss", `validate()` scores
    the model (higher is better; every process gets the same score; None: keep the last epoch), recorded
    in the history as `score_name`. `diagnose()`, if given, adds
    its numbers to the history before training (epoch 0) and after every epoch. Training stops early
    after `patience` epochs without improvement. With several processes the model trains data-
    parallel (accelerate's DDP; the main process writes the state). State is saved after every epoch
    in work_dir and picked up again by a re-run with the same fingerprint; on return the model holds
    the best weights; the caller removes the work folder once its output is saved."""
    from accelerate import Accelerator

    device = next(model.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu")
    parallel = accelerator.prepare_model(model) if accelerator.num_processes > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for the whole update (on CPU about 5x faster than the per-tensor loop at 3M parameters)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    updates = settings.epochs * steps_per_epoch // settings.grad_accum
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, updates)
    result, start, best_state = LoopResult(float("-inf"), -1), 0, None
    state_file, progress_file = work_dir / "state.pt", work_dir / "state.json"
    resumed = _resume(state_file, progress_file, fingerprint, accelerator.is_main_process)
    if resumed is not None:
        state, done = resumed
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        best_state, start = state["best"], done["epoch"] + 1
        result = LoopResult(done["best_score"], done["best_epoch"], done["history"])
    elif diagnose is not None:
        model.eval()
        result.history.append({"epoch": 0, **diagnose()})

    with progress(description, settings.epochs * steps_per_epoch) as bar:
        bar.update(completed=start * steps_per_epoch)
        for epoch in range(start, settings.epochs):
            # epochs since the best one (best_epoch is -1 until an epoch has been scored: count from the start)
            if settings.patience and epoch - max(result.best_epoch, 0) >= settings.patience:
                break  # no better validation score for `patience` epochs
            model.train()
            totals: dict[str, float] = {}
            n = steps = 0
            for i, batch in enumerate(batches(epoch)):
                if interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt was swallowed on the way
                    raise KeyboardInterrupt
                update = (i + 1) % settings.grad_accum == 0
                with nullcontext() if update else accelerator.no_sync(parallel):  # all-reduce once per update
                    terms = parallel(batch)
                    _check_finite(terms, epoch, i)
                    accelerator.backward(terms["loss"] / settings.grad_accum)
                if update:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
                n += 1
                info = " ".join(f"{k} {v / n:.3f}" for k, v in totals.items())
                bar.advance(1, info=f"epoch {epoch + 1} {info}")
            model.eval()
            score = validate() if validate is not None else float(epoch)  # no validation: keep the last
            record = {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in totals.items()}, score_name: score,
                      "updates": steps, **(diagnose() if diagnose is not None else {})}
            result.history.append(record)
            if score > result.best_score:
                result.best_score, result.best_epoch, best_state = score, epoch + 1, _trainable_state(model)
            losses = " ".join(f"{k} {v / max(n, 1):.3f}" for k, v in totals.items())
            bar.report(f"epoch {epoch + 1} {losses} {score_name} {score:.3f} (best {result.best_score:.3f})")
            if not accelerator.is_main_process:
                continue
            # tensors in state.pt (loaded with weights_only=True: a planted file cannot run code), the
            # rest as JSON; state.json is written last and names the epoch state.pt holds
            with atomic_path(state_file) as tmp:
                torch.save({"epoch": epoch, "model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "best": best_state}, tmp)
            write_json(progress_file, {"fingerprint": fingerprint, "epoch": epoch, "best_score": result.best_score,
                                       "best_epoch": result.best_epoch, "history": result.history})
    accelerator.wait_for_everyone()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return result


@dataclass(frozen=True)
class Run:
    """What one training run fits: the trained modules' step, the batches of each epoch, and their count."""

    step: TrainingStep
    batches: Callable[[int], Iterable]
    steps_per_epoch: int
    clips: int = 0  # training clips (recorded for a refit)


Saved = TypeVar("Saved")


def fit(run: Run, validate: Callable[[], float], settings: LoopSettings, work_dir: Path, fingerprint: str,
        description: str, save: Callable[[LoopResult, dict | None, bool], Saved], *,
        refit: Callable[[], Run] | None = None, processes=None, diagnose: Callable[[], dict] | None = None,
        score_name: str = "validation_ua") -> Saved:
    """Every training stage's fitting: train `run` keeping the epoch that `validate` scores best
    (train_with_validation); with `refit`, retrain the run it builds (train + validation, fresh from the same
    start) for that many epochs without validation; then `save(result, refit record or None, write)` on every
    process, `write` true on the main one only (it writes the output), the work folder removed; returns what
    save returns."""
    result = train_with_validation(run.step, run.batches, validate, settings, run.steps_per_epoch, work_dir,
                                   fingerprint, description, diagnose, score_name)
    refitted = None
    if refit is not None:
        again = refit()
        train_with_validation(again.step, again.batches, None, replace(settings, epochs=result.best_epoch, patience=0),
                              again.steps_per_epoch, work_dir / "refit", fingerprint,
                              f"refit: {description} on train + validation")
        refitted = {"epochs": result.best_epoch, "clips": again.clips}
    main = processes is None or processes.is_main_process
    saved = save(result, refitted, main)
    if main:
        finish_work(work_dir)
    if processes is not None:
        processes.wait_for_everyone()
    return saved


def _check_finite(terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """A non-finite loss stops the run before anything is saved: its weights would be garbage."""
    if not torch.isfinite(terms["loss"].detach()).all():
        values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
        raise PldistillError(f"non-finite loss at epoch {epoch + 1}, step {step + 1} ({values}); nothing was saved: "
                             "lower the learning rate or a loss weight, or check the inputs")


_STATE = {"epoch", "model", "optimizer", "schedule", "rng", "best"}  # what state.pt holds (tensors)
_PROGRESS = {"fingerprint", "epoch", "best_score", "best_epoch", "history"}  # what state.json holds


def _resume(state_file: Path, progress_file: Path, fingerprint: str, announce: bool = True) -> tuple[dict, dict] | None:
    """The saved state of an interrupted run with the same fingerprint, or None to start afresh; with
    `announce`, one line says which: resuming from an epoch, or a state discarded (unreadable, refused or
    made with other settings). The work folder is only a resume cache: nothing in it is ever executed."""
    if not (state_file.exists() and progress_file.exists()):
        return None
    say = (lambda line: console.print(line, highlight=False, soft_wrap=True)) if announce else (lambda line: None)
    state = done = None
    try:
        done = json.loads(progress_file.read_text())
        if isinstance(done, dict) and _PROGRESS <= done.keys() and done["fingerprint"] != fingerprint:
            say(f"[yellow]warning:[/] discarded a state in {state_file.parent} made with other settings; starting afresh")
            return None
        with warnings.catch_warnings():  # a planted pickle makes torch warn before it refuses it
            warnings.simplefilter("ignore")
            state = torch.load(state_file, weights_only=True)
    except Exception:  # unreadable, truncated or refused by weights_only: torch raises many kinds
        pass
    ours = isinstance(done, dict) and _PROGRESS <= done.keys() and isinstance(state, dict) and \
        _STATE <= state.keys() and state["epoch"] == done["epoch"]
    if not ours:
        say(f"[yellow]warning:[/] discarded an unreadable state in {state_file.parent}; starting afresh")
        return None
    say(f"resuming from epoch {done['epoch'] + 1} (saved in {state_file.parent})")
    return state, done


def finish_work(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)

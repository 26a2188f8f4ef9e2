"""Run by test_distributed under torchrun: the shared training loop on a toy model, data-parallel.
Each process writes what it ended with (weights, updates per epoch, which validation items it scored
and the predictions it got back) to OUT/rank<k>.json."""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from pldistill_cli.training import (LoopSettings, TrainingStep, shard, sharded_predictions, shuffled_batches,
                                    train_with_validation)

out, n_batches, grad_accum = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
state = PartialState(cpu=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
data = torch.randn(n_batches * 4, 4, generator=torch.Generator().manual_seed(1))
target = data.sum(1, keepdim=True)
scored: list[list[int]] = []


def batches(epoch):
    own = shard(shuffled_batches(len(data), 4, epoch), state, grad_accum)
    return [torch.tensor(b) for b in own]


def validate():
    def predict(rows):
        scored.append(rows)
        with torch.no_grad():
            return [f"{float(model(data[i : i + 1])):.4f}" for i in rows]

    predictions = sharded_predictions(len(data), predict, state)
    validate.predictions = predictions
    return -sum((float(p) - float(t)) ** 2 for p, t in zip(predictions, target))


step = TrainingStep({"model": model}, lambda idx: {"loss": (model(data[idx]) - target[idx]).square().mean()})
result = train_with_validation(step, batches, validate, LoopSettings(epochs=3, lr=0.05, weight_decay=0.0,
                                                                     max_grad_norm=10.0, grad_accum=grad_accum),
                               len(batches(0)), out / f"work{state.process_index}", "fp", "probe")
record = {
    "weights": [p.detach().flatten().tolist() for p in model.parameters()],
    "updates": [h["updates"] for h in result.history],
    "scored": scored[-1],
    "predictions": validate.predictions,
    "best_epoch": result.best_epoch,
}
if os.environ.get("MUTANT_UNDER_TEST") == "stats":  # mutmut's coverage pass (scripts/mutation.sh)
    from mutmut.state import state as mutmut_state

    record["mutmut_functions"] = sorted(mutmut_state()._stats)  # the mutated functions this process ran
(out / f"rank{state.process_index}.json").write_text(json.dumps(record))

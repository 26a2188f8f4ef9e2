"""Interrupted stages resume: a killed run, re-run, ends exactly where an uninterrupted run ends."""

import json
import pytest
import torch

from pldistill_cli.training import LoopSettings, TrainingStep, train_with_validation


class Boom(Exception):
    pass


def _train(work, fail_at_epoch=None, epochs_run=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    target = data.sum(1, keepdim=True)

    def batches(epoch):
        if epoch == fail_at_epoch:
            raise Boom()
        if epochs_run is not None:
            epochs_run.append(epoch + 1)
        order = torch.randperm(32, generator=torch.Generator().manual_seed(epoch))
        return [order[i : i + 8] for i in range(0, 32, 8)]

    def step(idx):
        return {"loss": (model(data[idx]) - target[idx]).square().mean()}

    def validate():
        model.eval()
        with torch.no_grad():
            return -float((model(data) - target).square().mean())

    settings = LoopSettings(epochs=5, lr=0.01, weight_decay=0.0, max_grad_norm=1.0)
    result = train_with_validation(TrainingStep({"model": model}, step), batches, validate, settings, 4, work, "fp",
                                   "test")
    return model, result


def test_training_resumes_after_an_interruption(tmp_path):
    reference, ref_result = _train(tmp_path / "a")
    with pytest.raises(Boom):
        _train(tmp_path / "b", fail_at_epoch=3)
    assert (tmp_path / "b" / "state.pt").exists()
    trained = []
    resumed, result = _train(tmp_path / "b", epochs_run=trained)
    assert trained == [4, 5] and [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.best_epoch == ref_result.best_epoch and result.best_score == ref_result.best_score
    for a, b in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_changed_setting_starts_training_afresh(tmp_path):
    with pytest.raises(Boom):
        _train(tmp_path / "w", fail_at_epoch=2)
    progress = json.loads((tmp_path / "w" / "state.json").read_text())
    (tmp_path / "w" / "state.json").write_text(json.dumps({**progress, "fingerprint": "other settings"}))
    trained = []
    _train(tmp_path / "w", epochs_run=trained)
    assert trained == [1, 2, 3, 4, 5]


def test_the_kept_weights_are_those_of_the_best_validation_epoch(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    scores, snapshots = iter([0.2, 0.7, 0.4, 0.1]), []

    def validate():  # the score peaks at epoch 2; remember the weights each epoch ended with
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    step = TrainingStep({"model": model}, lambda idx: {"loss": model(data[idx]).square().mean()})
    settings = LoopSettings(epochs=4, lr=0.1, weight_decay=0.0, max_grad_norm=1.0)
    result = train_with_validation(step, lambda e: [torch.arange(8), torch.arange(8, 16)], validate, settings, 2,
                                   tmp_path, "fp", "test")
    assert result.best_epoch == 2 and result.best_score == 0.7
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][name], rtol=0, atol=0)
        assert not torch.equal(value, snapshots[-1][name])

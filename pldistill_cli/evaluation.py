"""Scoring by label ranking, the metrics, and the evaluate stages (the only readers of the test split)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score
from torch.utils.data import DataLoader

from .config import Params
from .data import AudioClips, AudioCollate, length_sorted_batches
from .errors import PldistillError
from .forward import PromptLayout, encode_audio, score_labels
from .layout import Layout
from .manifest import manifest_labels, read_manifest, select_split
from .models import count_parameters, load_model, read_metadata
from .training import autocast, resolve_device
from .ui import progress


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """WA (accuracy), UA (mean per-class recall over the classes present), macro-F1 over the label set."""
    present = [l for l in labels if l in set(y_true)]
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(balanced_accuracy_score(y_true, y_pred)) if present else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "n": len(y_true),
    }


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(labels))


@torch.no_grad()
def predict_audio(model, processor, prompt: PromptLayout, rows: pd.DataFrame, batch_size: int, device: torch.device,
                  description: str = "score") -> np.ndarray:
    """Label log-probabilities [N, n_labels] for the clips of `rows`, scored from their audio."""
    model.eval()
    clips = AudioClips(rows)
    loader = DataLoader(clips, batch_sampler=length_sorted_batches(rows["duration"], batch_size),
                        collate_fn=AudioCollate(processor))
    scores = np.zeros((len(rows), len(prompt.labels)), dtype=np.float32)
    with progress(description, len(rows)) as bar:
        for batch in loader:
            with autocast(device):
                encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
                scores[batch.rows] = score_labels(model, prompt, encoded, lengths).float().cpu().numpy()
            bar.advance(len(batch.rows))
    return scores


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _write_predictions(path: Path, rows: pd.DataFrame, y_pred: Sequence[str], scores: np.ndarray | None,
                       labels: Sequence[str]) -> None:
    out = pd.DataFrame({"id": rows["id"], "label": rows["label"], "prediction": list(y_pred)})
    if scores is not None:
        for j, label in enumerate(labels):
            out[f"logp_{label}"] = scores[:, j]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    out.to_csv(tmp, index=False)
    os.replace(tmp, path)


def evaluate_model(dataset: str, fold: int, which: str, params: Params, layout: Layout = Layout()) -> dict:
    """Score the teacher or the student on the fold's test split; writes metrics and predictions."""
    folder = {"teacher": layout.teacher, "student": layout.student}[which](dataset, fold)
    labels = manifest_labels(layout.manifest(dataset))
    test = select_split(read_manifest(layout.manifest(dataset)), fold, "test")
    device = resolve_device(params.evaluate.device)
    model, processor = load_model(folder, device)
    prompt = PromptLayout.from_processor(processor, labels)
    scores = predict_audio(model, processor, prompt, test, params.evaluate.batch_size, device, f"evaluate {which}")
    y_pred = [labels[j] for j in scores.argmax(1)]
    metrics = classification_metrics(test["label"].tolist(), y_pred, labels)
    made_by = read_metadata(folder)
    result = {
        **metrics,
        "model": which,
        "dataset": dataset,
        "fold": fold,
        "parameters": count_parameters(model),
        "scoring": "label ranking: summed log-prob of label tokens + end of turn, no length normalisation",
        "model_weights": made_by.get("weights"),
        "params": {"evaluate": params.section("evaluate")},
    }
    _write_json(layout.metrics(dataset, fold, which), result)
    _write_predictions(layout.predictions(dataset, fold, which), test, y_pred, scores, labels)
    return result


def evaluate_references(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> dict:
    """The shortcut references: clip duration alone, and prosody features, fitted on train, scored on test."""
    from .references import features_for_files, fit_and_score_references

    labels = manifest_labels(layout.manifest(dataset))
    manifest = read_manifest(layout.manifest(dataset))
    train, test = select_split(manifest, fold, "train"), select_split(manifest, fold, "test")
    workers = params.preprocess.workers
    train_x = features_for_files(train["audio_path"].tolist(), workers)
    test_x = features_for_files(test["audio_path"].tolist(), workers)
    results = {}
    for ref in fit_and_score_references(train_x, train["label"].tolist(), test_x, test["label"].tolist(), params.seed):
        results[ref.name] = {**classification_metrics(ref.y_true, ref.y_pred, labels), "description": ref.description}
        _write_predictions(layout.predictions(dataset, fold, ref.name), test, ref.y_pred, None, labels)
    if not results:
        raise PldistillError(f"{dataset} fold {fold}: no reference could be fitted")
    result = {"model": "references", "dataset": dataset, "fold": fold, **results}
    _write_json(layout.metrics(dataset, fold, "references"), result)
    return result

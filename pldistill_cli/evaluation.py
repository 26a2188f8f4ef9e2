"""Scoring by label ranking, the metrics, and the evaluate stages (the only readers of the test split)."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch.utils.data import DataLoader

from .config import Params
from .data import AudioClips, AudioCollate, length_sorted_batches, text_batch
from .errors import PldistillError
from .forward import CACHE, PromptLayout, encode_audio, forward_from_encoder, forward_with_audio_attention, score_labels
from .layout import Layout, student_name
from .manifest import manifest_labels, read_manifest, select_split
from .models import count_parameters, load_model, read_metadata, weights_dtype
from .training import autocast, resolve_device
from .ui import progress

UNMATCHED = "<unmatched>"  # a generated answer that names no label (counted as wrong, never mapped to a class)


def _recall(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Recall of every class present in `truth` (UA is their mean)."""
    return {c: float(np.mean(pred[truth == c] == c)) for c in np.unique(truth)}


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """WA (accuracy; equals micro-F1 for single-label data), UA (mean per-class recall over the classes
    present), macro-F1 over the classes present, per-class recall, the confusion matrix (rows true,
    columns predicted, in label order) and the number of unmatched answers."""
    present = [l for l in labels if l in set(y_true)]
    by_class = _recall(np.asarray(y_true), np.asarray(y_pred))
    recall = {l: by_class[l] for l in present}  # in label order
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(np.mean(list(recall.values()))) if present else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "n": len(y_true),
        "unmatched": sum(p == UNMATCHED for p in y_pred),
        "recall": recall,
        "confusion": confusion(y_true, y_pred, labels).tolist(),  # unmatched answers are in no column
    }


def bootstrap_ua(y_true: Sequence[str], y_pred: Sequence[str], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of UA (clips resampled with replacement)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y_true), len(y_true))
        values.append(np.mean(list(_recall(y_true[idx], y_pred[idx]).values())))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(labels))


def parse_answer(text: str, labels: Sequence[str]) -> str:
    """The label a free-text answer names: the only label word found in it as a whole word (case
    ignored); UNMATCHED when it names none or several."""
    found = {l for l in labels if re.search(rf"\b{re.escape(l.lower())}\b", text.lower())}
    return found.pop() if len(found) == 1 else UNMATCHED


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Scored:
    predictions: list[str]
    scores: np.ndarray | None  # label log-probabilities [N, n_labels] (ranking mode)
    answers: list[str] | None  # generated text (generation mode)
    encoder_ms: float  # mean per clip
    llm_ms: float


@torch.no_grad()
def predict_audio(model, processor, prompt: PromptLayout, rows: pd.DataFrame, batch_size: int, device: torch.device,
                  description: str = "score", scoring: str = "rank", max_new_tokens: int = 8) -> Scored:
    """Predict the clips of `rows` from their audio, by ranking the label words (`rank`) or by greedy
    generation parsed to a label (`generate`); also times the encoder and the LLM part."""
    model.eval()
    loader = DataLoader(AudioClips(rows), batch_sampler=length_sorted_batches(rows["duration"], batch_size),
                        collate_fn=AudioCollate(processor))
    scores = np.zeros((len(rows), len(prompt.labels)), dtype=np.float32)
    answers = [""] * len(rows)
    timing = {"encoder": 0.0, "llm": 0.0}
    with progress(description, len(rows)) as bar:
        for batch in loader:
            start = time.perf_counter()
            with autocast(device):
                encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
                _sync(device)
                middle = time.perf_counter()
                if scoring == "rank":
                    scores[batch.rows] = score_labels(model, prompt, encoded, lengths).float().cpu().numpy()
                else:
                    for i, row in enumerate(batch.rows):
                        answers[row] = generate_answer(model, prompt, encoded[i : i + 1], lengths[i : i + 1],
                                                       processor.tokenizer, max_new_tokens)
            _sync(device)
            timing["encoder"] += middle - start
            timing["llm"] += time.perf_counter() - middle
            bar.advance(len(batch.rows))
    if scoring == "rank":
        predictions = [prompt.labels[j] for j in scores.argmax(1)]
    else:
        predictions = [parse_answer(a, prompt.labels) for a in answers]
    n = max(len(rows), 1)
    return Scored(predictions, scores if scoring == "rank" else None, answers if scoring != "rank" else None,
                  1000 * timing["encoder"] / n, 1000 * timing["llm"] / n)


def generate_answer(model, prompt: PromptLayout, encoded: torch.Tensor, lengths: torch.Tensor, tokenizer,
                    max_new_tokens: int) -> str:
    """Greedy decoding after the prompt (one clip), until the end of turn."""
    ids = torch.tensor([prompt.prompt_ids(int(lengths[0]))], device=encoded.device)
    mask = torch.ones_like(ids)
    eot = prompt.answers[0][-1]
    logits, _, cache = forward_from_encoder(model, encoded, lengths, ids, mask, use_cache=True)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token == eot:
            break
        out.append(token)
        step = torch.tensor([[token]], device=encoded.device)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        hidden = model.model.language_model(input_ids=step, attention_mask=mask, use_cache=True, **{CACHE: cache},
                                            position_ids=torch.tensor([[mask.shape[1] - 1]], device=encoded.device))
        logits, cache = model.lm_head(hidden.last_hidden_state), getattr(hidden, CACHE)
    return tokenizer.decode(out, skip_special_tokens=True)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _write_predictions(path: Path, rows: pd.DataFrame, y_pred: Sequence[str], labels: Sequence[str],
                       scored: Scored | None = None) -> None:
    out = pd.DataFrame({"id": rows["id"], "label": rows["label"], "prediction": list(y_pred)})
    if scored is not None and scored.scores is not None:
        for j, label in enumerate(labels):
            out[f"logp_{label}"] = scored.scores[:, j]
    if scored is not None and scored.answers is not None:
        out["answer"] = scored.answers
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    out.to_csv(tmp, index=False)
    os.replace(tmp, path)


@torch.no_grad()
def attention_examples(model, processor, prompt: PromptLayout, rows: pd.DataFrame, layer: int, device) -> list[dict]:
    """The teacher's attention weights over the audio steps of a few clips (for the report)."""
    if rows.empty:
        return []
    batch = AudioCollate(processor)([AudioClips(rows)[i] for i in range(len(rows))])
    text = text_batch(prompt, batch.n_audio.tolist(), None).to(device)
    encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
    _, weights = forward_with_audio_attention(model, prompt, encoded, lengths, text.input_ids, text.attention_mask,
                                              layer)
    return [{"id": r.id, "label": r.label, "audio_path": r.audio_path, "weights": w.cpu().tolist()}
            for r, w in zip(rows.itertuples(), weights)]


def evaluate_model(dataset: str, fold: int, which: str, params: Params, layout: Layout = Layout(),
                   method: str | None = None, seed: int | None = None) -> dict:
    """Score the teacher or a student run (method, seed) on the fold's test split; writes metrics and
    predictions under the name `teacher` or `student-<method>-s<seed>` (the test split is read here only)."""
    p = params.evaluate
    if which == "teacher":
        name, folder = "teacher", layout.teacher(dataset, fold)
    else:
        name = student_name(method or params.distill.method, params.seed if seed is None else seed)
        folder = layout.student(dataset, fold, name)
    labels = manifest_labels(layout.manifest(dataset))
    test = select_split(read_manifest(layout.manifest(dataset)), fold, "test")
    device = resolve_device(p.device)
    model, processor = load_model(folder, device, dtype=weights_dtype(params.model.dtype, device, frozen=True))
    prompt = PromptLayout.from_processor(processor, labels)
    scored = predict_audio(model, processor, prompt, test, p.batch_size, device, f"evaluate {name}", p.scoring,
                           p.max_new_tokens)
    made_by = read_metadata(folder)
    result = {
        **classification_metrics(test["label"].tolist(), scored.predictions, labels),
        "ua_ci95": bootstrap_ua(test["label"].tolist(), scored.predictions, seed=params.seed),
        "model": name,
        "method": made_by.get("method"),
        "seed": made_by.get("seed"),
        "dataset": dataset,
        "fold": fold,
        "labels": list(labels),
        "parameters": count_parameters(model),
        "latency_ms": {"encoder": scored.encoder_ms, "llm": scored.llm_ms, "device": str(device),
                       "batch_size": p.batch_size},
        "scoring": SCORING[p.scoring],
        "model_weights": made_by.get("weights"),
        # real checkpoints behind the model: the teacher's, or the student's LLM and its teacher's
        "checkpoints": {k: made_by[k] for k in ("checkpoint", "student_llm", "teacher") if made_by.get(k)},
        "params": {"evaluate": params.section("evaluate")},
    }
    if which == "teacher":
        examples = test.sort_values("id").groupby("label").head(1).head(p.attention_examples)
        _write_json(layout.attention_examples(dataset, fold), {"examples": attention_examples(
            model, processor, prompt, examples, params.cache.attention_layer, device)})
    _write_json(layout.metrics(dataset, fold, name), result)
    _write_predictions(layout.predictions(dataset, fold, name), test, scored.predictions, labels, scored)
    return result


SCORING = {
    "rank": "label ranking: summed log-prob of label tokens + end of turn after one shared prompt pass, "
            "no length normalisation",
    "generate": f"greedy generation parsed to the one label word it names; other answers count as {UNMATCHED}",
}


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
        _write_predictions(layout.predictions(dataset, fold, ref.name), test, ref.y_pred, labels)
    if not results:
        raise PldistillError(f"{dataset} fold {fold}: no reference could be fitted")
    result = {"model": "references", "dataset": dataset, "fold": fold, **results}
    _write_json(layout.metrics(dataset, fold, "references"), result)
    return result

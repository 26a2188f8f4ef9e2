"""evaluate: score the teacher, a student run or the shortcut references on the fold's test split
(the only stage that reads it).

Per model `name` (teacher, student-<method>-s<seed>, duration, prosody) it writes, under
metrics/<dataset>/fold<k>/: `<name>.json` (the numbers people compare: DVC metrics), `<name>-details.json`
(per-class recall, confusion, interval, what made it), `<name>-predictions.csv` and, for models,
`<name>-latency.json` (timings, repeated: the one output that is a measurement, not a function of its inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .config import Params, params_file
from .data import AudioClips, AudioCollate, text_batch
from .errors import PldistillError
from .families import family_of
from .files import atomic_path, write_json
from .forward import encode_audio, forward_with_audio_attention
from .layout import Layout, student_name
from .manifest import manifest_labels, read_manifest, select_split
from .metrics import UNMATCHED, classification_metrics, cluster_bootstrap_ua, headline
from .models import ModelMeta, StudentMeta, count_parameters, environment, load_model, weights_dtype
from .prompt import PromptLayout
from .scoring import Scored, predict_audio
from .training import resolve_device

LATENCY_REPEATS = 5  # timings of each model (the report shows their median and spread)
LATENCY_CLIPS = 32  # test clips each timing scores

SCORING = {
    "rank": "label ranking: summed log-prob of label tokens + end of turn after one shared prompt pass, "
            "no length normalisation",
    "generate": f"greedy generation parsed to the one label word it names; other answers count as {UNMATCHED}",
}


def _write_predictions(path, rows: pd.DataFrame, y_pred: dict[str, Sequence[str]], labels: Sequence[str],
                       scored: Scored | None = None) -> None:
    """The test clips with each model's prediction (column `prediction`, or one per reference)."""
    out = pd.DataFrame({"id": rows["id"], "speaker": rows["speaker"], "label": rows["label"],
                        **{k: list(v) for k, v in y_pred.items()}})
    if scored is not None and scored.scores is not None:
        for j, label in enumerate(labels):
            out[f"logp_{label}"] = scored.scores[:, j]
    if scored is not None and scored.answers is not None:
        out["answer"] = scored.answers
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, float_format="%.6g")


@torch.no_grad()
def attention_examples(model, processor, prompt: PromptLayout, rows: pd.DataFrame, layer: int, device) -> list[dict]:
    """The teacher's attention weights over the audio steps of a few clips (for the report)."""
    if rows.empty:
        return []
    rate = processor.feature_extractor.sampling_rate
    batch = AudioCollate(processor)([AudioClips(rows, rate)[i] for i in range(len(rows))])
    text = text_batch(prompt, batch.n_audio.tolist(), None).to(device)
    encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
    _, weights = forward_with_audio_attention(model, prompt, encoded, lengths, text.input_ids, text.attention_mask,
                                              layer)
    return [{"id": r.id, "label": r.label, "audio_path": r.audio_path, "weights": [round(float(x), 6) for x in w]}
            for r, w in zip(rows.itertuples(), weights)]


def repeated_latency(measure: Callable[[int], Scored], repeats: int) -> dict:
    """Time the model `repeats` times (`measure(k)` scores the same clips and times them): the median
    encoder and LLM ms per clip, the spread of their sum (slowest - fastest repeat) and every repeat.
    The scoring pass that made the predictions is not among them: it warms the caches and allocator."""
    runs = [measure(k) for k in range(repeats)]
    totals = [r.encoder_ms + r.llm_ms for r in runs]
    return {"encoder_ms": float(np.median([r.encoder_ms for r in runs])),
            "llm_ms": float(np.median([r.llm_ms for r in runs])),
            "spread_ms": float(max(totals) - min(totals)),
            "repeats": [{"encoder_ms": r.encoder_ms, "llm_ms": r.llm_ms} for r in runs]}


def _details(name: str, dataset: str, fold: int, test: pd.DataFrame, predictions: list[str],
             labels: tuple[str, ...], seed: int, extra: dict) -> dict:
    """A model's metrics on the test split, with its speaker-level interval and what made it."""
    truth = test["label"].tolist()
    return {**classification_metrics(truth, predictions, labels),
            "ua_ci95": cluster_bootstrap_ua(truth, predictions, test["speaker"].tolist(), seed=seed),
            "speakers": int(test["speaker"].nunique()), "model": name, "dataset": dataset, "fold": fold,
            "labels": list(labels), **extra}


def cross_corpus_test(train: str, test: str, fold: int, params: Params, layout: Layout = Layout()
                      ) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """`test`'s test split of the fold for models trained on `train`: its labels renamed by the cross_corpus
    entry's label_map (none: the same words), only the clips whose label `train` has too; and those shared
    labels, in `train`'s prompt order."""
    entry = next((e for e in params.cross_corpus if (e.train, e.test) == (train, test)), None)
    renamed = entry.label_map if entry else {}
    source, target = manifest_labels(layout.manifest(train)), manifest_labels(layout.manifest(test))
    where = f"{params_file(params)}: cross_corpus ({train} -> {test}) label_map"
    for word, meant in renamed.items():
        if word not in target or meant not in source:
            raise PldistillError(f"{where}: maps {word} to {meant}, but {test}'s labels are {', '.join(target)} and "
                                 f"{train}'s {', '.join(source)}; map a label of {test} to one of {train}")
    rows = select_split(read_manifest(layout.manifest(test)), fold, "test")
    rows = rows.assign(label=rows["label"].map(lambda word: renamed.get(word, word)))
    shared = tuple(word for word in source if word in set(rows["label"]))
    if len(shared) < 2:
        raise PldistillError(f"{train} and {test} share {len(shared)} label(s) in fold {fold}'s test split "
                             f"({', '.join(shared) or 'none'}); map {test}'s labels to {train}'s in {where}")
    return rows[rows["label"].isin(shared)].reset_index(drop=True), shared


def among(scored: Scored, labels: tuple[str, ...], shared: tuple[str, ...]) -> Scored:
    """The answers restricted to `shared`, a subset of the prompt's `labels`: a ranked answer is the best-scored
    of them (the scores keep their columns only), a generated answer outside them is unmatched."""
    if scored.scores is not None:
        kept = scored.scores[:, [labels.index(word) for word in shared]]
        return dataclasses.replace(scored, predictions=[shared[j] for j in kept.argmax(1)], scores=kept)
    return dataclasses.replace(scored, predictions=[a if a in shared else UNMATCHED for a in scored.predictions])


def evaluate_model(dataset: str, fold: int, which: str, params: Params, layout: Layout = Layout(),
                   method: str | None = None, seed: int | None = None, on: str | None = None) -> dict:
    """Score the teacher or a student run (method, seed) on the fold's test split; writes its outputs
    under the name `teacher` or `student-<method>-s<seed>`. With `on` (cross-corpus), on dataset `on`'s
    test split of the fold instead, on the labels the two share (cross_corpus_test): a ranked answer is the
    best of those, a generated answer outside them counts wrong (unmatched)."""
    p = params.evaluate
    if which == "teacher":
        name, folder = "teacher", layout.teacher(dataset, fold)
    else:
        name = student_name(method or params.distill.method, params.seed if seed is None else seed)
        folder = layout.student(dataset, fold, name)
    labels = manifest_labels(layout.manifest(dataset))
    if on is None:
        test, scored_labels = select_split(read_manifest(layout.manifest(dataset)), fold, "test"), labels
    else:
        test, scored_labels = cross_corpus_test(dataset, on, fold, params, layout)
    device = resolve_device(p.device)
    model, processor = load_model(folder, device, dtype=weights_dtype(params.model.dtype, device, frozen=True))
    prompt = family_of(model).prompt(processor, labels)
    scored = predict_audio(model, processor, prompt, test, p.batch_size, device, f"evaluate {name}", p.scoring,
                           p.max_new_tokens)
    if on is not None:
        scored = among(scored, labels, scored_labels)
    made_by = ModelMeta.read(folder)
    student = isinstance(made_by, StudentMeta)
    behind = ({"student_llm": made_by.student_llm, "teacher": dataclasses.asdict(made_by.teacher)} if student
              else {"checkpoint": made_by.checkpoint})
    details = _details(name, dataset, fold, test, scored.predictions, scored_labels, params.seed, {
        **({"on": on} if on else {}),  # cross-corpus: scored on this dataset's test split
        "method": made_by.method if student else None, "seed": made_by.seed, "parameters": count_parameters(model),
        "scoring": SCORING[p.scoring], "model_weights": made_by.weights,
        # real checkpoints behind the model: the teacher's, or the student's LLM and its teacher's
        "checkpoints": {k: v for k, v in behind.items() if v},
        "trained_with": made_by.versions, "versions": environment(device),
        "params": {"evaluate": params.section("evaluate")},
    })
    write_json(layout.metrics(dataset, fold, name, on), {"test": headline(details)})
    write_json(layout.details(dataset, fold, name, on), details)
    _write_predictions(layout.predictions(dataset, fold, name, on), test, {"prediction": scored.predictions},
                       scored_labels, scored)
    if on is not None:  # cross-corpus: the scores only (timings and attention are the model's own fold's)
        return details
    timed = test.head(LATENCY_CLIPS)
    write_json(layout.latency(dataset, fold, name), {
        **repeated_latency(lambda k: predict_audio(model, processor, prompt, timed, p.batch_size, device,
                                                   f"time {name} ({k + 1}/{LATENCY_REPEATS})", p.scoring,
                                                   p.max_new_tokens), LATENCY_REPEATS),
        "first_pass": {"encoder_ms": scored.encoder_ms, "llm_ms": scored.llm_ms, "clips": len(test)},
        "device": str(device), "batch_size": p.batch_size})
    if which == "teacher":
        examples = test.sort_values("id").groupby("label").head(1).head(p.attention_examples)
        write_json(layout.attention_examples(dataset, fold), {"examples": attention_examples(
            model, processor, prompt, examples, params.cache.attention_layer, device)})
    return details


def evaluate_references(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> dict:
    """The shortcut references (`evaluate.references`): clip duration alone, prosody features and, with
    openSMILE, eGeMAPS; each fitted on train and scored on test. One set of outputs, named `references`."""
    from .references import (egemaps_features, features_for_files, fit_and_score_egemaps,
                             fit_and_score_references)

    chosen = params.evaluate.references
    labels = manifest_labels(layout.manifest(dataset))
    manifest = read_manifest(layout.manifest(dataset))
    train, test = select_split(manifest, fold, "train"), select_split(manifest, fold, "test")
    y_train, y_test = train["label"].tolist(), test["label"].tolist()
    workers = params.preprocess.workers
    fitted = fit_and_score_references(features_for_files(train["audio_path"].tolist(), workers), y_train,
                                      features_for_files(test["audio_path"].tolist(), workers), y_test, params.seed)
    if "egemaps" in chosen:
        fitted.append(fit_and_score_egemaps(egemaps_features(train["audio_path"]), y_train,
                                            egemaps_features(test["audio_path"]), y_test, params.seed))
    results = {ref.name: _details(ref.name, dataset, fold, test, list(ref.y_pred), labels, params.seed,
                                  {"description": ref.description}) for ref in fitted if ref.name in chosen}
    write_json(layout.metrics(dataset, fold, "references"), {name: {"test": headline(r)} for name, r in results.items()})
    write_json(layout.details(dataset, fold, "references"), results)
    _write_predictions(layout.predictions(dataset, fold, "references"), test,
                       {ref.name: ref.y_pred for ref in fitted if ref.name in chosen}, labels)
    return results

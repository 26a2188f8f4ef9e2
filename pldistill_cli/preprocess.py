"""preprocess: a corpus as distributed -> 16 kHz mono wavs and a validated manifest."""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .audio import BadAudio, audio_duration, read_audio, write_wav
from .config import Params
from .datasets import SourceItem, get_adapter
from .errors import PldistillError
from .labels import label_set
from .layout import Layout
from .manifest import write_manifest
from .ui import console, progress


@dataclass
class PreprocessResult:
    manifest: Path
    n_utterances: int
    label_counts: dict[str, int]
    quarantine: list[dict[str, str]]


def _single_thread() -> None:
    # Each worker handles one clip at a time; torch's intra-op threads would only oversubscribe.
    import torch

    torch.set_num_threads(1)


def _condition(source: Path, target: Path, sample_rate: int) -> float | str:
    """Duration in seconds of the conditioned clip, or the reason it was skipped."""
    if target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return audio_duration(target)
    try:
        wave = read_audio(source, sample_rate)
    except BadAudio as exc:
        return str(exc)
    write_wav(target, wave, sample_rate)
    return len(wave) / sample_rate


def preprocess(dataset: str, params: Params, layout: Layout = Layout(), root: Path | None = None) -> PreprocessResult:
    adapter = get_adapter(dataset)
    labels = label_set(dataset)
    if root is not None and not root.exists():
        raise PldistillError(f"{root}: dataset root not found; pass the folder that holds the corpus")
    with progress(f"collect {dataset}", None) as bar:
        items: list[SourceItem] = adapter.collect(params, layout, root, bar.advance)
    if not items:
        raise PldistillError(f"{root}: no recognisable {dataset} files found")
    unknown = sorted({i.label for i in items} - set(labels))
    if unknown:
        raise PldistillError(f"{dataset}: labels {unknown} are outside the label set {list(labels)}")

    out_dir = layout.prepared(dataset)
    audio_dir = out_dir / "audio"
    sr = params.preprocess.sample_rate
    targets = [audio_dir / f"{i.utt_id}.wav" for i in items]
    with ProcessPoolExecutor(max(1, params.preprocess.workers), initializer=_single_thread) as pool, progress(
        f"condition {dataset}", len(items)
    ) as bar:
        results = []
        for result in pool.map(_condition, [i.source_path for i in items], targets, [sr] * len(items), chunksize=16):
            results.append(result)
            bar.advance()

    rows, quarantine = [], []
    for item, target, result in zip(items, targets, results):
        if isinstance(result, str):
            quarantine.append({"path": str(item.source_path), "reason": result})
            continue
        rows.append(
            {
                "id": item.utt_id,
                "dataset": dataset,
                "speaker": item.speaker,
                "label": item.label,
                "fold": item.fold,
                "validation_fold": item.validation_fold,
                "duration": result,
                "audio_path": str(target.relative_to(out_dir)),
                "source_path": str(item.source_path),
            }
        )
    if not rows:
        raise PldistillError(f"{dataset}: every file was unusable; see the quarantine list above")
    manifest = pd.DataFrame(rows)
    write_manifest(manifest, layout.manifest(dataset))
    counts = dict(Counter(manifest["label"]))
    summary = {
        "dataset": dataset,
        "utterances": len(manifest),
        "speakers": int(manifest["speaker"].nunique()),
        "folds": sorted(int(f) for f in manifest["fold"].unique()),
        "hours": round(float(manifest["duration"].sum()) / 3600, 4),
        "label_counts": counts,
        "quarantine": quarantine,
    }
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    for bad in quarantine:
        console.print(f"[yellow]skipped[/] {bad['path']}: {bad['reason']}")
    return PreprocessResult(layout.manifest(dataset), len(manifest), counts, quarantine)

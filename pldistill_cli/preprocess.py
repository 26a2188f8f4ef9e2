"""preprocess: a corpus as distributed -> 16 kHz mono wavs and a validated manifest.

Every source file is read with soundfile (any format, rate and channel count), down-mixed,
resampled with torchaudio, optionally silence-trimmed and loudness-normalised, and written as
PCM16 wav. Clips longer than `max_seconds` (the encoder window) are truncated to it or skipped
(`long_clips`), and counted. A corrupt, empty, silent or non-finite file is skipped and listed in
the quarantine with its reason. An index records each source's size, mtime and the settings that
conditioned it, so a re-run (or a resumed, interrupted run) does not process an unchanged file twice.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .audio import BadAudio, normalize_loudness, read_audio, trim_silence, write_wav
from .config import Params, PreprocessParams, fingerprint
from .datasets import resolve
from .errors import PldistillError
from .layout import Layout
from .manifest import write_manifest
from .ui import console, progress

INDEX_SAVE_EVERY = 256  # conditioned files between index checkpoints


@dataclass
class PreprocessResult:
    manifest: Path
    n_utterances: int
    label_counts: dict[str, int]
    quarantine: list[dict[str, str]]
    excluded: dict[str, int]
    truncated: int


def _single_thread() -> None:
    # Each worker handles one clip at a time; torch's intra-op threads would only oversubscribe.
    import torch

    torch.set_num_threads(1)


def condition(source: str, target: str, settings: PreprocessParams) -> dict:
    """Condition one file; returns {"duration", "truncated"} or {"reason"} for a skipped file."""
    try:
        wave = read_audio(source, settings.sample_rate)
        if settings.trim_silence:
            wave = trim_silence(wave, settings.sample_rate, settings.trim_db)
        if settings.normalize_loudness:
            wave = normalize_loudness(wave, settings.target_dbfs)
    except BadAudio as exc:
        return {"reason": str(exc)}
    limit = int(settings.max_seconds * settings.sample_rate)
    truncated = len(wave) > limit
    if truncated and settings.long_clips == "skip":
        return {"reason": f"longer than {settings.max_seconds:g} s (long_clips: skip)"}
    wave = wave[:limit]
    write_wav(Path(target), wave, settings.sample_rate)
    return {"duration": len(wave) / settings.sample_rate, "truncated": truncated}


def _signature(path: Path, settings_fp: str) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{settings_fp}"


def _save_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def preprocess(dataset: str, params: Params, layout: Layout = Layout(), root: Path | None = None,
               **corpus_overrides: str | None) -> PreprocessResult:
    adapter, corpus = resolve(dataset, params, root, **corpus_overrides)
    with progress(f"collect {dataset}", None) as bar:
        collected = adapter.collect(dataset, corpus, params, layout, bar.advance)
    items = collected.items
    if not items:
        raise PldistillError(f"{corpus.root or dataset}: no recognisable {dataset} files found")
    unknown = sorted({i.label for i in items} - set(collected.labels))
    if unknown:
        raise PldistillError(f"{dataset}: labels {unknown} are outside the label set {list(collected.labels)}")

    out_dir = layout.prepared(dataset)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    settings = params.preprocess
    settings_fp = fingerprint(asdict(settings))
    index_file = out_dir / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    results: dict[str, dict] = {}
    todo = []
    for item in items:
        target = audio_dir / f"{item.utt_id}.wav"
        if not item.source_path.exists():
            results[item.utt_id] = {"reason": "source file missing"}
            continue
        signature = _signature(item.source_path, settings_fp)
        known = index.get(item.utt_id)
        if known and known["signature"] == signature and ("reason" in known or target.exists()):
            results[item.utt_id] = known
        else:
            todo.append((item, target, signature))

    with ProcessPoolExecutor(max(1, settings.workers), initializer=_single_thread) as pool, progress(
        f"condition {dataset}", len(items)
    ) as bar:
        bar.update(completed=len(results))
        outcomes = pool.map(condition, [str(i.source_path) for i, _, _ in todo], [str(t) for _, t, _ in todo],
                            [settings] * len(todo), chunksize=8)
        for n, ((item, _, signature), outcome) in enumerate(zip(todo, outcomes), 1):
            results[item.utt_id] = index[item.utt_id] = {**outcome, "signature": signature}
            bar.advance()
            if n % INDEX_SAVE_EVERY == 0:
                _save_json(index_file, index)  # an interrupted run resumes from here
    _save_json(index_file, index)

    rows, quarantine, truncated = [], [], 0
    for item in items:
        result = results[item.utt_id]
        if "reason" in result:
            quarantine.append({"path": str(item.source_path), "reason": result["reason"]})
            continue
        truncated += result["truncated"]
        rows.append({
            "id": item.utt_id, "dataset": dataset, "speaker": item.speaker, "label": item.label,
            "fold": item.fold, "validation_fold": item.validation_fold, "duration": result["duration"],
            "audio_path": f"audio/{item.utt_id}.wav", "source_path": str(item.source_path),
            "speaker_independent": item.speaker_independent,
        })
    if not rows:
        raise PldistillError(f"{dataset}: every file was unusable; see {out_dir / 'summary.json'}")
    manifest = pd.DataFrame(rows)
    write_manifest(manifest, layout.manifest(dataset), collected.labels)
    counts = {label: int(n) for label, n in Counter(manifest["label"]).most_common()}
    _save_json(out_dir / "summary.json", {
        "dataset": dataset,
        "adapter": adapter.name,
        "utterances": len(manifest),
        "speakers": int(manifest["speaker"].nunique()),
        "folds": {int(f): int(n) for f, n in sorted(Counter(manifest["fold"]).items())},
        "hours": round(float(manifest["duration"].sum()) / 3600, 4),
        "labels": list(collected.labels),
        "label_counts": counts,
        "left_out": collected.excluded,
        "truncated_to_max_seconds": truncated,
        "quarantine": quarantine,
        "preprocess": asdict(settings),
    })
    for bad in quarantine:
        console.print(f"[yellow]skipped[/] {bad['path']}: {bad['reason']}", highlight=False)
    for reason, n in collected.excluded.items():
        console.print(f"left out: {n} x {reason}", highlight=False)
    if truncated:
        console.print(f"{truncated} clips longer than {settings.max_seconds:g} s were truncated to it")
    return PreprocessResult(layout.manifest(dataset), len(manifest), counts, quarantine, collected.excluded, truncated)

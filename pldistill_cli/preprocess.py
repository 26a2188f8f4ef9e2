"""preprocess: a corpus as distributed -> 16 kHz mono wavs and a validated manifest.

Every source file is read with soundfile (any format, rate and channel count), down-mixed,
resampled with torchaudio, optionally silence-trimmed and loudness-normalised, and written as
PCM16 wav. Clips longer than `max_seconds` (the encoder window) are truncated to it or skipped
(`long_clips`); clips shorter than `min_seconds`, and corrupt, empty, silent or non-finite files,
are skipped and listed in the quarantine with their reason; listed files that do not exist are
listed as missing. The same audio listed twice (by resolved path or by content) is kept once and
counted, or, listed with different labels or speakers, is an error naming both.

Conditioned clips are kept in a work cache (data/work/<dataset>/preprocess/, with an index of each
source's size, mtime, content hash and the settings that conditioned it), so a re-run, or a resumed
interrupted run, conditions only new or changed sources. The prepared folder is then built aside
(clips hard-linked from the cache) and swapped in: a failed run leaves the previous prepared data
exactly as it was.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .audio import BadAudio, normalize_loudness, read_audio, trim_silence, write_wav
from .config import Params, PreprocessParams, fingerprint, preprocessing
from .datasets import UNKNOWN, SourceItem, resolve
from .errors import PldistillError
from .files import fresh_folder, replace_folder, write_json
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


def _worker_init() -> None:
    # One clip at a time per worker: torch's intra-op threads would only oversubscribe. Workers die with
    # the parent (even on kill -9) and leave Ctrl-C to it.
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the parent's shutdown still stops them
        pass


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def condition(source: str, target: str, settings: PreprocessParams) -> dict:
    """Condition one file; returns {"duration", "truncated"} or {"reason"} for a skipped file, and the
    source's content hash."""
    digest = content_hash(Path(source))
    try:
        wave = read_audio(source, settings.sample_rate)
        if settings.trim_silence:
            wave = trim_silence(wave, settings.sample_rate, settings.trim_db)
        if settings.normalize_loudness:
            wave = normalize_loudness(wave, settings.target_dbfs)
    except BadAudio as exc:
        return {"reason": str(exc), "sha": digest}
    if len(wave) < settings.min_seconds * settings.sample_rate:
        return {"reason": f"shorter than min_seconds ({len(wave) / settings.sample_rate:.3f} s < "
                          f"{settings.min_seconds:g} s)", "sha": digest}
    limit = int(settings.max_seconds * settings.sample_rate)
    truncated = len(wave) > limit
    if truncated and settings.long_clips == "skip":
        return {"reason": f"longer than {settings.max_seconds:g} s (long_clips: skip)", "sha": digest}
    write_wav(Path(target), wave[:limit], settings.sample_rate)
    return {"duration": min(len(wave), limit) / settings.sample_rate, "truncated": truncated, "sha": digest}


def _signature(path: Path, settings_fp: str) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{settings_fp}"


def _dedupe(items: list[SourceItem], key, what: str, excluded: Counter, twins: list[str] | None = None) -> list[SourceItem]:
    """Keep the first of items with the same key; a repeat with another label or speaker is an error. A repeat
    that agrees on both is left out and counted, unless `twins` is given and it is in the same folds too: then
    it is kept and named there (a corpus's protocol may list two files of identical audio, as RAVDESS does;
    keeping both makes the folds match the protocol to the clip, and the same folds keep it on one side of
    every split)."""
    first: dict = {}
    kept = []
    for item in items:
        k = key(item)
        other = first.get(k)
        if k is None or other is None:
            first.setdefault(k, item)
            kept.append(item)
        elif (item.label, item.speaker) != (other.label, other.speaker):
            raise PldistillError(f"{item.source_path} ({item.label}, speaker {item.speaker}) and {other.source_path} "
                                 f"({other.label}, speaker {other.speaker}) are the same {what} with different labels "
                                 "or speakers; keep one of them in the corpus")
        elif twins is not None and (item.fold, item.validation_fold) == (other.fold, other.validation_fold):
            twins.append(f"{item.source_path} and {other.source_path} hold the same {what} (speaker {item.speaker}, "
                         f"{item.label}, fold {item.fold}): both kept, as the corpus lists both")
            kept.append(item)
        else:
            excluded[f"duplicate ({what})"] += 1
    return kept


def _check_labels(labels: set[str], where: object, after: str) -> None:
    """Emotion recognition needs clips of at least 2 labels: fewer is an error, not a model at 100%."""
    if len(labels) < 2:
        found = f"only one label ({next(iter(labels))})" if labels else "no label"
        raise PldistillError(f"{where}: {found}{after}; a classifier needs clips of at least 2 labels: add clips of "
                             "the other labels")


def split_warnings(manifest: pd.DataFrame, dataset: str) -> list[str]:
    """What keeps the folds from being speaker-independent, each with its fix: clips without a known
    speaker, every clip from one speaker, rows split without speaker information."""
    fix = (f"name the speakers with --speaker-pattern REGEX (its first group is the speaker, searched in the file "
           f"name; corpora.{dataset}.speaker_pattern under dvc repro) or a `speaker` column in the CSV")
    out = []
    unknown = int((manifest["speaker"] == UNKNOWN).sum())
    known = sorted(set(manifest["speaker"]) - {UNKNOWN})
    if unknown:
        out.append(f"{unknown} of {len(manifest)} clips have no known speaker; {fix}")
    elif len(known) == 1:
        out.append(f"all {len(manifest)} clips have one speaker ({known[0]}): no split can keep a speaker out of "
                   f"training; if they come from several speakers, {fix}")
    mixed = int((~manifest["speaker_independent"]).sum())
    if mixed:
        out.append(f"the folds are not speaker-independent: {mixed} of {len(manifest)} clips were split without "
                   "speaker information (by label), so one speaker's clips can sit on both sides of a split and the "
                   f"scores can be optimistic; {fix} (at least 3 speakers, each in one fold)")
    return out


def _condition_all(todo: list[tuple[SourceItem, Path, str]], settings: PreprocessParams, index: dict,
                   index_file: Path, done: int, total: int, dataset: str) -> None:
    with ProcessPoolExecutor(max(1, settings.workers), initializer=_worker_init) as pool, progress(
        f"condition {dataset}", total
    ) as bar:
        bar.update(completed=done)
        outcomes = pool.map(condition, [str(i.source_path) for i, _, _ in todo], [str(t) for _, t, _ in todo],
                            [settings] * len(todo), chunksize=8)
        for n, ((item, _, signature), outcome) in enumerate(zip(todo, outcomes), 1):
            index[item.utt_id] = {**outcome, "signature": signature}
            bar.advance()
            if n % INDEX_SAVE_EVERY == 0:
                write_json(index_file, index)  # an interrupted run resumes from here
    write_json(index_file, index)


def preprocess(dataset: str, params: Params, layout: Layout = Layout(), root: Path | None = None,
               **corpus_overrides: str | None) -> PreprocessResult:
    adapter, corpus = resolve(dataset, params, root, **corpus_overrides)
    work = layout.work(dataset, None, "preprocess")
    with progress(f"collect {dataset}", None) as bar:
        collected = adapter.collect(dataset, corpus, params, layout, bar.advance)
    excluded = Counter(collected.excluded)
    items = _dedupe(collected.items, lambda i: i.source_path.resolve(), "file", excluded)
    if not items:
        raise PldistillError(f"{corpus.root or dataset}: no recognisable {dataset} files found")
    unknown = sorted({i.label for i in items} - set(collected.labels))
    if unknown:
        raise PldistillError(f"{dataset}: labels {unknown} are outside the label set {list(collected.labels)}")
    where = corpus.csv or corpus.root or dataset
    _check_labels({i.label for i in items}, where, "")  # before any audio is conditioned

    settings = params.preprocess
    settings_fp = fingerprint(preprocessing(params))
    cache_dir, index_file = work / "audio", work / "index.json"
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    missing, todo = list(collected.missing), []
    for item in items:
        if not item.source_path.is_file():
            missing.append(str(item.source_path))
            continue
        signature, known = _signature(item.source_path, settings_fp), index.get(item.utt_id)
        cached = cache_dir / f"{item.utt_id}.wav"
        if not (known and known["signature"] == signature and ("reason" in known or cached.exists())):
            todo.append((item, cached, signature))
    missing_set = set(missing)
    present = [i for i in items if str(i.source_path) not in missing_set]
    _condition_all(todo, settings, index, index_file, len(present) - len(todo), len(present), dataset)
    twins: list[str] = []
    present = _dedupe(present, lambda i: index[i.utt_id]["sha"], "audio content", excluded, twins)

    rows, quarantine, truncated = [], [], 0
    for item in present:
        result = index[item.utt_id]
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
        raise PldistillError(f"{dataset}: every file was unusable ({len(quarantine)} quarantined, {len(missing)} "
                             f"missing); first: {(quarantine[0]['path'] + ': ' + quarantine[0]['reason']) if quarantine else missing[0]}")
    manifest = pd.DataFrame(rows)
    _check_labels(set(manifest["label"]), where, f" after {len(quarantine)} unusable files were skipped")
    warnings = split_warnings(manifest, dataset) + twins
    counts = {label: int(n) for label, n in Counter(manifest["label"]).most_common()}
    excluded = {reason: n for reason, n in sorted(excluded.items())}
    summary = {
        "dataset": dataset,
        "adapter": adapter.name,
        "utterances": len(manifest),
        "speakers": int(manifest["speaker"].nunique()),
        "folds": {int(f): int(n) for f, n in sorted(Counter(manifest["fold"]).items())},
        "hours": round(float(manifest["duration"].sum()) / 3600, 4),
        "labels": list(collected.labels),
        "label_counts": counts,
        "left_out": excluded,
        "truncated_to_max_seconds": truncated,
        "quarantine": quarantine,
        "missing": missing,
        "preprocess": preprocessing(params),
        **({"warnings": warnings} if warnings else {}),  # absent when there is nothing to warn of
    }

    # Build the new prepared folder aside, then swap it in: a failure above left the old one as it was.
    prepared = layout.prepared(dataset)
    tmp = fresh_folder(prepared)
    (tmp / "audio").mkdir()
    for row in rows:
        source, target = cache_dir / f"{row['id']}.wav", tmp / row["audio_path"]
        try:
            os.link(source, target)  # no copy: the cache's file is never rewritten in place
        except OSError:
            shutil.copyfile(source, target)
    write_manifest(manifest, tmp / "manifest.parquet", collected.labels)
    write_json(tmp / "summary.json", summary)
    prepared.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(tmp, prepared)

    for bad in quarantine:
        console.print(f"[yellow]skipped[/] {bad['path']}: {bad['reason']}", highlight=False)
    for path in missing:
        console.print(f"[yellow]missing[/] {path}: listed but not found", highlight=False)
    for reason, n in excluded.items():
        console.print(f"left out: {n} x {reason}", highlight=False)
    if truncated:
        console.print(f"{truncated} clips longer than {settings.max_seconds:g} s were truncated to it")
    for warning in warnings:
        console.print(f"[yellow]warning[/] {dataset}: {warning}", highlight=False, soft_wrap=True)  # one whole line
    return PreprocessResult(layout.manifest(dataset), len(manifest), counts, quarantine, excluded, truncated)

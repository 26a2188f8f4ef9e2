"""The user's own data (`folder`): one sub-folder per label word, or a CSV of path, label[, speaker][, fold].

Folds: a CSV `fold` column if present; else speakers dealt round-robin into min(n_folds, #speakers) folds
after a seeded shuffle (needs >= 3 speakers); else files dealt into n_folds folds stratified by label.
Validation by the general rule (base.py).
"""

from __future__ import annotations

import csv as _csvlib
import dataclasses
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

from ..config import CorpusParams, Params
from ..errors import PldistillError
from ..inputs import AUDIO_SUFFIXES
from ..layout import Layout
from .base import (UNKNOWN, Advance, Collected, SourceItem, _check_folds, _check_label, _compile, _deal,
                   _missing_audio, _nothing_found, _root, _speaker, _unique_ids, _walk, _with_validation)


class FolderAdapter:
    """The user's own data: corpus.root with one sub-folder per label word, or corpus.csv with columns
    path, label and optional speaker, fold (paths relative to the CSV's folder or to root, or absolute)."""

    name = "folder"
    reads = ("csv", "speaker_pattern")  # of the settings only some adapters read (datasets.READ_BY)

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        excluded: Counter = Counter()
        missing: list[str] = []
        rows = self._csv(dataset, corpus, advance, missing, excluded) if corpus.csv else \
            self._label_folders(dataset, corpus, advance, excluded)
        pattern = _compile(corpus.speaker_pattern, dataset)
        ids = _unique_ids([(f"{dataset}-{rel}", str(path)) for rel, path, *_ in rows])
        items = [SourceItem(utt_id, speaker or _speaker(pattern, path.name, rel), label, path, fold or 0, 0)
                 for utt_id, (rel, path, label, speaker, fold) in zip(ids, rows)]
        rng = np.random.default_rng(params.seed)
        where = corpus.csv or corpus.root
        if any(i.fold for i in items):
            n_folds = _check_folds((i.fold for i in items), where)
        else:
            if corpus.n_folds < 3:
                raise PldistillError(f"params.yaml: corpora.{dataset}.n_folds ({corpus.n_folds}) must be at least 3")
            speakers = sorted({i.speaker for i in items} - {UNKNOWN})
            if len(speakers) >= 3 and all(i.speaker != UNKNOWN for i in items):
                n_folds = min(corpus.n_folds, len(speakers))
                order = [speakers[j] for j in rng.permutation(len(speakers))]
                fold_of = {s: k % n_folds + 1 for k, s in enumerate(order)}
                items = [dataclasses.replace(i, fold=fold_of[i.speaker]) for i in items]
            else:
                n_folds = corpus.n_folds
                groups = defaultdict(list)
                for i in items:
                    groups[i.label].append(i.utt_id)
                fold_of = _deal(groups, lambda _: list(range(1, n_folds + 1)), rng)
                items = [dataclasses.replace(i, fold=fold_of[i.utt_id]) for i in items]
            _check_folds((i.fold for i in items), f"{where} ({len(items)} files)")
        items = _with_validation(items, n_folds, rng)
        return Collected(items, tuple(sorted({i.label for i in items})), dict(excluded), missing)

    def check(self, dataset: str, corpus: CorpusParams) -> None:
        """A CSV's format and rows (the audio files it lists are read later)."""
        if corpus.csv:
            self._csv(dataset, corpus, lambda: None, [], Counter())

    @staticmethod
    def _label_folders(dataset: str, corpus: CorpusParams, advance: Advance, excluded: Counter) -> list[tuple]:
        root = _root(dataset, corpus)
        rows = []
        for path in _walk(root):
            advance()
            rel = path.relative_to(root)
            if len(rel.parts) == 1:
                excluded["file outside a label folder"] += 1
            elif path.suffix.lower() not in AUDIO_SUFFIXES:
                excluded["not an audio file"] += 1
            else:
                rows.append((rel.with_suffix("").as_posix(), path, _check_label(rel.parts[0], root / rel.parts[0]),
                             None, None))
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if not any(label == folder.name for _, _, label, *_ in rows):
                raise PldistillError(f"{folder}: label folder holds no audio files; add audio or remove the folder")
        if not rows:
            raise _nothing_found(root, "label folders with audio (ROOT/<label>/<file>.wav)", excluded)
        return rows

    @staticmethod
    def _csv(dataset: str, corpus: CorpusParams, advance: Advance, missing: list[str], excluded: Counter) -> list[tuple]:
        """Rows of the CSV; listed files that do not exist go to `missing` (as looked up next to the CSV). A row
        repeated exactly is kept once (counted as a duplicate file, like the same file under another path);
        the same path listed again with another label, speaker or fold is an error naming both lines."""
        root = Path(corpus.root) if corpus.root else None
        csv = Path(corpus.csv)
        if not csv.is_file() and root is not None and (root / csv).is_file():
            csv = root / csv
        if not csv.is_file():
            raise PldistillError(f"{corpus.csv}: CSV not found; set corpora.{dataset}.csv to a file with columns path,label")
        try:  # the csv module, not pandas: this runs before the audio is touched, and must be quick
            with csv.open(newline="", encoding="utf-8-sig") as f:
                reader = _csvlib.reader(f, skipinitialspace=True)
                lines = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
        except (_csvlib.Error, UnicodeDecodeError) as exc:
            raise PldistillError(f"{csv}: unreadable CSV ({str(exc).splitlines()[0]})") from None
        if not lines:
            raise PldistillError(f"{csv}: empty CSV; list the audio files with columns path,label")
        columns = [c.strip().lower() for c in lines[0][1]]
        if not {"path", "label"} <= set(columns):
            raise PldistillError(f"{csv}: needs the columns path and label (optional speaker, fold); found {columns}")
        rows, seen = [], {}
        for n, cells in lines[1:]:
            advance()
            if len(cells) > len(columns):
                raise PldistillError(f"{csv}:{n}: {len(cells)} fields, but the header names {len(columns)}; fix the CSV")
            row = dict(zip(columns, cells + [""] * (len(columns) - len(cells))))
            where = f"{csv}:{n}"
            rel = row["path"].strip()
            if not rel:
                raise PldistillError(f"{where}: empty path; fix the CSV")
            entry = {k: v.strip() for k, v in row.items()}
            if rel in seen:
                line, first = seen[rel]
                other = next((k for k in entry if entry[k] != first[k]), None)
                if other:
                    raise PldistillError(f"{where}: {rel} is listed at line {line} with {other} {first[other]!r} and "
                                         f"here with {other} {entry[other]!r}; keep one row")
                excluded["duplicate (file)"] += 1
                continue
            seen[rel] = (n, entry)
            candidates = [Path(rel)] if Path(rel).is_absolute() else [csv.parent / rel] + ([root / rel] if root else [])
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                missing.append(str(candidates[0]))
                continue
            speaker = row["speaker"].strip() if "speaker" in columns else None
            if speaker == "":
                raise PldistillError(f"{where}: empty speaker; fill it in or drop the speaker column")
            fold = row["fold"].strip() if "fold" in columns else None
            if fold is not None and not (fold.isdigit() and int(fold) >= 1):
                raise PldistillError(f"{where}: fold {fold!r} is not a fold number (1, 2, ...); fix the CSV")
            label = _check_label(row["label"].strip(), where)
            rows.append((str(PurePosixPath(rel.replace("\\", "/")).with_suffix("")), path, label, speaker,
                         int(fold) if fold is not None else None))
        if not rows:
            if missing:
                raise _missing_audio(csv, missing[0], f"paths are looked up relative to {csv.parent}, then to the "
                                     "root; pass the audio folder as --root")
            raise PldistillError(f"{csv}: no rows; list the audio files with columns path,label")
        return rows


ADAPTER = FolderAdapter()

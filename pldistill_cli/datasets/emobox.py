"""Any corpus described by EmoBox's files (`emobox`): one corpus's folder of fold_K/*.jsonl and label_map.json.

Folds: fold K = the fold file `fold_K/<corpus>_test_fold_K.jsonl` that lists the utterance. Validation:
official `fold_K/<corpus>_valid_fold_K.jsonl` files where they exist (an utterance listed for several folds
keeps the first); for utterances no validation file lists (or when there are none) the general rule
(base.py).

Re-rooting rule for a line's `wav` (e.g. `downloads/ravdess/audio/Actor_01/x.wav`): the first existing file
of (1) root / the path with `downloads/<dataset>/` stripped (<dataset> = the line's `dataset` field) ->
root/audio/Actor_01/x.wav, (2) root / the path with only `downloads/` stripped, (3) root / the path as
given; an absolute path is used as is. If no line's audio is found the root is wrong (error); otherwise
the missing ones are listed (Collected.missing).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np

from ..config import CorpusParams, Params
from ..errors import PldistillError
from ..layout import Layout
from .base import (Advance, Collected, SourceItem, _check_folds, _check_label, _compile, _missing_audio,
                   _nothing_found, _root, _speaker, _unique_ids, _with_validation)


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PldistillError(f"{path}:{n}: not a JSON line; fix or re-download the EmoBox file") from None
        if not isinstance(row, dict) or not {"key", "wav", "emo"} <= row.keys():
            raise PldistillError(f"{path}:{n}: an EmoBox line needs the fields key, wav and emo")
        yield f"{path}:{n}", row


def _fold_files(meta: Path, split: str) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for path in sorted(meta.glob(f"fold_*/*_{split}_fold_*.jsonl")):
        m = re.search(rf"_{split}_fold_(\d+)\.jsonl$", path.name)
        if not m or path.parent.name != f"fold_{m[1]}":
            continue
        if int(m[1]) in files:
            raise PldistillError(f"{path}: a second {split} file for fold {m[1]} (also {files[int(m[1])]}); keep one")
        files[int(m[1])] = path
    return files


def _reroot(root: Path, wav: str, dataset: str) -> Path | None:
    """The audio file of an EmoBox `wav` path under `root` (rule in the module docstring), or None."""
    if Path(wav).is_absolute():
        return Path(wav) if Path(wav).is_file() else None
    parts = PurePosixPath(wav.replace("\\", "/")).parts
    candidates = [parts[2:]] if parts[:2] == ("downloads", dataset) else []
    candidates += [parts[1:]] if parts[:1] == ("downloads",) else []
    return next((root.joinpath(*c) for c in [*candidates, parts] if root.joinpath(*c).is_file()), None)


class EmoboxAdapter:
    """Any corpus described by EmoBox files: corpus.metadata = one corpus's folder (fold_K/ and
    label_map.json), corpus.root = its audio root."""

    name = "emobox"
    reads = ("metadata", "speaker_pattern")  # of the settings only some adapters read (datasets.READ_BY)

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        root = _root(dataset, corpus)
        if not corpus.metadata or not Path(corpus.metadata).is_dir():
            raise PldistillError(f"{corpus.metadata or dataset}: the emobox adapter needs corpora.{dataset}.metadata, "
                                 "the EmoBox folder of one corpus (fold_K/*.jsonl and label_map.json)")
        meta = Path(corpus.metadata)
        label_map = self._label_map(meta / "label_map.json")
        tests = _fold_files(meta, "test")
        if not tests:
            raise PldistillError(f"{meta}: no fold_K/<corpus>_test_fold_K.jsonl files; pass the EmoBox folder of one corpus")
        n_folds = _check_folds(tests, meta)
        pattern = _compile(corpus.speaker_pattern, dataset)
        rule = (f"the wav paths are looked up under {root} with `downloads/<dataset>/` stripped, then with "
                "`downloads/` stripped, then as given; pass the folder that holds the corpus's audio as --root")

        found: dict[str, SourceItem] = {}  # EmoBox key -> item
        listed: dict[str, str] = {}  # every test key -> where it is listed
        missing: list[str] = []
        for fold, path in sorted(tests.items()):
            for where, row in _jsonl(path):
                advance()
                key, emo = str(row["key"]), str(row["emo"])
                if key in listed:
                    raise PldistillError(f"{where}: {key} is already listed at {listed[key]}; each utterance "
                                         "belongs to one test fold")
                listed[key] = where
                if emo not in label_map:
                    raise PldistillError(f"{where}: emo {emo!r} is not in {meta / 'label_map.json'}; add it there")
                audio = _reroot(root, str(row["wav"]), str(row.get("dataset") or path.name.split("_test_fold_")[0]))
                if audio is None:
                    missing.append(str(row["wav"]))
                    continue
                speaker = _speaker(pattern, key, str(row["wav"]))
                found[key] = SourceItem(key, speaker, label_map[emo], audio, fold, 0)
        if not found:
            raise _missing_audio(root, missing[0], rule) if missing else _nothing_found(meta, "EmoBox lines", Counter())
        ids = dict(zip(found, _unique_ids([(k, k) for k in found])))
        found = {k: dataclasses.replace(item, utt_id=ids[k]) for k, item in found.items()}

        official: dict[str, int] = {}
        repeated = 0
        for fold, path in sorted(_fold_files(meta, "valid").items()):
            for where, row in _jsonl(path):
                key = str(row["key"])
                if key not in listed:
                    raise PldistillError(f"{where}: {key} is in no test file; fix the validation file")
                if key in found and found[key].fold == fold:
                    raise PldistillError(f"{where}: {key} is in the test split of fold {fold} too; fix the validation file")
                repeated += key in official
                official.setdefault(key, fold)
        if repeated:
            from ..ui import console

            console.print(f"[yellow]note[/] {meta}: {repeated} utterances are listed in several validation files; "
                          "each keeps the first fold that lists it")
        rng = np.random.default_rng(params.seed)
        rest = _with_validation([i for k, i in found.items() if k not in official], n_folds, rng)
        items = [dataclasses.replace(i, validation_fold=official[k]) for k, i in found.items() if k in official] + rest
        return Collected(items, tuple(dict.fromkeys(label_map.values())), {}, [str(root / m) for m in missing])

    @staticmethod
    def _label_map(path: Path) -> dict[str, str]:
        try:
            label_map = json.loads(path.read_text())
        except FileNotFoundError:
            raise PldistillError(f"{path}: label map not found; the EmoBox folder needs label_map.json") from None
        except json.JSONDecodeError as exc:
            raise PldistillError(f"{path}: not valid JSON ({exc}); fix the label map") from None
        if not isinstance(label_map, dict) or not label_map or not all(isinstance(v, str) for v in label_map.values()):
            raise PldistillError(f"{path}: must map raw emotion codes to label words, e.g. {{\"exc\": \"Happy\"}}")
        for label in label_map.values():
            _check_label(label, path)
        return {str(k): v for k, v in label_map.items()}


ADAPTER = EmoboxAdapter()

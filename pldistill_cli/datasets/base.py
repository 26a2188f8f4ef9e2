"""What every dataset adapter shares: the items it returns, the corpus record a built-in corpus's module
declares, and the helpers the adapters read a corpus with.

Every adapter returns SourceItems whose `fold` is the fold whose test split holds the utterance and
whose `validation_fold` (never `fold`) is the fold whose validation split holds it. Files left out
by design are counted in `Collected.excluded` by reason; input the adapter cannot make sense of is
a one-line PldistillError naming the file and what to do.

General validation rule (with_validation): if every speaker is known and sits in a single fold,
`previous_fold` (speaker_independent=True); otherwise a stratified carve: for each (fold, label) group the
utterances are shuffled (numpy default_rng(params.seed)) and dealt round-robin, from a random start, over
the other folds (speaker_independent=False). Either way there must be >= 3 folds, numbered 1..n, or some
fold would have no training data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np

from ..config import CorpusParams, Params
from ..errors import PldistillError
from ..layout import Layout

UNKNOWN = "unknown"  # the speaker of an utterance whose speaker is not known
_LABEL_WORD = re.compile(r"[^\s,\[\](){}]+(?: [^\s,\[\](){}]+)*")  # words separated by single spaces
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")

Advance = Callable[[], None]


@dataclass(frozen=True)
class SourceItem:
    utt_id: str
    speaker: str
    label: str  # a label word of the dataset's label set
    source_path: Path
    fold: int  # the fold whose test split holds this utterance
    validation_fold: int  # the fold whose validation split holds it (never `fold`)
    speaker_independent: bool = True  # False where validation was carved without speaker information


@dataclass
class Collected:
    items: list[SourceItem]
    labels: tuple[str, ...]  # label words, in the order the prompt lists them
    excluded: dict[str, int] = field(default_factory=dict)  # files left out by design: reason -> count
    missing: list[str] = field(default_factory=list)  # files the corpus lists that do not exist


class Adapter(Protocol):
    name: str

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Callable[[], None]) -> Collected:
        """Find the corpus's utterances (corpus.root is set, or None where the adapter makes its own)."""
        ...


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus, as its module in datasets/ declares it."""

    name: str  # the dataset name that needs no `corpora` entry, and its adapter's name
    labels: tuple[str, ...]  # label words, in the order the prompt lists them
    licence: str  # what a model card says about the corpus's terms of use
    hub_licence: str  # the Hub's licence identifier for weights trained on it ("other" where none fits)
    description: str  # what a model trained on it learnt from, in a few words (predict)
    headline: tuple[str, float] | None  # the paper's PL-Distill student on it (Table 1): (metric, value)
    adapter: Adapter


def previous_fold(fold: int, n_folds: int) -> int:
    """Validation rule for speaker-/session-wise folds: the utterances tested in fold k+1 validate
    fold k, so validation speakers always come from fold k's training side."""
    return n_folds if fold == 1 else fold - 1


def _root(dataset: str, corpus: CorpusParams) -> Path:
    if corpus.root is None:
        raise PldistillError(f"{dataset}: no corpus root; pass --root PATH or set corpora.{dataset}.root in params.yaml")
    return Path(corpus.root)


def _walk(folder: Path) -> list[Path]:
    """Every file under `folder`, recursively and sorted, skipping hidden files and folders (`._x.wav`)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _nothing_found(where: Path, what: str, excluded: Counter) -> PldistillError:
    left_out = f" (left out: {', '.join(f'{r} {n}' for r, n in excluded.items())})" if excluded else ""
    return PldistillError(f"{where}: no recognisable {what} found{left_out}; pass the folder that holds the corpus")


def _check_label(label: str, where: object) -> str:
    if not _LABEL_WORD.fullmatch(label):
        raise PldistillError(f"{where}: label {label!r} is not usable as a label word (the prompt lists labels as "
                             "[A, B, C]: no commas, brackets, tabs, newlines or outer spaces); rename it")
    return label


def _speaker(pattern: re.Pattern | None, *texts: str) -> str:
    """The first group (or the whole match) of `pattern` in the first text it matches; UNKNOWN without one."""
    if pattern is None:
        return UNKNOWN
    for text in texts:
        m = pattern.search(text)
        if m and (m.group(1) if pattern.groups else m.group(0)):
            return m.group(1) if pattern.groups else m.group(0)
    raise PldistillError(f"{texts[-1]}: speaker_pattern {pattern.pattern!r} does not match it; fix the pattern")


def _compile(pattern: str | None, dataset: str) -> re.Pattern | None:
    try:
        return re.compile(pattern) if pattern else None
    except re.error as exc:
        raise PldistillError(f"params.yaml: corpora.{dataset}.speaker_pattern is not a valid regex ({exc})") from None


def _unique_ids(pairs: list[tuple[str, str]]) -> list[str]:
    """File-name-safe utterance ids from (wanted id, unique source); clashes get a hash of the source."""
    safe = [_UNSAFE_ID.sub("_", wanted) for wanted, _ in pairs]
    counts = Counter(safe)
    return [s if counts[s] == 1 else f"{s}-{hashlib.sha1(src.encode()).hexdigest()[:8]}"
            for s, (_, src) in zip(safe, pairs)]


def _check_folds(folds: Iterable[int], where: object) -> int:
    folds = sorted(set(folds))
    if len(folds) < 3 or folds != list(range(1, len(folds) + 1)):
        raise PldistillError(f"{where}: folds {folds} must be numbered 1..n with n >= 3 (a test, a validation "
                             "and a training fold each time); fix the fold assignment")
    return len(folds)


def _deal(groups: dict, targets: Callable[[object], list[int]], rng: np.random.Generator) -> dict[str, int]:
    """For each group (sorted) of ids: shuffle, then deal round-robin over targets(group) from a random start."""
    out = {}
    for group, ids in sorted(groups.items()):
        slots = targets(group)
        ids, start = sorted(ids), int(rng.integers(len(slots)))
        for i, j in enumerate(rng.permutation(len(ids))):
            out[ids[j]] = slots[(start + i) % len(slots)]
    return out


def _with_validation(items: list[SourceItem], n_folds: int, rng: np.random.Generator) -> list[SourceItem]:
    """The general validation rule (module docstring): speaker-wise when every speaker is known and
    in one fold, else a stratified carve over the other folds."""
    folds_of = defaultdict(set)
    for item in items:
        folds_of[item.speaker].add(item.fold)
    if UNKNOWN not in folds_of and all(len(f) == 1 for f in folds_of.values()):
        return [dataclasses.replace(i, validation_fold=previous_fold(i.fold, n_folds), speaker_independent=True)
                for i in items]
    groups = defaultdict(list)
    for item in items:
        groups[(item.fold, item.label)].append(item.utt_id)
    others = lambda group: [f for f in range(1, n_folds + 1) if f != group[0]]  # noqa: E731
    carved = _deal(groups, others, rng)
    return [dataclasses.replace(i, validation_fold=carved[i.utt_id], speaker_independent=False) for i in items]


def _missing_audio(where: Path, first: str, rule: str) -> PldistillError:
    return PldistillError(f"{where}: none of the listed audio files was found (first: {first}); {rule}")




def _scan_names(root: Path, suffixes: tuple[str, ...], advance: Advance, n_folds: int,
                parse: Callable[[Path], "tuple[str, str, str, int] | str"]) -> tuple[list[SourceItem], Counter]:
    """Corpora whose file names say everything: `parse` turns a file into (utt_id, speaker, label,
    fold), or into the reason it is left out; repeated names are counted, validation is previous_fold."""
    found: dict[str, SourceItem] = {}
    excluded: Counter = Counter()
    for path in _walk(root):
        if path.suffix.lower() not in suffixes:
            continue
        advance()
        parsed = parse(path)
        if isinstance(parsed, str):
            excluded[parsed] += 1
        elif parsed[0] in found:
            excluded["duplicate file name"] += 1
        else:
            utt_id, speaker, label, fold = parsed
            found[utt_id] = SourceItem(utt_id, speaker, label, path, fold, previous_fold(fold, n_folds))
    return list(found.values()), excluded

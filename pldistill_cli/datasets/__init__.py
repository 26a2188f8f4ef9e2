"""Dataset registry: each adapter turns a corpus, as distributed, into source items with folds.

A dataset name is a key of `params.yaml: corpora` (its `adapter` says which format it is in:
`synthetic`, `ravdess`, `savee`, `iemocap`, `emobox` or `folder`) or, for the built-in corpora,
the adapter's own name (`synthetic`, `ravdess`, `savee`, `iemocap`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..config import CorpusParams, Params, params_file
from ..errors import PldistillError
from ..layout import Layout

# corpus settings (and preprocess options) that only some adapters read: given to another, they would be ignored
READ_BY = {"csv": ("folder",), "metadata": ("emobox",), "speaker_pattern": ("emobox", "folder")}


def ignored(adapter: str, **given: object) -> list[str]:
    """The settings among `given` (those not None) that `adapter` does not read."""
    return [k for k, v in given.items() if v is not None and k in READ_BY and adapter not in READ_BY[k]]


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


def previous_fold(fold: int, n_folds: int) -> int:
    """Validation rule for speaker-/session-wise folds: the utterances tested in fold k+1 validate
    fold k, so validation speakers always come from fold k's training side."""
    return n_folds if fold == 1 else fold - 1


def adapters() -> dict[str, Adapter]:
    from .synthetic_adapter import SyntheticAdapter

    found: list[Adapter] = [SyntheticAdapter()]
    try:
        from .corpora import ADAPTERS
    except ImportError:
        ADAPTERS = ()
    found += [cls() for cls in ADAPTERS]
    return {a.name: a for a in found}


def resolve(dataset: str, params: Params, root: Path | None = None, **overrides: str | None) -> tuple[Adapter, CorpusParams]:
    """The adapter and corpus settings for a dataset name; `root` and any non-None `overrides`
    (CorpusParams fields, e.g. from the command line) replace the configured values."""
    import dataclasses

    known = adapters()
    corpus = params.corpora.get(dataset, CorpusParams())
    corpus = dataclasses.replace(corpus, **{k: v for k, v in overrides.items() if v is not None})
    name = corpus.adapter or dataset
    if name not in known:
        choices = sorted(set(known) | set(params.corpora))
        raise PldistillError(f"unknown dataset `{dataset}`; known: {', '.join(choices)} "
                             "(or add it under `corpora` in params.yaml)")
    unread = ignored(name, **{k: getattr(corpus, k) for k in READ_BY})
    if unread:
        raise PldistillError(f"{params_file(params)}: corpora.{dataset}.{unread[0]} is set, but the {name} adapter does "
                             f"not read it; remove it, or set corpora.{dataset}.adapter to {' or '.join(READ_BY[unread[0]])}")
    if root is not None:
        corpus = dataclasses.replace(corpus, root=str(root))
    if corpus.root is not None and not Path(corpus.root).exists():
        raise PldistillError(f"{corpus.root}: dataset root not found; pass the folder that holds the corpus")
    if corpus.root is not None and Path(corpus.root).exists() and not Path(corpus.root).is_dir():
        raise PldistillError(f"{corpus.root}: is a file, not a folder; pass the folder that holds the corpus"
                             + (" (where the synthetic clips are rendered)" if name == "synthetic" else ""))
    return known[name], corpus


def check_corpus(dataset: str, adapter: Adapter, corpus: CorpusParams) -> None:
    """What an adapter can check without reading audio (a CSV's format and rows), before torch is imported."""
    check = getattr(adapter, "check", None)
    if check is not None:
        check(dataset, corpus)

"""Dataset registry: each adapter turns a corpus, as distributed, into source items with folds (datasets/base.py);
one module per corpus or format.

A dataset name is a key of `params.yaml: corpora` (its `adapter` says which format it is in: a key of
ADAPTERS) or, for the built-in corpora, the adapter's own name (a key of CORPORA).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import CorpusParams, Params, params_file
from ..errors import PldistillError
from . import emobox, folder, iemocap, ravdess, savee, synthetic
from .base import UNKNOWN, Adapter, Collected, Corpus, SourceItem, previous_fold

__all__ = ["ADAPTERS", "CORPORA", "UNKNOWN", "Adapter", "Collected", "Corpus", "SourceItem", "adapters", "check_corpus",
           "ignored", "previous_fold", "resolve"]

# One module each; adding a corpus is its module and one entry here (and its name in adapter_names.py).
CORPORA: dict[str, Corpus] = {c.name: c for c in (synthetic.CORPUS, ravdess.CORPUS, savee.CORPUS, iemocap.CORPUS)}
ADAPTERS: dict[str, Adapter] = {**{name: c.adapter for name, c in CORPORA.items()},
                                **{a.name: a for a in (emobox.ADAPTER, folder.ADAPTER)}}

# corpus settings (and preprocess options) that only the adapters declaring them in `reads` read: given to
# another, they would be ignored
READ_BY = {k: tuple(n for n, a in ADAPTERS.items() if k in getattr(a, "reads", ())) for k in
           ("csv", "metadata", "speaker_pattern")}


def ignored(adapter: str, **given: object) -> list[str]:
    """The settings among `given` (those not None) that `adapter` does not read."""
    return [k for k, v in given.items() if v is not None and k in READ_BY and adapter not in READ_BY[k]]


def adapters() -> dict[str, Adapter]:
    return dict(ADAPTERS)


def resolve(dataset: str, params: Params, root: Path | None = None, **overrides: str | None) -> tuple[Adapter, CorpusParams]:
    """The adapter and corpus settings for a dataset name; `root` and any non-None `overrides`
    (CorpusParams fields, e.g. from the command line) replace the configured values."""
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

"""A dataset's label words and the paper's headline results, read from the corpus registry (datasets/)."""

from __future__ import annotations

from .datasets import CORPORA
from .errors import PldistillError

LABEL_SETS = {name: corpus.labels for name, corpus in CORPORA.items()}
PAPER_HEADLINES = {name: corpus.headline for name, corpus in CORPORA.items() if corpus.headline is not None}


def label_set(dataset: str) -> tuple[str, ...]:
    try:
        return LABEL_SETS[dataset]
    except KeyError:
        raise PldistillError(f"no label set for dataset `{dataset}`; known: {', '.join(LABEL_SETS)}") from None

"""Dataset registry: each adapter turns a corpus, as distributed, into source items with folds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..config import Params
from ..errors import PldistillError
from ..layout import Layout


@dataclass(frozen=True)
class SourceItem:
    utt_id: str
    speaker: str
    label: str  # a label word of the dataset's label set
    source_path: Path
    fold: int  # the fold whose test split holds this utterance
    validation_fold: int  # the fold whose validation split holds it


class Adapter(Protocol):
    name: str

    def collect(
        self, params: Params, layout: Layout, root: Path | None, advance: Callable[[], None]
    ) -> list[SourceItem]: ...


def previous_fold(fold: int, n_folds: int) -> int:
    """Validation rule for speaker-/session-wise folds: the utterances tested in fold k+1 validate
    fold k, so validation speakers always come from fold k's training side."""
    return n_folds if fold == 1 else fold - 1


def adapters() -> dict[str, Adapter]:
    from .synthetic_adapter import SyntheticAdapter

    return {a.name: a for a in (SyntheticAdapter(),)}


def get_adapter(name: str) -> Adapter:
    known = adapters()
    if name not in known:
        raise PldistillError(f"unknown dataset `{name}`; known: {', '.join(known)}")
    return known[name]

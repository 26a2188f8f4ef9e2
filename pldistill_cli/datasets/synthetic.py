"""The embedded default: a synthetic emotional-speech corpus rendered offline with espeak-ng (synthesis.py).

Folds: the speakers in order, n_speakers / n_folds to a fold; validation by `previous_fold`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import CorpusParams, Params
from ..errors import PldistillError
from ..layout import Layout
from ..synthesis import LABELS, SyntheticSettings, generate_corpus
from .base import Collected, Corpus, SourceItem, previous_fold


class SyntheticAdapter:
    name = "synthetic"

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Callable[[], None]) -> Collected:
        p = corpus
        if p.n_speakers % p.n_folds:
            raise PldistillError(f"params.yaml: corpora.{dataset}.n_folds ({p.n_folds}) must divide n_speakers "
                                 f"({p.n_speakers}): every fold has the same number of speakers")
        out_dir = Path(corpus.root) if corpus.root else layout.raw(dataset)
        settings = SyntheticSettings(seed=params.seed, n_speakers=p.n_speakers, n_sentences=p.n_sentences)
        plan = generate_corpus(out_dir, settings, on_progress=advance)
        speakers = sorted({u.speaker for u in plan})
        per_fold = len(speakers) // p.n_folds
        fold_of = {s: i // per_fold + 1 for i, s in enumerate(speakers)}
        items = [
            SourceItem(
                utt_id=u.utt_id,
                speaker=u.speaker,
                label=u.label,
                source_path=out_dir / f"{u.utt_id}.wav",
                fold=fold_of[u.speaker],
                validation_fold=previous_fold(fold_of[u.speaker], p.n_folds),
            )
            for u in plan
        ]
        return Collected(items, LABELS)


CORPUS = Corpus(
    name="synthetic",
    labels=LABELS,
    licence="synthetic speech rendered offline with espeak-ng (no human recordings); free to use",
    hub_licence="apache-2.0",
    description="the synthetic espeak-ng corpus: not real speech",
    headline=None,
    adapter=SyntheticAdapter(),
)

"""RAVDESS (Livingstone & Russo, 2018) as distributed: Actor_XX folders, flat, or the zip's nesting.

Folds: EmoBox's actor-wise test folds (RAVDESS_FOLDS); validation by `previous_fold` (the utterances
tested in fold k+1 validate fold k), so validation actors come from fold k's training side."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import CorpusParams, Params
from ..errors import PldistillError
from ..layout import Layout
from .base import Advance, Collected, Corpus, _nothing_found, _root, _scan_names

# The label words, in the order the prompt lists them (the paper's).
LABELS = ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear", "Calm")
# Emotion codes (the third field of a file name) -> label words.
CODES = {"01": "Neutral", "02": "Calm", "03": "Happy", "04": "Sad", "05": "Angry", "06": "Fear", "07": "Disgust",
         "08": "Surprise"}
FOLDS = {1: (1, 11, 20, 21), 2: (4, 10, 12, 14), 3: (8, 9, 19, 23), 4: (3, 5, 7, 24),
         5: (2, 15, 16, 18), 6: (6, 13, 17, 22)}  # EmoBox's test actors per fold

_FOLD = {actor: fold for fold, actors in FOLDS.items() for actor in actors}
_NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")


class RavdessAdapter:
    """RAVDESS speech as distributed (Actor_XX folders, flat, or the zip's nesting): audio-only
    speech (modality 03, vocal channel 01), 1440 clips in 6 folds of 4 actors."""

    name = "ravdess"

    @staticmethod
    def _parse(path: Path) -> tuple[str, str, str, int] | str:
        m = _NAME.fullmatch(path.stem)
        if not m or m[1] not in ("01", "02", "03") or m[2] not in ("01", "02"):
            return "unrecognised name"
        modality, vocal, emotion, *_, actor = m.groups()
        if modality != "03":
            return "video (modality 01/02)"
        if vocal != "01":
            return "song (vocal channel 02)"
        if emotion not in CODES:
            raise PldistillError(f"{path}: emotion code {emotion} is not a RAVDESS code (01-08); remove the file")
        if int(actor) not in _FOLD:
            raise PldistillError(f"{path}: actor {actor} is not a RAVDESS actor (01-24); remove the file")
        return f"ravdess-{path.stem}", f"Actor_{actor}", CODES[emotion], _FOLD[int(actor)]

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        root = _root(dataset, corpus)
        # the corpus's audio and video files (video is counted as left out)
        items, excluded = _scan_names(root, (".wav", ".mp4"), advance, len(FOLDS), self._parse)
        if not items:
            raise _nothing_found(root, "RAVDESS speech files (03-01-EE-II-SS-RR-AA.wav)", excluded)
        return Collected(items, LABELS, dict(excluded))


CORPUS = Corpus(
    name="ravdess",
    labels=LABELS,
    licence="RAVDESS (Livingstone & Russo, 2018), CC BY-NC-SA 4.0: non-commercial, share alike",
    hub_licence="cc-by-nc-sa-4.0",
    description="RAVDESS: acted North American English, 24 actors",
    headline=("WA", 92.08),
    adapter=RavdessAdapter(),
)

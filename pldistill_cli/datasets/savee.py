"""SAVEE (Jackson & Haq, 2014) as distributed: AudioData/<speaker>/<code><nn>.wav, the speaker folders
directly under the root, or flat <speaker>_<code><nn>.wav.

Folds: EmoBox's speaker-wise test folds (FOLDS, one test speaker each); validation by `previous_fold`."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import CorpusParams, Params
from ..layout import Layout
from .base import Advance, Collected, Corpus, _nothing_found, _root, _scan_names

LABELS = ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear")  # in the order the prompt lists them
CODES = {"a": "Angry", "d": "Disgust", "f": "Fear", "h": "Happy", "n": "Neutral", "sa": "Sad", "su": "Surprise"}
FOLDS = {"JE": 1, "KL": 2, "DC": 3, "JK": 4}  # EmoBox's test speaker -> fold

_CODE = r"(sa|su|a|d|f|h|n)(\d\d)"
_FLAT = re.compile(rf"({'|'.join(FOLDS)})_{_CODE}")


class SaveeAdapter:
    """SAVEE as distributed: AudioData/<speaker>/<code><nn>.wav (or the speaker folders directly
    under root) or flat <speaker>_<code><nn>.wav; 480 clips, one test speaker per fold."""

    name = "savee"

    @staticmethod
    def _parse(path: Path) -> tuple[str, str, str, int] | str:
        flat = _FLAT.fullmatch(path.stem)
        nested = re.fullmatch(_CODE, path.stem) if path.parent.name in FOLDS else None
        if flat:
            speaker, code, number = flat.groups()
        elif nested:
            speaker, (code, number) = path.parent.name, nested.groups()
        else:
            return "unrecognised name"
        return f"savee-{speaker}-{code}{number}", speaker, CODES[code], FOLDS[speaker]

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        root = _root(dataset, corpus)
        items, excluded = _scan_names(root, (".wav",), advance, len(FOLDS), self._parse)
        if not items:
            raise _nothing_found(root, "SAVEE files (AudioData/DC/a01.wav or DC_a01.wav)", excluded)
        return Collected(items, LABELS, dict(excluded))


CORPUS = Corpus(
    name="savee",
    labels=LABELS,
    licence="SAVEE (Jackson & Haq, 2014), free for research use; see the corpus's terms",
    hub_licence="other",
    description="SAVEE: acted British English, 4 male speakers",
    headline=("WA", 92.5),
    adapter=SaveeAdapter(),
)

"""Label sets and label words per dataset (as in the paper), raw corpus codes, and corpus licences."""

from __future__ import annotations

from .errors import PldistillError


_RAVDESS = ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear", "Calm")

# The label words, in the order the prompt lists them.
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "synthetic": _RAVDESS,
    "ravdess": _RAVDESS,
    "savee": ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear"),
    "iemocap": ("Happy", "Sad", "Angry", "Neutral"),
}


# Raw emotion codes of the built-in corpora -> label words.
RAVDESS_CODES = {"01": "Neutral", "02": "Calm", "03": "Happy", "04": "Sad", "05": "Angry", "06": "Fear",
                 "07": "Disgust", "08": "Surprise"}
SAVEE_CODES = {"a": "Angry", "d": "Disgust", "f": "Fear", "h": "Happy", "n": "Neutral", "sa": "Sad", "su": "Surprise"}
# IEMOCAP as EmoBox and the paper use it: exc is merged into Happy; the other release labels are left out.
IEMOCAP_CODES = {"neu": "Neutral", "hap": "Happy", "exc": "Happy", "ang": "Angry", "sad": "Sad"}
IEMOCAP_LEFT_OUT = ("xxx", "fru", "sur", "fea", "dis", "oth")


# What a model card says about each corpus's terms of use.
CORPUS_LICENCES = {
    "synthetic": "synthetic speech rendered offline with espeak-ng (no human recordings); free to use",
    "ravdess": "RAVDESS (Livingstone & Russo, 2018), CC BY-NC-SA 4.0: non-commercial, share alike",
    "savee": "SAVEE (Jackson & Haq, 2014), free for research use; see the corpus's terms",
    "iemocap": "IEMOCAP (Busso et al., 2008), under the USC SAIL licence agreement: research use only",
}


def label_set(dataset: str) -> tuple[str, ...]:
    try:
        return LABEL_SETS[dataset]
    except KeyError:
        raise PldistillError(f"no label set for dataset `{dataset}`; known: {', '.join(LABEL_SETS)}") from None


# The paper's headline results (PL-Distill student, Table 1), printed beside the project's for real corpora.
PAPER_HEADLINES = {"ravdess": ("WA", 92.08), "savee": ("WA", 92.5), "iemocap": ("UA", 83.91)}

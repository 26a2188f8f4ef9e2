"""predict: emotion and class probabilities per audio file from a distilled student (or any pldistill model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import BadAudio, read_audio
from .datasets import CORPORA
from .forward import audio_features, encode_audio, score_labels
from .families import family_of
from .inputs import unusable_input
from .models import AnyModelMeta, ModelMeta, TeacherMeta, load_model
from .training import resolve_device

MIN_WINDOW_S = 0.5  # a trailing piece shorter than this is not scored on its own
MIN_SECONDS = 0.2  # the default of preprocess.min_seconds, for models that do not record it


def describe_model(made_by: AnyModelMeta) -> str:
    """Which model answers, in words: its kind, method, seed, dataset, fold and what it learnt from."""
    if isinstance(made_by, TeacherMeta):
        base = made_by.checkpoint
        origin = f"{base['source']} at {base['revision']}" if base else f"{made_by.preset} preset"
        kind = f"teacher ({made_by.mode}, {origin})"
    else:
        kind = f"{'exported ' if made_by.stage == 'export' else ''}student {made_by.method} seed {made_by.seed}"
    data = f"{made_by.dataset} fold {made_by.fold}"
    # another dataset name than a built-in corpus's is a user's own corpus
    corpus = CORPORA.get(made_by.dataset)
    trained_on = corpus.description if corpus is not None else f"your corpus `{made_by.dataset}`"
    if isinstance(made_by, TeacherMeta) and made_by.mode == "zero-shot":
        return f"{kind} asked with the labels of {data}; not fine-tuned"
    return f"{kind} of {data} (trained on {trained_on})"


def result_lines(results: list["Prediction"]) -> list[str]:
    """One plain line per answered file, its whole path first (never cut to the terminal's width): the
    emotion and its probability, the next most likely ones, and how many encoder windows were averaged."""
    width = max((len(r.path) for r in results), default=0)
    lines = []
    for r in results:
        ranked = sorted(r.probabilities.items(), key=lambda kv: -kv[1])
        others = ", ".join(f"{label} {p:.2f}" for label, p in ranked[1:4])
        windows = f"{r.windows} window{'s' if r.windows != 1 else ''}"
        lines.append(f"{r.path:<{width}}  {r.label} {ranked[0][1]:.2f}  (then {others}; {windows})")
    return lines


@dataclass
class Prediction:
    path: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    error: str | None = None


class Predictor:
    """A saved student (or teacher, or exported folder) ready to label audio files."""

    def __init__(self, model_dir: Path, device: str = "auto"):
        self.device = resolve_device(device)
        self.model, self.processor = load_model(
            model_dir, self.device, "run `dvc repro` (or `pldistill distill`) first, or pass --model")
        made_by = ModelMeta.read(model_dir)
        self.prompt = family_of(self.model).prompt(self.processor, made_by.labels)
        self.rate = self.processor.feature_extractor.sampling_rate
        self.window = int(self.processor.feature_extractor.chunk_length * self.rate)
        # the shortest clip the model was trained on (preprocess quarantines shorter ones)
        self.min_seconds = made_by.params.get("preprocess", {}).get("min_seconds", MIN_SECONDS)

    @torch.no_grad()
    def predict(self, path: Path) -> Prediction:
        """Class probabilities of one file; audio longer than the encoder window is split into windows
        whose probabilities are averaged, weighted by their duration."""
        if unusable_input(path):
            return Prediction(str(path), error=unusable_input(path))
        try:
            wave = read_audio(path, self.rate)
        except BadAudio as exc:
            return Prediction(str(path), error=str(exc))
        if len(wave) < self.min_seconds * self.rate:
            return Prediction(str(path), error=f"{len(wave) / self.rate:.3f} s is shorter than {self.min_seconds:g} s, "
                                               "the shortest clip the model was trained on")
        starts = range(0, len(wave), self.window)
        pieces = [wave[s : s + self.window] for s in starts]
        pieces = [p for p in pieces if len(p) >= MIN_WINDOW_S * self.rate] or pieces[:1]
        features, mask = audio_features(self.processor, pieces)
        encoded, lengths = encode_audio(self.model, features.to(self.device), mask.to(self.device))
        probs = score_labels(self.model, self.prompt, encoded, lengths).softmax(-1).cpu().numpy()
        weights = np.array([len(p) for p in pieces], dtype=np.float64)
        mean = (probs * weights[:, None]).sum(0) / weights.sum()
        labels = self.prompt.labels
        return Prediction(str(path), labels[int(mean.argmax())], {l: float(v) for l, v in zip(labels, mean)},
                          len(pieces))


def predict_files(paths: list[Path], model_dir: Path, device: str = "auto") -> list[Prediction]:
    predictor = Predictor(model_dir, device)
    return [predictor.predict(Path(p)) for p in paths]

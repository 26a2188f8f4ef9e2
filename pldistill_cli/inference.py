"""Using the distilled student: predict emotions for audio files, and export a plain transformers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import BadAudio, read_audio
from .errors import PldistillError
from .forward import PromptLayout, audio_features, encode_audio, score_labels
from .labels import CORPUS_LICENCES
from .models import METADATA_FILE, load_model, read_metadata, save_model
from .training import resolve_device

MIN_WINDOW_S = 0.5  # a trailing piece shorter than this is not scored on its own


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
        labels = read_metadata(model_dir).get("labels")
        if not labels:
            raise PldistillError(f"{model_dir}: {METADATA_FILE} records no label set; use a pldistill model folder")
        self.prompt = PromptLayout.from_processor(self.processor, labels)
        self.window = int(self.processor.feature_extractor.chunk_length * 16000)

    @torch.no_grad()
    def predict(self, path: Path) -> Prediction:
        """Class probabilities of one file; audio longer than the encoder window is split into windows
        whose probabilities are averaged, weighted by their duration."""
        try:
            wave = read_audio(path)
        except BadAudio as exc:
            return Prediction(str(path), error=str(exc))
        starts = range(0, len(wave), self.window)
        pieces = [wave[s : s + self.window] for s in starts]
        pieces = [p for p in pieces if len(p) >= MIN_WINDOW_S * 16000] or pieces[:1]
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


def export_student(model_dir: Path, out_dir: Path, metrics_file: Path | None = None) -> Path:
    """The student with any LoRA merged, in fp32, with its processor, prompt and label set, and a model
    card; a folder plain transformers loads (Qwen2AudioForConditionalGeneration + AutoProcessor)."""
    model, processor = load_model(model_dir)
    if hasattr(model, "merge_and_unload"):  # a peft-wrapped student: fold the adapters into the weights
        model = model.merge_and_unload()
    model = model.float()
    made_by = read_metadata(model_dir)
    metrics = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.exists() else {}
    card = {k: made_by.get(k) for k in ("dataset", "fold", "method", "seed", "labels", "prompt", "teacher", "params")}
    card["test_metrics"] = {k: metrics[k] for k in ("wa", "ua", "macro_f1", "n", "ua_ci95") if k in metrics}
    save_model(model, processor, out_dir, card)
    (out_dir / "README.md").write_text(_model_card(card, model))
    return out_dir


def _model_card(card: dict, model) -> str:
    from .models import count_parameters

    dataset = card.get("dataset") or "?"
    m = card["test_metrics"]
    scores = (f"WA {m['wa']:.3f}, UA {m['ua']:.3f}, macro-F1 {m['macro_f1']:.3f} on {m['n']} test clips"
              if m else "not evaluated")
    return f"""# Speech emotion recogniser distilled with pldistill

- **Model**: `Qwen2AudioForConditionalGeneration`, {count_parameters(model):,} parameters (fp32, any LoRA merged)
- **Method**: {card.get('method')} (student seed {card.get('seed')}), distilled from the teacher
  `{(card.get('teacher') or {}).get('path')}` (weights {(card.get('teacher') or {}).get('weights')})
- **Data**: {dataset}, fold {card.get('fold')} (speaker-independent; checkpoint chosen on validation).
  Licence of the data: {CORPUS_LICENCES.get(dataset, 'see the corpus terms')}
- **Labels**: {', '.join(card.get('labels') or [])}
- **Test scores** (fold {card.get('fold')}): {scores}

## Use

```python
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
model = Qwen2AudioForConditionalGeneration.from_pretrained("THIS_FOLDER")
processor = AutoProcessor.from_pretrained("THIS_FOLDER")
```

Prompt (chat template of the processor; the answer is one label word):

```
{card.get('prompt')}
```

Or: `pldistill predict --model THIS_FOLDER clip.wav` ranks the label words (summed log-probability of the
label tokens and the end-of-turn token) and prints class probabilities.
"""

"""export: a student as a Hub-ready model folder that plain transformers loads: any LoRA merged, fp32,
its processor and chat template, the label set in config.id2label / label2id, and a model card
(README.md with the Hub's YAML front matter, the test scores as a model-index, and the lines that
score the labels the way pldistill does).

Export never deletes what it did not write: the destination must be absent, empty, or an earlier
export (its pldistill.json says stage `export`), which is then replaced atomically."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from .files import write_text
from .inputs import check_export_destination
from .labels import CORPUS_LICENCES
from .models import ModelMeta, count_parameters, load_model, save_model
from .prompt import END_OF_TURN, SYSTEM_PROMPT, user_prompt

# Hub licence identifiers: the data's terms bind the weights trained on it.
LICENCES = {"synthetic": "apache-2.0", "ravdess": "cc-by-nc-sa-4.0"}


def export_student(model_dir: Path, out_dir: Path, metrics_file: Path | None = None) -> Path:
    """The student with any LoRA merged, in fp32, with its processor, label set and model card."""
    check_export_destination(out_dir)
    made_by = ModelMeta.read(model_dir)
    model, processor = load_model(model_dir)
    model = model.float()
    model.config.id2label = dict(enumerate(made_by.labels))
    model.config.label2id = {label: i for i, label in enumerate(made_by.labels)}
    metrics = json.loads(metrics_file.read_text()).get("test", {}) if metrics_file and metrics_file.exists() else {}
    meta = dataclasses.replace(made_by, stage="export", history=(),
                               test_metrics={k: metrics[k] for k in ("wa", "ua", "macro_f1") if k in metrics} or None)
    save_model(model, processor, out_dir, meta)
    write_text(out_dir / "README.md", model_card(meta, count_parameters(model)))
    return out_dir


USAGE = '''import soundfile as sf
import torch
import torchaudio.functional as F
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

folder, path = "THIS_FOLDER", "clip.wav"
model = Qwen2AudioForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
rate = processor.feature_extractor.sampling_rate  # 16 kHz
wave, file_rate = sf.read(path, dtype="float32", always_2d=True)  # any rate, any channels
wave = F.resample(torch.from_numpy(wave.mean(axis=1)), file_rate, rate)  # mono at the model's rate
# The encoder hears `chunk_length` seconds at a time: a longer clip is scored window by window (a last
# piece under 0.5 s is left out) and the windows' probabilities averaged, weighted by their length.
size = processor.feature_extractor.chunk_length * rate
windows = [wave[start : start + size] for start in range(0, len(wave), size)]
windows = [w for w in windows if len(w) >= rate // 2] or windows[:1]
question = QUESTION
messages = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "audio", "audio": path}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def label_probabilities(window):
    scores = []  # log P(answer = label + end of turn | audio, prompt), as `pldistill predict` ranks them
    for label in labels:
        answer = label + END
        inputs = processor(text=prompt + answer, audio=[window.numpy()], sampling_rate=rate, return_tensors="pt")
        logp = model(**inputs).logits[0].log_softmax(-1)
        ids = inputs["input_ids"][0]
        n = len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        scores.append(sum(logp[len(ids) - n - 1 + i, ids[len(ids) - n + i]] for i in range(n)))
    return torch.stack(scores).softmax(0)


with torch.no_grad():
    mean = sum(len(w) * label_probabilities(w) for w in windows) / sum(len(w) for w in windows)
probabilities = dict(zip(labels, mean.tolist()))
print(max(probabilities, key=probabilities.get), probabilities)
'''


def usage(labels) -> str:
    """The card's snippet, with this model's prompt filled in (a test runs exactly these lines)."""
    return (USAGE.replace("QUESTION", json.dumps(user_prompt(labels))).replace("SYSTEM", json.dumps(SYSTEM_PROMPT))
            .replace("END", json.dumps(END_OF_TURN)))


def _front_matter(meta: ModelMeta) -> dict:
    m = meta.test_metrics or {}
    bases = [c["source"] for c in (meta.checkpoint, meta.student_llm, meta.teacher and meta.teacher.checkpoint)
             if c and "/" in str(c.get("source", "")) and not Path(c["source"]).exists()]
    split = f"test (fold {meta.fold}, speaker-independent)"
    return {
        "license": LICENCES.get(meta.dataset, "other"),
        **({"base_model": sorted(set(bases))} if bases else {}),
        "datasets": [meta.dataset],
        "metrics": ["accuracy", "recall", "f1"],
        "pipeline_tag": "audio-text-to-text",
        "library_name": "transformers",
        "tags": ["speech-emotion-recognition", "audio-classification", "knowledge-distillation", "pldistill",
                 f"pldistill-{meta.method}"],
        "model-index": [{
            "name": f"pldistill-{meta.dataset}-fold{meta.fold}-{meta.method}-s{meta.seed}",
            "results": [{
                "task": {"type": "audio-classification", "name": "Speech emotion recognition"},
                "dataset": {"name": meta.dataset, "type": meta.dataset, "split": split},
                "metrics": [{"type": t, "name": name, "value": round(m[key], 4)}
                            for t, name, key in (("accuracy", "WA (accuracy)", "wa"),
                                                 ("recall", "UA (unweighted average recall)", "ua"),
                                                 ("f1", "macro-F1", "macro_f1")) if key in m],
            }],
        }],
    }


def teacher_source(meta: ModelMeta) -> str:
    """The student's teacher by where it came from (a checkpoint and its revision, or a preset that
    pldistill trained), never by the folder it sat in on the machine that made it."""
    base = meta.teacher and meta.teacher.checkpoint
    data = f"{meta.dataset} fold {meta.fold}"
    if base:
        return f"`{base['source']}` at revision `{base['revision']}`, the teacher pldistill used on {data}"
    return f"{meta.preset} preset, trained by pldistill on {data}"


def model_card(meta: ModelMeta, parameters: int) -> str:
    m = meta.test_metrics
    scores = f"WA {m['wa']:.3f}, UA {m['ua']:.3f}, macro-F1 {m['macro_f1']:.3f}" if m else "not evaluated"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items()))
    return f"""---
{yaml.safe_dump(_front_matter(meta), sort_keys=False).strip()}
---

# Speech emotion recogniser distilled with pldistill

- **Model**: `Qwen2AudioForConditionalGeneration`, {parameters:,} parameters (fp32, any LoRA merged); the
  labels are in `config.id2label`.
- **Method**: {meta.method} (student seed {meta.seed}), distilled from the teacher below.
- **Teacher**: {teacher_source(meta)} (weights {meta.teacher and meta.teacher.weights}).
- **Data**: {meta.dataset}, fold {meta.fold} (speaker-independent; checkpoint chosen on validation).
  Licence of the data: {CORPUS_LICENCES.get(meta.dataset, 'see the corpus terms')}
- **Labels**: {', '.join(meta.labels)}
- **Test scores** (fold {meta.fold}): {scores}. One fold of one seed: see the pldistill report for the
  variation over folds and seeds before comparing models.
- **Made with**: {versions}. The same versions on the same machine reproduce it bit for bit; other
  hardware or versions reproduce it only statistically.

## Use with plain transformers

The answer is one label word; each label is scored by the summed log-probability of its tokens and the
end-of-turn token after the prompt, on mono 16 kHz audio in encoder windows, as
`pldistill predict --model THIS_FOLDER clip.wav` does (it needs soundfile and torchaudio besides
transformers):

```python
{usage(meta.labels).strip()}
```
"""

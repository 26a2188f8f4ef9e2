"""cache-teacher: the teacher's distillation targets, computed once and stored as Parquet.

Per utterance of the fold's train and validation splits (never test):
  encoder_out     the shared audio encoder's output X [T, D_enc]; with the teacher projector's weight
                  and bias (stored once, teacher_projector.safetensors) it reproduces the teacher's
                  projector output X W^T + b exactly, and it is the student's input (same encoder)
  attention       w [T]: teacher LLM attention at `attention_layer` from the text queries after the
                  audio (prompt, before the answer) onto the audio keys, mean over heads and queries
  topk_ids/...    the teacher's top-k log-probabilities at temperature `temperature` at every LDist
                  position (every next-token prediction of the sequence: audio and text positions of
                  the prompt, and the answer), [S - 1, k]; the rest of the mass is one tail bucket
meta.json records what made it: teacher folder and weights hash, prompt, labels and cache settings.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from .config import Params, fingerprint
from .data import AudioClips, AudioCollate, length_sorted_batches, text_batch
from .errors import PldistillError
from .forward import PromptLayout, capture_audio_attention, encode_audio, forward_from_encoder
from .layout import Layout
from .losses import topk_logprobs
from .manifest import manifest_labels, read_manifest, split_of
from .models import load_model, read_metadata
from .training import autocast, resolve_device
from .ui import console, progress

FORMAT_VERSION = 1
CACHE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("n_audio", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("encoder_out", pa.list_(pa.float32()), nullable=False),
        pa.field("attention", pa.list_(pa.float32()), nullable=False),
        pa.field("effective_steps", pa.float32(), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),
    ]
)
PROJECTOR_FILE = "teacher_projector.safetensors"


def cache_identity(teacher_dir: Path, prompt: PromptLayout, params: Params) -> dict:
    """What the cache's values depend on; a reader compares it with what it expects."""
    return {
        "format": FORMAT_VERSION,
        "teacher": {"path": str(teacher_dir), "weights": read_metadata(teacher_dir).get("weights")},
        "prompt": prompt.text,
        "labels": list(prompt.labels),
        "cache": {k: v for k, v in params.section("cache").items() if k not in ("batch_size", "device")},
    }


def _write_part(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), tmp)
    os.replace(tmp, path)


@torch.no_grad()
def build_cache(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> Path:
    p = params.cache
    labels = manifest_labels(layout.manifest(dataset))
    teacher_dir = layout.teacher(dataset, fold)
    device = resolve_device(p.device)
    model, processor = load_model(teacher_dir, device)
    prompt = PromptLayout.from_processor(processor, labels)
    manifest = read_manifest(layout.manifest(dataset))
    manifest["split"] = split_of(manifest, fold)
    rows = manifest[manifest["split"] != "test"].reset_index(drop=True)
    identity = cache_identity(teacher_dir, prompt, params)
    identity["ids"] = fingerprint(sorted(rows["id"]))

    work = layout.work(dataset, fold, "cache-teacher")
    if (work / "meta.json").exists() and json.loads((work / "meta.json").read_text()) != identity:
        shutil.rmtree(work)  # a different teacher, prompt or setting: the partial cache is stale
    work.mkdir(parents=True, exist_ok=True)
    (work / "meta.json").write_text(json.dumps(identity, indent=2))
    done = set()
    for part in work.glob("part-*.parquet"):
        done.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    todo = rows[~rows["id"].isin(done)].reset_index(drop=True)

    loader = DataLoader(AudioClips(todo), batch_sampler=length_sorted_batches(todo["duration"], p.batch_size),
                        collate_fn=AudioCollate(processor))
    n_prefix = len(prompt.prefix)
    with progress(f"cache teacher {dataset} fold {fold}", len(rows)) as bar:
        bar.update(completed=len(done))
        for batch in loader:
            meta = todo.iloc[batch.rows]
            text = text_batch(prompt, batch.n_audio.tolist(), meta["label"].tolist()).to(device)
            prompt_len = torch.tensor([len(prompt.prompt_ids(int(t))) for t in batch.n_audio], device=device)
            pos = torch.arange(text.input_ids.shape[1], device=device)[None]
            audio_mask = text.input_ids == prompt.audio_token_id
            query_mask = (pos >= n_prefix + batch.n_audio.to(device)[:, None]) & (pos < prompt_len[:, None])
            with autocast(device), capture_audio_attention(model, p.attention_layer, query_mask, audio_mask,
                                                           text.attention_mask) as captured:
                encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
                logits, _, _ = forward_from_encoder(model, encoded, lengths, text.input_ids, text.attention_mask)
            top_ids, top_lp = topk_logprobs(logits[:, :-1], p.top_k, p.temperature)
            out = []
            for i, (_, row) in enumerate(meta.iterrows()):
                t, s = int(lengths[i]), int(text.attention_mask[i].sum())
                w = captured["weights"][i][audio_mask[i]].float()
                out.append({
                    "id": row["id"], "label": row["label"], "split": row["split"], "n_audio": t,
                    "input_ids": text.input_ids[i, :s].tolist(),
                    "encoder_out": encoded[i, :t].float().flatten().tolist(),
                    "attention": w.tolist(),
                    "effective_steps": float(1.0 / w.square().sum()),
                    "topk_ids": top_ids[i, : s - 1].flatten().tolist(),
                    "topk_logprobs": top_lp[i, : s - 1].flatten().tolist(),
                })
            _write_part(work / f"part-{len(list(work.glob('part-*.parquet'))):05d}.parquet", out)
            bar.advance(len(out))

    projector = model.model.multi_modal_projector.linear
    save_file({"weight": projector.weight.float().cpu().contiguous(), "bias": projector.bias.float().cpu().contiguous()},
              str(work / PROJECTOR_FILE))
    final = layout.cache(dataset, fold)
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, final)
    console.print(f"cache: {len(rows)} utterances -> {final}")
    return final


@dataclass
class TeacherCache:
    """A validated cache, in memory: rows as numpy arrays plus the teacher projector."""

    folder: Path
    meta: dict
    table: pd.DataFrame
    projector_weight: torch.Tensor
    projector_bias: torch.Tensor
    top_k: int

    @classmethod
    def open(cls, folder: Path, expected: dict, prompt: PromptLayout) -> "TeacherCache":
        meta_file = folder / "meta.json"
        if not meta_file.exists():
            raise PldistillError(f"{folder}: no teacher cache here; run `pldistill cache-teacher` first")
        meta = json.loads(meta_file.read_text())
        for key in ("format", "teacher", "prompt", "labels", "cache"):
            if meta.get(key) != expected.get(key):
                raise PldistillError(
                    f"{folder}: cache was written with a different {key} ({meta.get(key)!r} != {expected.get(key)!r}); "
                    "re-run `pldistill cache-teacher`"
                )
        parts = sorted(folder.glob("part-*.parquet"))
        table = pq.ParquetDataset(parts, schema=CACHE_SCHEMA).read().to_pandas() if parts else pd.DataFrame()
        if table.empty:
            raise PldistillError(f"{folder}: the teacher cache has no rows; re-run `pldistill cache-teacher`")
        weights = load_file(str(folder / PROJECTOR_FILE))
        cache = cls(folder, meta, table, weights["weight"], weights["bias"], int(meta["cache"]["top_k"]))
        cache.validate(prompt)
        return cache

    def validate(self, prompt: PromptLayout) -> None:
        d_enc = self.projector_weight.shape[1]
        for row in self.table.itertuples():
            t, s = row.n_audio, len(row.input_ids)
            expected_ids = prompt.prompt_ids(t) + list(prompt.answer_ids(row.label))
            problem = (
                "input ids differ from the prompt" if list(row.input_ids) != expected_ids
                else "encoder_out has the wrong size" if len(row.encoder_out) != t * d_enc
                else "attention has the wrong size" if len(row.attention) != t
                else "top-k has the wrong size" if len(row.topk_ids) != (s - 1) * self.top_k or len(row.topk_logprobs) != (s - 1) * self.top_k
                else "non-finite values" if not (np.isfinite(row.encoder_out).all() and np.isfinite(row.attention).all())
                else None
            )
            if problem:
                raise PldistillError(f"{self.folder}: row {row.id}: {problem}; re-run `pldistill cache-teacher`")

    def split(self, name: str) -> "CachedTargets":
        return CachedTargets(self.table[self.table["split"] == name].reset_index(drop=True), self.projector_weight.shape[1], self.top_k)


class CachedTargets(Dataset):
    """Rows of the cache as tensors: X [T, D_enc], w [T], ids [S], top-k ids/log-probs [S-1, k]."""

    def __init__(self, rows: pd.DataFrame, d_enc: int, top_k: int):
        self.rows, self.d_enc, self.k = rows, d_enc, top_k

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows.iloc[i]
        return {
            "index": i,
            "label": r["label"],
            "encoded": torch.from_numpy(np.asarray(r["encoder_out"], dtype=np.float32).reshape(-1, self.d_enc)),
            "attention": torch.from_numpy(np.asarray(r["attention"], dtype=np.float32)),
            "input_ids": torch.from_numpy(np.asarray(r["input_ids"], dtype=np.int64)),
            "topk_ids": torch.from_numpy(np.asarray(r["topk_ids"], dtype=np.int64).reshape(-1, self.k)),
            "topk_logprobs": torch.from_numpy(np.asarray(r["topk_logprobs"], dtype=np.float32).reshape(-1, self.k)),
        }

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
from .forward import PromptLayout, encode_audio, forward_with_audio_attention
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
    with progress(f"cache teacher {dataset} fold {fold}", len(rows)) as bar:
        bar.update(completed=len(done))
        for batch in loader:
            meta = todo.iloc[batch.rows]
            text = text_batch(prompt, batch.n_audio.tolist(), meta["label"].tolist()).to(device)
            with autocast(device):
                encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
                logits, weights = forward_with_audio_attention(model, prompt, encoded, lengths, text.input_ids,
                                                               text.attention_mask, p.attention_layer)
            top_ids, top_lp = topk_logprobs(logits[:, :-1], p.top_k, p.temperature)
            out = []
            for i, (_, row) in enumerate(meta.iterrows()):
                t, s = int(lengths[i]), int(text.attention_mask[i].sum())
                w = weights[i]
                out.append({
                    "id": row["id"], "label": row["label"], "split": row["split"], "n_audio": t,
                    "input_ids": text.input_ids[i, :s].tolist(),
                    "encoder_out": encoded[i, :t].float().flatten().tolist(),
                    "attention": w.tolist(),
                    "effective_steps": float(1.0 / w.square().sum()),
                    "topk_ids": top_ids[i, : s - 1].flatten().tolist(),
                    "topk_logprobs": top_lp[i, : s - 1].flatten().tolist(),
                })
            _write_part(work / f"part-{len(list(work.glob('part-*.parquet'))):05d}.parquet", out)  # resumable
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
    """A cache whose identity has been checked; rows stay on disk until a batch needs them."""

    folder: Path
    meta: dict
    index: pd.DataFrame  # id, label, split, n_audio, part, row: where each row lives
    projector_weight: torch.Tensor
    projector_bias: torch.Tensor

    @classmethod
    def open(cls, folder: Path, expected: dict, prompt: PromptLayout) -> "TeacherCache":
        """Check that the cache was made by the expected teacher, prompt and settings, and that every
        row's input ids are this prompt's; one-line errors otherwise."""
        meta_file = folder / "meta.json"
        if not meta_file.exists():
            raise PldistillError(f"{folder}: no teacher cache here; run `pldistill cache-teacher` first")
        meta = json.loads(meta_file.read_text())
        for key in ("format", "teacher", "prompt", "labels", "cache"):
            if meta.get(key) != expected.get(key):
                found, wanted = repr(meta.get(key)), repr(expected.get(key))
                detail = f" ({found} != {wanted})" if len(found) + len(wanted) < 160 else ""
                raise PldistillError(f"{folder}: cache was written with a different {key}{detail}; "
                                     "re-run `pldistill cache-teacher`")
        frames = []
        for part in sorted(folder.glob("part-*.parquet")):
            rows = pq.read_table(part, columns=["id", "label", "split", "n_audio", "input_ids"]).to_pandas()
            for row in rows.itertuples():
                if list(row.input_ids) != prompt.prompt_ids(row.n_audio) + list(prompt.answer_ids(row.label)):
                    raise PldistillError(f"{part}: row {row.id}: input ids differ from the prompt; "
                                         "re-run `pldistill cache-teacher`")
            frames.append(rows.drop(columns="input_ids").assign(part=str(part), row=range(len(rows))))
        if not frames:
            raise PldistillError(f"{folder}: the teacher cache has no rows; re-run `pldistill cache-teacher`")
        weights = load_file(str(folder / PROJECTOR_FILE))
        return cls(folder, meta, pd.concat(frames, ignore_index=True), weights["weight"], weights["bias"])

    def split(self, name: str, columns: tuple[str, ...] = tuple(CACHE_SCHEMA.names)) -> "CachedTargets":
        rows = self.index[self.index["split"] == name].reset_index(drop=True)
        return CachedTargets(rows, columns, self.projector_weight.shape[1], int(self.meta["cache"]["top_k"]))


class CachedTargets(Dataset):
    """Rows of one split as tensors: encoded X [T, D_enc], attention w [T], input_ids [S], top-k ids and
    log-probs [S-1, k] (those among `columns`). Parquet parts are read with pyarrow, only the needed
    columns, one part at a time; each row is validated (shapes, finite values) as it is read."""

    def __init__(self, rows: pd.DataFrame, columns: tuple[str, ...], d_enc: int, top_k: int):
        self.rows, self.columns, self.d_enc, self.k = rows, list(columns), d_enc, top_k
        self._part: tuple[str, pd.DataFrame] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, part: str) -> pd.DataFrame:
        if self._part is None or self._part[0] != part:
            self._part = (part, pq.read_table(part, columns=self.columns).to_pandas())
        return self._part[1]

    def __getitem__(self, i: int) -> dict:
        where = self.rows.iloc[i]
        r = self._read(where["part"]).iloc[where["row"]]
        t, s = int(r["n_audio"]), len(r["input_ids"])
        item = {"index": i, "label": r["label"], "input_ids": torch.from_numpy(np.array(r["input_ids"], dtype=np.int64)),
                "encoded": torch.from_numpy(np.array(r["encoder_out"], dtype=np.float32)).view(-1, self.d_enc)}
        if "attention" in r:
            item["attention"] = torch.from_numpy(np.array(r["attention"], dtype=np.float32))
        if "topk_ids" in r:
            item["topk_ids"] = torch.from_numpy(np.array(r["topk_ids"], dtype=np.int64)).view(-1, self.k)
            item["topk_logprobs"] = torch.from_numpy(np.array(r["topk_logprobs"], dtype=np.float32)).view(-1, self.k)
        shapes_ok = (item["encoded"].shape[0] == t and item.get("attention", torch.zeros(t)).shape[0] == t
                     and item.get("topk_ids", torch.zeros(s - 1, 1)).shape[0] == s - 1)
        finite = all(torch.isfinite(v).all() for k, v in item.items() if k in ("encoded", "attention", "topk_logprobs"))
        if not (shapes_ok and finite):
            raise PldistillError(f"{where['part']}: row {r['id']}: {'wrong shapes' if not shapes_ok else 'non-finite values'}; "
                                 "re-run `pldistill cache-teacher`")
        return item

    def batches(self, batch_size: int, seed: int | None = None) -> list[list[int]]:
        """Batches drawn within one Parquet part (parts hold clips of similar length, so little padding
        and one part read per batch); shuffled when a seed is given."""
        rng = np.random.default_rng(seed)
        batches = []
        for _, group in self.rows.groupby("part", sort=True):
            idx = group.index.to_numpy()
            if seed is not None:
                idx = rng.permutation(idx)
            batches += [idx[j : j + batch_size].tolist() for j in range(0, len(idx), batch_size)]
        if seed is not None:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

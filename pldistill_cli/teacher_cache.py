"""cache-teacher: the teacher's distillation targets, computed once and stored as Parquet.

The shared audio encoder's output X [T, D_enc] (the student's input, since its encoder is the
teacher's, frozen) does not depend on the teacher's LLM or the fold: it lives in a per-corpus
encoder store, `data/encoded/<dataset>/<key>/`, keyed by the encoder's weights and the
preprocessing settings, filled clip by clip as folds need them, so every clip is encoded once per
corpus. With the teacher projector's weight and bias (stored once, teacher_projector.safetensors)
X reproduces the teacher's projector output X W^T + b exactly.

Per utterance of the fold's train and validation splits (never test), the fold's cache holds:
  attention       w [T]: teacher LLM attention at `attention_layer` from the text queries after the
                  audio (prompt, before the answer) onto the audio keys, mean over heads and queries
  effective_steps 1 / sum(w^2)
  topk_ids/...    the teacher's top-k log-probabilities at temperature `temperature` at every LDist
                  position (every next-token prediction of the sequence: audio and text positions of
                  the prompt, and the answer), [S - 1, k]; the rest of the mass is one tail bucket
  input_ids       the token ids the teacher read, checked against the prompt when read
meta.json records what made it (teacher and its weights, encoder, prompt, labels, preprocessing and
cache settings) and is checked when read. With several processes (torchrun / accelerate launch)
each writes its own parts of the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from .audio import read_audio
from .config import Params, fingerprint
from .data import length_sorted_batches, text_batch
from .errors import PldistillError
from .forward import PromptLayout, audio_features, encode_audio, forward_with_audio_attention
from .layout import Layout
from .losses import topk_logprobs
from .manifest import manifest_labels, read_manifest, split_of
from .models import load_model, provenance, weights_dtype
from .training import autocast, resolve_device, start_processes
from .ui import console, progress

FORMAT_VERSION = 2
CACHE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("n_audio", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("attention", pa.list_(pa.float32()), nullable=False),
        pa.field("effective_steps", pa.float32(), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),
    ]
)
# cache.projector_targets: gram adds each clip's raw Gram matrix of the teacher projector output.
GRAM_SCHEMA = CACHE_SCHEMA.append(pa.field("gram", pa.list_(pa.float32()), nullable=False))
ENCODER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("n_audio", pa.int32(), nullable=False),
        pa.field("encoder_out", pa.list_(pa.float32()), nullable=False),
    ]
)
PROJECTOR_FILE = "teacher_projector.safetensors"


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """Hash of an audio encoder's weights (as float32, so a bf16 copy of the same weights agrees)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _preprocessing(params: Params) -> dict:
    return {k: v for k, v in params.section("preprocess").items() if k != "workers"}


def cache_identity(teacher_dir: Path, prompt: PromptLayout, params: Params) -> dict:
    """What the cache's values depend on; a reader compares it with what it expects."""
    return {
        "format": FORMAT_VERSION,
        "teacher": provenance(teacher_dir),
        "prompt": prompt.text,
        "labels": list(prompt.labels),
        "preprocess": _preprocessing(params),
        "cache": {k: v for k, v in params.section("cache").items() if k not in ("batch_size", "device")},
    }


def _write_part(folder: Path, rank: int, rows: list[dict], schema: pa.Schema) -> None:
    """Append one Parquet part, written atomically; each process numbers its own parts (and a
    random suffix keeps two runs that share the encoder store from ever writing the same name)."""
    n = len(list(folder.glob(f"part-r{rank}-*.parquet")))
    path = folder / f"part-r{rank}-{n:05d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    write_rows(tmp, rows, schema)
    os.replace(tmp, path)


def write_rows(where, rows: list[dict], schema: pa.Schema) -> None:
    """Rows (numpy arrays for the list columns) to Parquet. Dictionary encoding only for the string
    columns: on float lists it takes about ten times as long and makes the file larger."""
    strings = [f.name for f in schema if f.type == pa.string()]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), where, use_dictionary=strings)


def _ids_in(folder: Path) -> list[str]:
    return [i for part in sorted(folder.glob("part-*.parquet"))
            for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()]


class EncoderStore:
    """Encoder outputs of one corpus under one encoder and preprocessing (the folder's key); rows are
    only ever added. Reads keep the last few Parquet parts in memory."""

    def __init__(self, folder: Path, d_enc: int, keep_parts: int = 4):
        self.folder, self.d_enc, self.keep_parts = folder, d_enc, keep_parts
        self.where: dict[str, tuple[str, int]] = {}
        for part in sorted(folder.glob("part-*.parquet")):
            for row, i in enumerate(pq.read_table(part, columns=["id"]).column("id").to_pylist()):
                self.where[i] = (str(part), row)
        self._parts: OrderedDict[str, pd.DataFrame] = OrderedDict()

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self.where

    def add(self, rank: int, ids: list[str], encoded: torch.Tensor, lengths: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = [{"id": i, "n_audio": int(t), "encoder_out": encoded[j, : int(t)].float().flatten().cpu().numpy()}
                for j, (i, t) in enumerate(zip(ids, lengths.tolist()))]
        _write_part(self.folder, rank, rows, ENCODER_SCHEMA)

    def get(self, clip_id: str) -> torch.Tensor:
        if clip_id not in self.where:
            raise PldistillError(f"{self.folder}: no encoder output for {clip_id}; re-run `pldistill cache-teacher`")
        part, row = self.where[clip_id]
        if part not in self._parts:
            self._parts[part] = pq.read_table(part).to_pandas()
            if len(self._parts) > self.keep_parts:
                self._parts.popitem(last=False)
        r = self._parts[part].iloc[row]
        x = torch.from_numpy(np.array(r["encoder_out"], dtype=np.float32))
        if x.numel() != int(r["n_audio"]) * self.d_enc or not torch.isfinite(x).all():
            raise PldistillError(f"{part}: row {clip_id}: wrong shape or non-finite values; delete {self.folder} "
                                 "and re-run `pldistill cache-teacher`")
        return x.view(-1, self.d_enc)


def topk_from_hidden(head: torch.nn.Module, hidden: torch.Tensor, k: int, temperature: float,
                     positions: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_logprobs(head(hidden)), computed `positions` rows at a time: the dense logits of a whole
    batch (B x S x 156,032 for Qwen2-Audio) never exist at once."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunks = [topk_logprobs(head(flat[i : i + positions]), k, temperature) for i in range(0, len(flat), positions)]
    shape = (*hidden.shape[:-1], k)
    return torch.cat([c[0] for c in chunks]).view(shape), torch.cat([c[1] for c in chunks]).view(shape)


def pad_steps(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, D] tensors -> right-padded [B, T_max, D] and lengths [B]."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.zeros(len(rows), int(lengths.max()), rows[0].shape[1])
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out, lengths


class _ClipsToEncode(Dataset):
    """(row index, waveform or None): audio is read only for clips the encoder store lacks."""

    def __init__(self, rows: pd.DataFrame, store: EncoderStore):
        self.rows, self.store = rows, store

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows.iloc[i]
        return i, None if row["id"] in self.store else read_audio(row["audio_path"])


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
        for key in ("format", "teacher", "prompt", "labels", "preprocess", "cache"):
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

    def check_student_encoder(self, encoder: torch.nn.Module) -> None:
        """The cached encoder output stands in for the student's own encoder only if that encoder is the
        teacher's and stays frozen; anything else is refused, saying why."""
        if any(p.requires_grad for p in encoder.parameters()):
            raise PldistillError(f"{self.folder}: the student's audio encoder is trainable, so the cached encoder "
                                 "output would go stale as it trains; keep the encoder frozen")
        found, cached = encoder_fingerprint(encoder), self.meta["encoder"]["weights"]
        if found != cached:
            raise PldistillError(f"{self.folder}: the cached encoder output is not this student's encoder's "
                                 f"(weights {found}, cache {cached}); build the student on the cached teacher's encoder")

    @cached_property
    def store(self) -> EncoderStore:
        """The encoder store the cache reads X from, indexed once for every split."""
        folder = Path(self.meta["encoder"]["store"])
        if not folder.exists():
            raise PldistillError(f"{folder}: the encoder store this cache reads is gone; re-run `pldistill cache-teacher`")
        return EncoderStore(folder, self.projector_weight.shape[1])

    def split(self, name: str, columns: tuple[str, ...] = tuple(CACHE_SCHEMA.names)) -> "CachedTargets":
        rows = self.index[self.index["split"] == name].reset_index(drop=True)
        return CachedTargets(rows, columns, self.store, int(self.meta["cache"]["top_k"]))


class CachedTargets(Dataset):
    """Rows of one split as tensors: encoded X [T, D_enc] (from the encoder store), attention w [T],
    input_ids [S], top-k ids and log-probs [S-1, k] (those among `columns`). Parquet parts are read
    with pyarrow, only the needed columns, one part at a time; each row is validated (shapes,
    finite values) as it is read."""

    def __init__(self, rows: pd.DataFrame, columns: tuple[str, ...], store: EncoderStore, top_k: int):
        self.rows, self.columns, self.store, self.k = rows, list(columns), store, top_k
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
                "encoded": self.store.get(r["id"])}
        if "attention" in r:
            item["attention"] = torch.from_numpy(np.array(r["attention"], dtype=np.float32))
        if "gram" in r:
            item["gram"] = torch.from_numpy(np.array(r["gram"], dtype=np.float32)).view(t, t)
        if "topk_ids" in r:
            item["topk_ids"] = torch.from_numpy(np.array(r["topk_ids"], dtype=np.int64)).view(-1, self.k)
            item["topk_logprobs"] = torch.from_numpy(np.array(r["topk_logprobs"], dtype=np.float32)).view(-1, self.k)
        shapes_ok = (item["encoded"].shape[0] == t and item.get("attention", torch.zeros(t)).shape[0] == t
                     and item.get("topk_ids", torch.zeros(s - 1, 1)).shape[0] == s - 1)
        finite = all(torch.isfinite(v).all() for k, v in item.items()
                     if k in ("encoded", "attention", "gram", "topk_logprobs"))
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


@torch.no_grad()
def build_cache(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> Path:
    p = params.cache
    labels = manifest_labels(layout.manifest(dataset))
    teacher_dir = layout.teacher(dataset, fold)
    device = resolve_device(p.device)
    processes = start_processes(device, params.world_size)
    rank = processes.process_index
    model, processor = load_model(teacher_dir, device, dtype=weights_dtype(params.model.dtype, device, frozen=True))
    prompt = PromptLayout.from_processor(processor, labels)
    manifest = read_manifest(layout.manifest(dataset))
    manifest["split"] = split_of(manifest, fold)
    rows = manifest[manifest["split"] != "test"].reset_index(drop=True)
    encoder_hash = encoder_fingerprint(model.model.audio_tower)
    key = fingerprint({"encoder": encoder_hash, "preprocess": _preprocessing(params),
                       "window": processor.feature_extractor.chunk_length})
    store = EncoderStore(layout.encoded(dataset, key), model.config.audio_config.d_model)
    identity = {**cache_identity(teacher_dir, prompt, params), "ids": fingerprint(sorted(rows["id"])),
                "encoder": {"weights": encoder_hash, "store": str(store.folder)}}

    work = layout.work(dataset, fold, "cache-teacher")
    if processes.is_main_process:
        if (work / "meta.json").exists() and json.loads((work / "meta.json").read_text()) != identity:
            shutil.rmtree(work)  # a different teacher, prompt or setting: the partial cache is stale
        work.mkdir(parents=True, exist_ok=True)
        (work / "meta.json").write_text(json.dumps(identity, indent=2))
    processes.wait_for_everyone()
    done = set(_ids_in(work))
    todo = rows[~rows["id"].isin(done)].reset_index(drop=True)
    # Clips of similar length share a batch; each process takes every num_processes-th batch.
    mine = length_sorted_batches(todo["duration"], p.batch_size)[rank :: processes.num_processes]
    loader = DataLoader(_ClipsToEncode(todo, store), batch_sampler=mine, collate_fn=list)
    seconds = 0.0
    with progress(f"cache teacher {dataset} fold {fold}", len(rows)) as bar:
        bar.update(completed=len(done))
        began = time.perf_counter()
        for items in loader:
            meta = todo.iloc[[i for i, _ in items]]
            new = [(i, w) for i, w in items if w is not None]
            encoded_new = {}
            if new:
                features, mask = audio_features(processor, [w for _, w in new])
                with autocast(device):
                    x, lengths = encode_audio(model, features.to(device), mask.to(device))
                new_ids = [todo.at[i, "id"] for i, _ in new]
                store.add(rank, new_ids, x, lengths)
                encoded_new = {clip: x[j, : int(lengths[j])].float().cpu() for j, clip in enumerate(new_ids)}
            encoded, lengths = pad_steps([encoded_new[c] if c in encoded_new else store.get(c) for c in meta["id"]])
            encoded, lengths = encoded.to(device), lengths.to(device)
            text = text_batch(prompt, lengths.tolist(), meta["label"].tolist()).to(device)
            with autocast(device):
                hidden, weights = forward_with_audio_attention(model, prompt, encoded.to(model.dtype), lengths,
                                                               text.input_ids, text.attention_mask, p.attention_layer,
                                                               logits=False)
                top_ids, top_lp = topk_from_hidden(model.lm_head, hidden[:, :-1], p.top_k, p.temperature)
            if p.projector_targets == "gram":
                z = model.model.multi_modal_projector(encoded.to(model.dtype)).float()
                grams = z @ z.mT
            out = []
            for i, row in enumerate(meta.itertuples()):
                s, w = int(text.attention_mask[i].sum()), weights[i]
                out.append({
                    "id": row.id, "label": row.label, "split": row.split, "n_audio": int(lengths[i]),
                    "input_ids": text.input_ids[i, :s].int().cpu().numpy(),
                    "attention": w.cpu().numpy(),
                    "effective_steps": float(1.0 / w.square().sum()),
                    "topk_ids": top_ids[i, : s - 1].flatten().int().cpu().numpy(),
                    "topk_logprobs": top_lp[i, : s - 1].flatten().cpu().numpy(),
                })
                if p.projector_targets == "gram":
                    t = int(lengths[i])
                    out[-1]["gram"] = grams[i, :t, :t].flatten().cpu().numpy()
            _write_part(work, rank, out, GRAM_SCHEMA if p.projector_targets == "gram" else CACHE_SCHEMA)  # resumable: a re-run skips the ids already written
            seconds += float(meta["duration"].sum())
            bar.advance(len(out) * processes.num_processes)  # every process does a like share
    elapsed = max(time.perf_counter() - began, 1e-9)
    processes.wait_for_everyone()
    final = layout.cache(dataset, fold)
    if processes.is_main_process:
        ids = _ids_in(work)
        if len(ids) != len(set(ids)) or set(ids) != set(rows["id"]):
            raise PldistillError(f"{work}: {len(ids)} rows for {len(rows)} utterances ({len(ids) - len(set(ids))} "
                                 "duplicated); delete the folder and re-run `pldistill cache-teacher`")
        projector = model.model.multi_modal_projector.linear
        save_file({"weight": projector.weight.float().cpu().contiguous(),
                   "bias": projector.bias.float().cpu().contiguous()}, str(work / PROJECTOR_FILE))
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, final)
    processes.wait_for_everyone()
    clips = sum(map(len, mine))
    console.print(f"cache: {len(rows)} utterances -> {final}; this process cached {clips} at {clips / elapsed:.1f} "
                  f"clips/s ({seconds / elapsed:.0f} s of audio per s; {processes.num_processes} process(es))")
    return final

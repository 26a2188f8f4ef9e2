"""The teacher cache, defined once: its Parquet schemas, its meta.json contract, the per-corpus
encoder store, and the reader that distill and report use (cache-teacher writes it).

A fold's cache folder holds Parquet parts of CACHE_SCHEMA (GRAM_SCHEMA with `projector_targets:
gram`), the teacher projector's weight and bias (PROJECTOR_FILE) and meta.json (CacheMeta). The
shared encoder's output X [T, D_enc] of every clip lives in the corpus's encoder store,
`data/encoded/<dataset>/<key>/` (ENCODER_SCHEMA), keyed by the encoder's weights and the
preprocessing settings, so each clip is encoded once per corpus. With the projector's W and b, X
gives the teacher's projector output X W^T + b exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from safetensors.torch import load_file
from torch.utils.data import Dataset

from .config import CacheSettings, Params, cache_settings, preprocessing
from .errors import PldistillError
from .files import atomic_path, write_json
from .models import Provenance, provenance
from .prompt import PromptLayout

# pyarrow installs its own Ctrl-C handler for the length of a read and swallows a SIGINT that arrives then: a
# training run reading cached rows each batch would train on after Ctrl-C. Python's handler raises
# KeyboardInterrupt as soon as the read returns.
pa.enable_signal_handlers(False)

FORMAT_VERSION = 3
CACHE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("n_audio", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("attention", pa.list_(pa.float32()), nullable=False),  # w [T], sums to 1
        pa.field("effective_steps", pa.float32(), nullable=False),  # 1 / sum(w^2)
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),  # [S - 1, k] flattened
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
META_FILE = "meta.json"
IDENTITY = ("format", "teacher", "prompt", "labels", "preprocess", "cache")  # what a reader checks


@dataclass(frozen=True)
class EncoderRecord:
    """Where a cache's encoder output X lives and what made it."""

    weights: str  # encoder_fingerprint of the encoder's weights as stored (whatever dtype a stage loads them in)
    store: str  # the encoder store folder
    precision: str  # what computed X: "fp32", or "bf16" (bf16 weights or bf16 autocast, as on CUDA)


@dataclass(frozen=True)
class CacheMeta:
    """meta.json of a fold's cache: what made its values (IDENTITY fields are checked when read)."""

    format: int
    teacher: Provenance  # the teacher model that made it
    prompt: str
    labels: tuple[str, ...]
    preprocess: dict[str, Any]  # the preprocessing settings the audio went through
    cache: CacheSettings
    ids: str = ""  # fingerprint of the cached utterance ids
    encoder: EncoderRecord | None = None

    def write(self, folder: Path) -> None:
        write_json(folder / META_FILE, dataclasses.asdict(self))

    @classmethod
    def read(cls, folder: Path) -> "CacheMeta":
        path = folder / META_FILE
        if not path.exists():
            raise PldistillError(f"{folder}: no teacher cache here; run `pldistill cache-teacher` first")
        try:
            return TypeAdapter(cls).validate_python(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValidationError):
            raise PldistillError(f"{path}: not a valid cache description; re-run `pldistill cache-teacher`") from None


def expected_meta(teacher_dir: Path, prompt: PromptLayout, params: Params) -> CacheMeta:
    """The identity a cache made by this teacher, prompt and settings has."""
    return CacheMeta(FORMAT_VERSION, provenance(teacher_dir), prompt.text, prompt.labels, preprocessing(params),
                     cache_settings(params))


def encoder_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """Hash of an audio encoder's weights as stored in the teacher's files (models.load_encoder): names,
    dtypes and bytes. It does not depend on the dtype a stage then loads them in (bf16 on CUDA), so a bf16
    teacher that cached X and the fp32 student built from the same files agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def write_rows(where, rows: list[dict], schema: pa.Schema) -> None:
    """Rows (numpy arrays for the list columns) to Parquet. Dictionary encoding only for the string
    columns: on float lists it takes about ten times as long and makes the file larger."""
    strings = [f.name for f in schema if f.type == pa.string()]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), where, use_dictionary=strings)


def write_part(folder: Path, rank: int, rows: list[dict], schema: pa.Schema) -> Path:
    """Append one Parquet part, written atomically and named by the process's rank and its count of
    parts (the same run always gives the same names)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-r{rank}-{len(list(folder.glob(f'part-r{rank}-*.parquet'))):05d}.parquet"
    with atomic_path(path) as tmp:
        write_rows(tmp, rows, schema)
    return path


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def ids_in(folder: Path) -> list[str]:
    return [i for part in parts(folder) for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()]


def _read_table(part: Path | str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(part, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise PldistillError(f"{part}: unreadable Parquet part ({str(exc).splitlines()[0][:120]}); delete the "
                             "cache folder and re-run `pldistill cache-teacher`") from None


class EncoderStore:
    """Encoder outputs of one corpus under one encoder and preprocessing (the folder's key); rows are
    only ever added, under a lock (several folds share a store). Reads keep the last few parts in memory."""

    def __init__(self, folder: Path, d_enc: int, keep_parts: int = 4):
        self.folder, self.d_enc, self.keep_parts = folder, d_enc, keep_parts
        self.where: dict[str, tuple[str, int]] = {}
        for part in parts(folder):
            for row, i in enumerate(_read_table(part, ["id"]).column("id").to_pylist()):
                self.where[i] = (str(part), row)
        self._parts: OrderedDict[str, pd.DataFrame] = OrderedDict()

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self.where

    def add(self, rank: int, ids: list[str], encoded: torch.Tensor, lengths: torch.Tensor) -> None:
        from filelock import FileLock

        rows = [{"id": i, "n_audio": int(t), "encoder_out": encoded[j, : int(t)].float().flatten().cpu().numpy()}
                for j, (i, t) in enumerate(zip(ids, lengths.tolist()))]
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.folder / ".lock"):
            part = write_part(self.folder, rank, rows, ENCODER_SCHEMA)
        self.where.update({i: (str(part), row) for row, i in enumerate(ids)})

    def get(self, clip_id: str) -> torch.Tensor:
        if clip_id not in self.where:
            raise PldistillError(f"{self.folder}: no encoder output for {clip_id}; re-run `pldistill cache-teacher`")
        part, row = self.where[clip_id]
        if part not in self._parts:
            self._parts[part] = _read_table(part).to_pandas()
            if len(self._parts) > self.keep_parts:
                self._parts.popitem(last=False)
        r = self._parts[part].iloc[row]
        x = torch.from_numpy(np.array(r["encoder_out"], dtype=np.float32))
        if x.numel() != int(r["n_audio"]) * self.d_enc or not torch.isfinite(x).all():
            raise PldistillError(f"{part}: row {clip_id}: wrong shape or non-finite values; delete {self.folder} "
                                 "and re-run `pldistill cache-teacher`")
        return x.view(-1, self.d_enc)


class TeacherCache:
    """A cache whose identity has been checked; rows stay on disk until a batch needs them."""

    def __init__(self, folder: Path, expected: CacheMeta, prompt: PromptLayout):
        """Check that the cache was made by the expected teacher, prompt and settings, and that every
        row's input ids are this prompt's; one-line errors otherwise."""
        self.folder, self.meta = folder, CacheMeta.read(folder)
        for key in IDENTITY:
            found, wanted = getattr(self.meta, key), getattr(expected, key)
            if found != wanted:
                found, wanted = repr(found), repr(wanted)
                detail = f" ({found} != {wanted})" if len(found) + len(wanted) < 160 else ""
                raise PldistillError(f"{folder}: cache was written with a different {key}{detail}; "
                                     "re-run `pldistill cache-teacher`")
        frames = []
        for part in parts(folder):
            rows = _read_table(part, ["id", "label", "split", "n_audio", "input_ids"]).to_pandas()
            for row in rows.itertuples():
                if list(row.input_ids) != prompt.prompt_ids(row.n_audio) + list(prompt.answer_ids(row.label)):
                    raise PldistillError(f"{part}: row {row.id}: input ids differ from the prompt; "
                                         "re-run `pldistill cache-teacher`")
            frames.append(rows.drop(columns="input_ids").assign(part=str(part), row=range(len(rows))))
        if not frames:
            raise PldistillError(f"{folder}: the teacher cache has no rows; re-run `pldistill cache-teacher`")
        self.index = pd.concat(frames, ignore_index=True)  # id, label, split, n_audio, part, row
        try:
            weights = load_file(str(folder / PROJECTOR_FILE))
        except Exception:  # missing or truncated: safetensors raises its own error types
            raise PldistillError(f"{folder / PROJECTOR_FILE}: missing or unreadable; re-run "
                                 "`pldistill cache-teacher`") from None
        self.projector_weight, self.projector_bias = weights["weight"], weights["bias"]

    def check_student_encoder(self, encoder: torch.nn.Module, stored: dict[str, torch.Tensor]) -> None:
        """The cached encoder output stands in for the student's own encoder only if that encoder holds the
        weights the cache was made from (`stored`, as read from the teacher's files, in the encoder's own
        dtype) and stays frozen; anything else is refused, saying why."""
        if any(p.requires_grad for p in encoder.parameters()):
            raise PldistillError(f"{self.folder}: the student's audio encoder is trainable, so the cached encoder "
                                 "output would go stale as it trains; keep the encoder frozen")
        found, cached = encoder_fingerprint(stored), self.meta.encoder.weights
        state = encoder.state_dict()
        same = state.keys() == stored.keys() and all(torch.equal(state[k], v.to(state[k])) for k, v in stored.items())
        if found != cached or not same:
            raise PldistillError(f"{self.folder}: the cached encoder output is not this student's encoder's "
                                 f"(weights {found}, cache {cached}); build the student on the cached teacher's encoder")

    @cached_property
    def store(self) -> EncoderStore:
        """The encoder store the cache reads X from, indexed once for every split."""
        folder = Path(self.meta.encoder.store)
        if not folder.exists():
            raise PldistillError(f"{folder}: the encoder store this cache reads is gone; re-run `pldistill cache-teacher`")
        return EncoderStore(folder, self.projector_weight.shape[1])

    def split(self, name: str | tuple[str, ...], columns: tuple[str, ...] = tuple(CACHE_SCHEMA.names)) -> "CachedTargets":
        """The rows of one split, or of several (e.g. train + validation for a refit)."""
        names = (name,) if isinstance(name, str) else name
        rows = self.index[self.index["split"].isin(names)].reset_index(drop=True)
        return CachedTargets(rows, columns, self.store, self.meta.cache.top_k)

    def table(self, columns: list[str]) -> pd.DataFrame:
        """Whole columns of every row (for summaries such as the report's)."""
        return pd.concat([_read_table(part, columns).to_pandas() for part in parts(self.folder)], ignore_index=True)


class CachedTargets(Dataset):
    """Rows of one split as tensors: encoded X [T, D_enc] (from the encoder store), attention w [T],
    input_ids [S], top-k ids and log-probs [S-1, k] (those among `columns`). Parquet parts are read
    with pyarrow, only the needed columns, one part at a time; each row is validated (shapes,
    finite values) as it is read."""

    def __init__(self, rows: pd.DataFrame, columns: tuple[str, ...], store: EncoderStore, top_k: int):
        self.rows, self.columns, self.store, self.k = rows, list(columns), store, top_k
        self._part: tuple[str, pd.DataFrame] | None = None
        self.constants: list[dict[str, torch.Tensor]] = []  # per row: values computed once from the rows
        self.labelled: np.ndarray | None = None  # per row: whether CE may read its label (None: every row)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, part: str) -> pd.DataFrame:
        if self._part is None or self._part[0] != part:
            self._part = (part, _read_table(part, self.columns).to_pandas())
        return self._part[1]

    def __getitem__(self, i: int) -> dict:
        where = self.rows.iloc[i]
        r = self._read(where["part"]).iloc[where["row"]]
        t, s = int(r["n_audio"]), len(r["input_ids"])
        item = {"index": i, "label": r["label"], "labelled": True if self.labelled is None else bool(self.labelled[i]), "input_ids": torch.from_numpy(np.array(r["input_ids"], dtype=np.int64)),
                "encoded": self.store.get(r["id"]), **(self.constants[i] if self.constants else {})}
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

    def subset(self, keep: np.ndarray) -> "CachedTargets":
        """The rows where `keep` is true."""
        out = CachedTargets(self.rows[keep].reset_index(drop=True), tuple(self.columns), self.store, self.k)
        out.labelled = None if self.labelled is None else self.labelled[keep]
        return out

    def batches(self, batch_size: int, seed: int | None = None, rows: list[int] | None = None) -> list[list[int]]:
        """Batches (of `rows`, default all) drawn within one Parquet part (parts hold clips of similar
        length, so little padding and one part read per batch); shuffled when a seed is given."""
        rng = np.random.default_rng(seed)
        batches = []
        chosen = self.rows if rows is None else self.rows.iloc[rows]
        for _, group in chosen.groupby("part", sort=True):
            idx = group.index.to_numpy()
            if seed is not None:
                idx = rng.permutation(idx)
            batches += [idx[j : j + batch_size].tolist() for j in range(0, len(idx), batch_size)]
        if seed is not None:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

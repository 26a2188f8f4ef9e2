"""The manifest: one row per utterance of a prepared dataset, with its folds.

Fold protocol: each utterance has the `fold` whose test split it belongs to, and the
`validation_fold` whose validation split it belongs to (never its own test fold). For fold k an
utterance is therefore in exactly one split: test if fold == k, validation if
validation_fold == k, train otherwise. With speaker-independent folds, validation speakers come
from the training side and never from the test fold.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PldistillError

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("speaker", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("fold", pa.int32(), nullable=False),
        pa.field("validation_fold", pa.int32(), nullable=False),
        pa.field("duration", pa.float32(), nullable=False),
        pa.field("audio_path", pa.string(), nullable=False),  # relative to the manifest's folder
        pa.field("source_path", pa.string(), nullable=False),
    ]
)
SPLITS = ("train", "validation", "test")


def validate_manifest(df: pd.DataFrame, where: str, labels: tuple[str, ...] | None = None) -> None:
    """Raise PldistillError naming `where` if the rows break the contract."""
    missing = [f.name for f in MANIFEST_SCHEMA if f.name not in df.columns]
    if missing:
        raise PldistillError(f"{where}: manifest lacks columns {missing}; re-run `pldistill preprocess`")
    if df.empty:
        raise PldistillError(f"{where}: manifest has no utterances")
    if df["id"].duplicated().any():
        raise PldistillError(f"{where}: duplicate utterance id {df.loc[df['id'].duplicated(), 'id'].iloc[0]!r}")
    if labels is not None and not set(df["label"]).issubset(labels):
        raise PldistillError(f"{where}: labels {sorted(set(df['label']) - set(labels))} are outside {list(labels)}")
    if (df["fold"] < 1).any() or (df["validation_fold"] == df["fold"]).any():
        raise PldistillError(f"{where}: folds must be >= 1 and validation_fold must differ from fold")
    if not (df["duration"] > 0).all():
        raise PldistillError(f"{where}: every duration must be positive")


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Validate, then write atomically (a killed run leaves the old manifest or none)."""
    validate_manifest(df, str(path))
    table = pa.Table.from_pandas(df[[f.name for f in MANIFEST_SCHEMA]], schema=MANIFEST_SCHEMA, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_manifest(path: Path, labels: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read and validate; `audio_path` comes back absolute."""
    if not path.exists():
        raise PldistillError(f"{path}: manifest not found; run `pldistill preprocess` for this dataset first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PldistillError(f"{path}: unreadable manifest ({exc}); re-run `pldistill preprocess`") from None
    df = table.to_pandas()
    validate_manifest(df, str(path), labels)
    df["audio_path"] = [str(path.parent / p) for p in df["audio_path"]]
    return df


def split_of(df: pd.DataFrame, fold: int) -> pd.Series:
    """'train' / 'validation' / 'test' for every row, for this fold."""
    if fold not in set(df["fold"]):
        raise PldistillError(f"fold {fold} does not exist; this dataset has folds {sorted(set(df['fold']))}")
    split = pd.Series("train", index=df.index)
    split[df["validation_fold"] == fold] = "validation"
    split[df["fold"] == fold] = "test"
    return split


def select_split(df: pd.DataFrame, fold: int, split: str) -> pd.DataFrame:
    return df[split_of(df, fold) == split].reset_index(drop=True)

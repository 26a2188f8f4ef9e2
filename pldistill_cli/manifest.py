"""The manifest: one row per utterance of a prepared dataset, with its folds.

Fold protocol: each utterance has the `fold` whose test split it belongs to, and the
`validation_fold` whose validation split it belongs to (never its own test fold). For fold k an
utterance is therefore in exactly one split: test if fold == k, validation if
validation_fold == k, train otherwise. With speaker-independent folds, validation speakers come
from the training side and never from the test fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PldistillError
from .files import atomic_path

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
        # False where validation rows were carved without speaker information (see the emobox adapter)
        pa.field("speaker_independent", pa.bool_(), nullable=False),
    ]
)
LABELS_KEY = b"pldistill.labels"  # the dataset's label words, in prompt order, in the Parquet metadata


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


def write_manifest(df: pd.DataFrame, path: Path, labels: tuple[str, ...]) -> None:
    """Validate, then write atomically (a killed run leaves the old manifest or none)."""
    validate_manifest(df, str(path), labels)
    schema = MANIFEST_SCHEMA.with_metadata({LABELS_KEY: json.dumps(list(labels)).encode()})
    table = pa.Table.from_pandas(df[[f.name for f in MANIFEST_SCHEMA]], schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read(path: Path, schema_only: bool = False, columns: list[str] | None = None) -> pa.Table | pa.Schema:
    if not path.exists():
        raise PldistillError(f"{path}: manifest not found; run `pldistill preprocess` for this dataset first")
    try:
        if columns:  # ParquetFile: without the dataset machinery read_table loads (a quarter second)
            return pq.ParquetFile(path).read(columns=columns)
        return pq.read_schema(path) if schema_only else pq.read_table(path)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise PldistillError(f"{path}: unreadable manifest ({exc}); re-run `pldistill preprocess`") from None


def manifest_labels(path: Path) -> tuple[str, ...]:
    """The dataset's label words in prompt order, as recorded by preprocess."""
    metadata = _read(path, schema_only=True).metadata or {}
    if LABELS_KEY not in metadata:
        raise PldistillError(f"{path}: manifest records no label set; re-run `pldistill preprocess`")
    return tuple(json.loads(metadata[LABELS_KEY]))


def read_manifest(path: Path) -> pd.DataFrame:
    """Read and validate against the label set it records; `audio_path` comes back absolute."""
    df = _read(path).to_pandas()
    validate_manifest(df, str(path), manifest_labels(path))
    df["audio_path"] = [str(path.parent / p) for p in df["audio_path"]]
    return df


def check_fold(path: Path, fold: int) -> None:
    """The fold exists in the manifest and has train, validation and test rows (read without pandas)."""
    table = _read(path, columns=["fold", "validation_fold"])
    folds, validation = table.column("fold").to_pylist(), table.column("validation_fold").to_pylist()
    if fold not in folds:
        raise PldistillError(f"fold {fold} does not exist; this dataset has folds {sorted(set(folds))}")
    if fold not in validation or all(fold in (f, v) for f, v in zip(folds, validation)):
        raise PldistillError(f"{path}: fold {fold} has an empty validation or training split; re-run "
                             "`pldistill preprocess` with more speakers or folds")


def manifest_folds(path: Path) -> list[int]:
    """The test folds the manifest has, sorted (read without pandas)."""
    return sorted(set(_read(path, columns=["fold"]).column("fold").to_pylist()))


def split_of(df: pd.DataFrame, fold: int) -> pd.Series:
    """'train' / 'validation' / 'test' for every row, for this fold."""
    if fold not in set(df["fold"]):
        raise PldistillError(f"fold {fold} does not exist; this dataset has folds {sorted(set(df['fold']))}")
    import pandas as pd

    split = pd.Series("train", index=df.index)
    split[df["validation_fold"] == fold] = "validation"
    split[df["fold"] == fold] = "test"
    return split


def select_split(df: pd.DataFrame, fold: int, split: str) -> pd.DataFrame:
    return df[split_of(df, fold) == split].reset_index(drop=True)

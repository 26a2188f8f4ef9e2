import pandas as pd
import pytest

from pldistill_cli.errors import PldistillError
from pldistill_cli.datasets import CORPORA
from pldistill_cli.manifest import (MANIFEST_SCHEMA, manifest_labels, read_manifest, select_split, split_of,
                                    write_manifest)


def test_prepared_manifest_matches_the_schema_and_files(prepared):
    params, layout = prepared
    df = read_manifest(layout.manifest("synthetic"))
    assert manifest_labels(layout.manifest("synthetic")) == CORPORA["synthetic"].labels
    assert df["speaker_independent"].all()
    assert list(df.columns) == [f.name for f in MANIFEST_SCHEMA]
    assert len(df) == 6 * 8 * 1  # speakers x emotions x sentences
    assert (df["dataset"] == "synthetic").all()
    assert set(df["label"]) == set(CORPORA["synthetic"].labels)
    for path, duration in zip(df["audio_path"], df["duration"]):
        import soundfile as sf

        info = sf.info(path)
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.duration - duration) < 1e-3


def test_every_utterance_in_exactly_one_split_and_speakers_never_cross(prepared):
    _, layout = prepared
    df = read_manifest(layout.manifest("synthetic"))
    for fold in sorted(df["fold"].unique()):
        split = split_of(df, fold)
        assert set(split) == {"train", "validation", "test"}
        speakers = {name: set(df.loc[split == name, "speaker"]) for name in ("train", "validation", "test")}
        assert not speakers["test"] & (speakers["train"] | speakers["validation"])
        assert not speakers["validation"] & speakers["train"]
        assert sum(len(select_split(df, fold, s)) for s in ("train", "validation", "test")) == len(df)


def _rows(**changes):
    row = dict(id="a", dataset="synthetic", speaker="s1", label="Happy", fold=1, validation_fold=2, duration=1.0,
               audio_path="audio/a.wav", source_path="/x/a.wav", speaker_independent=True)
    row.update(changes)
    return pd.DataFrame([row])


@pytest.mark.parametrize(
    "frame, message",
    [
        (_rows(validation_fold=1), "validation_fold must differ"),
        (pd.concat([_rows(), _rows()]), "duplicate utterance id"),
        (_rows(duration=0.0), "duration must be positive"),
        (_rows().drop(columns=["speaker"]), "lacks columns"),
    ],
)
def test_manifest_contract_is_enforced(tmp_path, frame, message):
    with pytest.raises(PldistillError, match=message):
        write_manifest(frame, tmp_path / "manifest.parquet", CORPORA["synthetic"].labels)


def test_labels_outside_the_recorded_set_are_refused(tmp_path):
    with pytest.raises(PldistillError, match="outside"):
        write_manifest(_rows(label="Bored"), tmp_path / "manifest.parquet", CORPORA["synthetic"].labels)
    path = tmp_path / "manifest.parquet"
    write_manifest(_rows(), path, ("Happy", "Sad"))
    assert manifest_labels(path) == ("Happy", "Sad")
    assert len(read_manifest(path)) == 1


def test_unknown_fold(tmp_path):
    with pytest.raises(PldistillError, match="fold 7 does not exist"):
        split_of(_rows(), 7)

"""Preprocessing real-world audio: formats, rates, channels, bad files, long clips, resumption."""

import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf

from pldistill_cli import datasets
from pldistill_cli.audio import normalize_loudness, trim_silence
from pldistill_cli.config import Params, PreprocessParams
from pldistill_cli.datasets import Collected, SourceItem
from pldistill_cli.layout import Layout
from pldistill_cli.manifest import read_manifest
from pldistill_cli.preprocess import preprocess

LABELS = ("Happy", "Sad")


def tone(seconds, rate, channels=1, amplitude=0.3):
    t = np.arange(int(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * np.pi * 220 * t)
    return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


class ListAdapter:
    """Serves whatever files the test put in `root` (name = <speaker>_<label>_<n>.<ext>)."""

    name = "listed"

    def collect(self, dataset, corpus, params, layout, advance):
        items = []
        for i, path in enumerate(sorted(p for p in (layout.data.parent / "src").iterdir())):
            speaker, label, _ = path.stem.split("_")
            fold = int(speaker[-1])
            items.append(SourceItem(path.stem, speaker, label, path, fold, 3 if fold == 1 else fold - 1))
            advance()
        return Collected(items, LABELS, {"not audio": 1})


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "adapters", lambda: {"listed": ListAdapter()})
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "s1_Happy_1.wav", tone(1.0, 48000, channels=2), 48000)
    sf.write(src / "s2_Sad_1.flac", tone(0.8, 22050), 22050)
    sf.write(src / "s3_Happy_1.wav", tone(0.5, 8000), 8000, subtype="FLOAT")
    sf.write(src / "s1_Sad_2.wav", tone(6.0, 16000), 16000)  # longer than the window below
    (src / "s2_Happy_2.wav").write_bytes(b"RIFF....not really a wav")
    sf.write(src / "s3_Sad_2.wav", np.zeros(0), 16000)
    sf.write(src / "s1_Happy_3.wav", np.zeros(16000), 16000)
    bad = tone(0.5, 16000)
    bad[100] = np.nan
    sf.write(src / "s2_Sad_3.wav", bad, 16000, subtype="FLOAT")
    params = Params(preprocess=PreprocessParams(workers=2, max_seconds=4.0))
    return params, Layout(data=tmp_path / "data")


def test_bad_files_are_quarantined_and_the_rest_conditioned(corpus):
    params, layout = corpus
    result = preprocess("listed", params, layout)
    assert result.n_utterances == 4
    reasons = {json_path.split("/")[-1]: r for json_path, r in ((q["path"], q["reason"]) for q in result.quarantine)}
    assert reasons["s2_Happy_2.wav"].startswith("unreadable")
    assert reasons["s3_Sad_2.wav"] == "empty"
    assert reasons["s1_Happy_3.wav"] == "silent"
    assert reasons["s2_Sad_3.wav"] == "non-finite samples"
    df = read_manifest(layout.manifest("listed")).set_index("id")
    for utt, seconds in {"s1_Happy_1": 1.0, "s2_Sad_1": 0.8, "s3_Happy_1": 0.5, "s1_Sad_2": 4.0}.items():
        info = sf.info(df.at[utt, "audio_path"])
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(info.duration - seconds) < 0.01 and abs(df.at[utt, "duration"] - seconds) < 0.01
    summary = json.loads((layout.prepared("listed") / "summary.json").read_text())
    assert summary["truncated_to_max_seconds"] == 1 and summary["left_out"] == {"not audio": 1}
    assert len(summary["quarantine"]) == 4


def test_long_clips_can_be_skipped_instead(corpus):
    params, layout = corpus
    params = dataclasses.replace(params, preprocess=dataclasses.replace(params.preprocess, long_clips="skip"))
    result = preprocess("listed", params, layout)
    assert "s1_Sad_2" not in set(read_manifest(layout.manifest("listed"))["id"])
    assert any("longer than 4 s" in q["reason"] for q in result.quarantine)


def test_rerun_does_not_touch_unchanged_sources_but_redoes_changed_ones(corpus):
    params, layout = corpus
    preprocess("listed", params, layout)
    audio = layout.prepared("listed") / "audio"
    before = {p.name: p.stat().st_mtime_ns for p in audio.iterdir()}
    manifest_before = layout.manifest("listed").read_bytes()
    preprocess("listed", params, layout)
    assert {p.name: p.stat().st_mtime_ns for p in audio.iterdir()} == before
    assert layout.manifest("listed").read_bytes() == manifest_before

    src = layout.data.parent / "src" / "s2_Sad_1.flac"
    sf.write(src, tone(0.6, 22050), 22050)
    preprocess("listed", params, layout)
    after = {p.name: p.stat().st_mtime_ns for p in audio.iterdir()}
    assert after["s2_Sad_1.wav"] != before["s2_Sad_1.wav"] and after["s1_Happy_1.wav"] == before["s1_Happy_1.wav"]
    # a settings change re-conditions everything
    params = dataclasses.replace(params, preprocess=dataclasses.replace(params.preprocess, normalize_loudness=True))
    preprocess("listed", params, layout)
    assert all(p.stat().st_mtime_ns != after[p.name] for p in audio.iterdir())


def test_trim_and_loudness():
    rate = 16000
    wave = np.concatenate([np.zeros(rate), tone(1.0, rate), np.zeros(rate // 2)]).astype(np.float32)
    trimmed = trim_silence(wave, rate, top_db=40)
    assert abs(len(trimmed) / rate - 1.0) < 0.03
    louder = normalize_loudness(tone(1.0, rate, amplitude=0.01).astype(np.float32), -20.0)
    assert abs(20 * np.log10(np.sqrt(np.mean(louder**2))) + 20.0) < 0.1
    capped = normalize_loudness(np.r_[np.full(10, 0.9), np.zeros(16000)].astype(np.float32), -10.0)
    assert np.abs(capped).max() <= 10 ** (-1 / 20) + 1e-6


def folder_corpus(root, labels=("Happy", "Sad"), speakers=("spkA", "spkB", "spkC"), clips=1):
    """The user's own data as the folder adapter reads it: one folder per label, files <speaker>_<n>.wav
    (real, distinct tones: the same audio twice would be kept once)."""
    for j, label in enumerate(labels):
        for k, speaker in enumerate(speakers):
            for n in range(clips):
                (root / label).mkdir(parents=True, exist_ok=True)
                t = np.arange(8000) / 16000
                sf.write(root / label / f"{speaker}_{n}.wav", 0.3 * np.sin(2 * np.pi * (200 + 40 * j + 7 * k + n) * t),
                         16000)
    return root


def own_data(tmp_path, **corpus):
    from pldistill_cli.config import CorpusParams

    params = Params(corpora={"mine": CorpusParams(adapter="folder", root=str(tmp_path / "src"), n_folds=3, **corpus)},
                    preprocess=PreprocessParams(workers=1))
    return params, Layout(data=tmp_path / "data")


def test_own_data_with_speakers_gives_no_warning(tmp_path, capsys):
    folder_corpus(tmp_path / "src")
    params, layout = own_data(tmp_path, speaker_pattern="^([^_]+)_")  # README's example
    preprocess("mine", params, layout)
    summary = json.loads((layout.prepared("mine") / "summary.json").read_text())
    assert "warnings" not in summary and "warning" not in capsys.readouterr().err
    assert read_manifest(layout.manifest("mine"))["speaker_independent"].all()


def test_own_data_without_speakers_warns_on_the_terminal_and_in_the_summary(tmp_path, capsys):
    """README, your own data: without --speaker-pattern (or a speaker column) every clip's speaker is
    unknown and the folds fall back to label-stratified splits: two warnings, each saying how to fix it."""
    folder_corpus(tmp_path / "src")
    params, layout = own_data(tmp_path)
    preprocess("mine", params, layout)
    unknown, mixed = json.loads((layout.prepared("mine") / "summary.json").read_text())["warnings"]
    assert unknown.startswith("6 of 6 clips have no known speaker; name the speakers with --speaker-pattern REGEX")
    assert mixed.startswith("the folds are not speaker-independent: 6 of 6 clips were split without speaker")
    assert all("`speaker` column" in w and "corpora.mine.speaker_pattern" in w for w in (unknown, mixed))
    err = capsys.readouterr().err
    assert f"\nwarning mine: {unknown}\n" in err and f"\nwarning mine: {mixed}\n" in err  # whole lines


def test_own_data_of_one_speaker_is_named(tmp_path, capsys):
    folder_corpus(tmp_path / "src", speakers=("spkA",), clips=3)
    params, layout = own_data(tmp_path, speaker_pattern=r"^(spk\w)_")
    preprocess("mine", params, layout)
    one, mixed = json.loads((layout.prepared("mine") / "summary.json").read_text())["warnings"]
    assert one.startswith("all 6 clips have one speaker (spkA): no split can keep a speaker out of training")
    assert mixed.startswith("the folds are not speaker-independent")


def test_fewer_than_two_labels_is_an_error_before_any_audio_is_read(tmp_path, monkeypatch):
    from pldistill_cli import preprocess as stage
    from pldistill_cli.errors import PldistillError

    folder_corpus(tmp_path / "src", labels=("Happy",), clips=2)
    params, layout = own_data(tmp_path, speaker_pattern=r"^(spk\w)_")
    monkeypatch.setattr(stage, "_condition_all", lambda *a, **k: pytest.fail("audio conditioned"))
    with pytest.raises(PldistillError, match=r"src: only one label \(Happy\); a classifier needs clips of at least 2"):
        preprocess("mine", params, layout)
    assert not layout.prepared("mine").exists()


def test_a_second_label_lost_to_bad_files_is_an_error_too(tmp_path):
    from pldistill_cli.errors import PldistillError

    folder_corpus(tmp_path / "src")
    for bad in (tmp_path / "src" / "Sad").iterdir():
        bad.write_bytes(b"RIFF....not really a wav: " + bad.name.encode())
    params, layout = own_data(tmp_path, speaker_pattern=r"^(spk\w)_")
    with pytest.raises(PldistillError, match=r"only one label \(Happy\) after 3 unusable files were skipped"):
        preprocess("mine", params, layout)
    assert not layout.prepared("mine").exists()

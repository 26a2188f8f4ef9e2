"""Dataset adapters for real corpora, on tiny fixture trees with the corpora's real names and layouts."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pldistill_cli.config import CorpusParams, Params, PreprocessParams
from pldistill_cli.datasets import Collected
from pldistill_cli.datasets.emobox import EmoboxAdapter
from pldistill_cli.datasets.folder import FolderAdapter
from pldistill_cli.datasets.iemocap import IemocapAdapter
from pldistill_cli.datasets.ravdess import RavdessAdapter
from pldistill_cli.datasets.savee import SaveeAdapter
from pldistill_cli.errors import PldistillError
from pldistill_cli.layout import Layout

# The protocols as PAPER.md / EmoBox state them, written out independently of the adapters.
RAVDESS_GROUPS = {1: (1, 11, 20, 21), 2: (4, 10, 12, 14), 3: (8, 9, 19, 23), 4: (3, 5, 7, 24),
                  5: (2, 15, 16, 18), 6: (6, 13, 17, 22)}
RAVDESS_EMOTIONS = ["Neutral", "Calm", "Happy", "Sad", "Angry", "Fear", "Disgust", "Surprise"]
SAVEE_FOLD = {"JE": 1, "KL": 2, "DC": 3, "JK": 4}
SAVEE_LABEL = {"a": "Angry", "d": "Disgust", "f": "Fear", "h": "Happy", "n": "Neutral", "sa": "Sad", "su": "Surprise"}


def tone(path: Path, rate: int, seconds: float = 0.3) -> Path:
    """A short tone whose pitch depends on the file name: every file's content differs, as in a corpus."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 200 + int.from_bytes(path.name.encode()[-12:], "little") % 997 / 3
    sf.write(path, 0.3 * np.sin(2 * np.pi * pitch * t), rate)
    return path


def collect(adapter, root=None, dataset=None, seed=42, **corpus) -> tuple[Collected, int]:
    calls = []
    collected = adapter().collect(dataset or adapter.name, CorpusParams(root=str(root) if root else None, **corpus),
                                  Params(seed=seed), Layout(), lambda: calls.append(1))
    return collected, len(calls)


def previous(fold: int, n: int) -> int:
    return n if fold == 1 else fold - 1


def check_splits(items, speaker_wise: bool = True) -> None:
    """Every utterance in exactly one split per fold; no test speaker in its fold's train or validation."""
    assert len({i.utt_id for i in items}) == len(items)
    assert all(i.validation_fold != i.fold and i.fold >= 1 for i in items)
    for k in sorted({i.fold for i in items}):
        test = {i.speaker for i in items if i.fold == k}
        train = {i.speaker for i in items if i.fold != k and i.validation_fold != k}
        valid = {i.speaker for i in items if i.validation_fold == k}
        if speaker_wise:
            assert not test & (train | valid), k
        assert all(i.speaker_independent == speaker_wise for i in items)


ADAPTERS = (RavdessAdapter, SaveeAdapter, IemocapAdapter, EmoboxAdapter, FolderAdapter)  # of real corpora


def test_adapters_are_registered():
    from pldistill_cli.datasets import adapters

    assert [a.name for a in ADAPTERS] == ["ravdess", "savee", "iemocap", "emobox", "folder"]
    assert list(adapters()) == ["synthetic", "ravdess", "savee", "iemocap", "emobox", "folder"]
    assert all(isinstance(adapters()[a.name], a) for a in ADAPTERS)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_missing_root_says_how_to_pass_one(adapter):
    with pytest.raises(PldistillError, match=r"--root.*corpora\.mine\.root"):
        collect(adapter, None, dataset="mine")


@pytest.mark.parametrize("adapter", [RavdessAdapter, SaveeAdapter, IemocapAdapter, FolderAdapter])
def test_a_root_without_recognisable_files_is_an_error(adapter, tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    if adapter is not FolderAdapter:  # for the folder adapter, any sub-folder with audio is a label
        tone(tmp_path / "Session9" / "random.wav", 16000)
    with pytest.raises(PldistillError, match=rf"^{tmp_path}: no (recognisable|Session1)"):
        collect(adapter, tmp_path)


# ------------------------------------------------------------------------------------------ RAVDESS


def ravdess_tree(root: Path, layout: str) -> dict[str, tuple[str, str, int]]:
    """Two speech clips per actor, plus song, video and badly named files; returns the expected rows."""
    folder = {"actors": lambda a: root / f"Actor_{a:02d}", "zip": lambda a: root / "Audio_Speech_Actors_01-24" / f"Actor_{a:02d}",
              "flat": lambda a: root}[layout]
    expected = {}
    for actor in range(1, 25):
        for i in range(2):
            emotion = (actor + i) % 8 + 1
            name = f"03-01-{emotion:02d}-01-0{i + 1}-01-{actor:02d}"
            tone(folder(actor) / f"{name}.wav", 48000, 0.3)
            expected[f"ravdess-{name}"] = (f"Actor_{actor:02d}", RAVDESS_EMOTIONS[emotion - 1],
                                          next(f for f, group in RAVDESS_GROUPS.items() if actor in group))
    for actor in (1, 2, 3):
        tone(folder(actor) / f"03-02-03-01-01-01-{actor:02d}.wav", 48000, 0.1)  # song
        (folder(actor) / f"01-01-03-01-01-01-{actor:02d}.mp4").write_bytes(b"video")  # full AV
    (folder(4) / "02-02-03-01-01-01-04.mp4").write_bytes(b"video")  # video-only song
    tone(folder(5) / "03-01-03-01.wav", 48000, 0.1)  # bad name
    tone(folder(5) / "._03-01-03-01-01-01-05.wav", 48000, 0.1)  # macOS resource fork: hidden, ignored
    (folder(5) / "README.txt").write_text("not audio")
    return expected


@pytest.mark.parametrize("layout", ["actors", "zip", "flat"])
def test_ravdess_rows_folds_and_left_out_files(tmp_path, layout):
    expected = ravdess_tree(tmp_path, layout)
    collected, advanced = collect(RavdessAdapter, tmp_path)
    assert collected.labels == ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear", "Calm")
    assert collected.excluded == {"song (vocal channel 02)": 3, "video (modality 01/02)": 4, "unrecognised name": 1}
    assert advanced == 48 + 3 + 4 + 1
    assert len(collected.items) == 48
    for item in collected.items:
        speaker, label, fold = expected[item.utt_id]
        assert (item.speaker, item.label, item.fold, item.validation_fold) == (speaker, label, fold, previous(fold, 6))
        assert item.source_path.name == item.utt_id.removeprefix("ravdess-") + ".wav" and item.source_path.is_file()
    assert Counter(i.fold for i in collected.items) == {k: 8 for k in range(1, 7)}
    check_splits(collected.items)


def test_ravdess_unknown_emotion_code_is_an_error(tmp_path):
    ravdess_tree(tmp_path, "flat")
    tone(tmp_path / "03-01-09-01-01-01-01.wav", 48000, 0.1)
    with pytest.raises(PldistillError, match="03-01-09-01-01-01-01.wav"):
        collect(RavdessAdapter, tmp_path)


def test_ravdess_with_only_songs_says_what_was_left_out(tmp_path):
    tone(tmp_path / "Actor_01" / "03-02-03-01-01-01-01.wav", 48000, 0.1)
    with pytest.raises(PldistillError, match=r"song \(vocal channel 02\) 1"):
        collect(RavdessAdapter, tmp_path)


# -------------------------------------------------------------------------------------------- SAVEE


SAVEE_CODES_USED = ["a", "d", "f", "h", "n", "sa", "su"]


@pytest.mark.parametrize("layout", ["AudioData", "speaker folders", "flat"])
def test_savee_rows_and_folds(tmp_path, layout):
    expected = {}
    for speaker in SAVEE_FOLD:
        for code in SAVEE_CODES_USED:
            for n in (1, 2) if code == "n" else (1,):
                path = {"AudioData": tmp_path / "AudioData" / speaker / f"{code}{n:02d}.wav",
                        "speaker folders": tmp_path / speaker / f"{code}{n:02d}.wav",
                        "flat": tmp_path / f"{speaker}_{code}{n:02d}.wav"}[layout]
                tone(path, 44100, 0.1)
                expected[f"savee-{speaker}-{code}{n:02d}"] = (speaker, SAVEE_LABEL[code], SAVEE_FOLD[speaker], path)
    tone(tmp_path / "AudioData" / "DC" / "x01.wav", 44100, 0.1)  # not a SAVEE code
    tone(tmp_path / "XY_a01.wav", 44100, 0.1)  # not a SAVEE speaker
    collected, advanced = collect(SaveeAdapter, tmp_path)
    assert collected.labels == ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear")
    assert collected.excluded == {"unrecognised name": 2} and advanced == 32 + 2
    assert {i.utt_id for i in collected.items} == set(expected)
    for item in collected.items:
        speaker, label, fold, path = expected[item.utt_id]
        assert (item.speaker, item.label, item.fold, item.source_path) == (speaker, label, fold, path)
        assert item.validation_fold == previous(fold, 4)
    assert {i.label for i in collected.items if i.utt_id.endswith(("-sa01", "-su01", "-a01"))} == {"Sad", "Surprise", "Angry"}
    check_splits(collected.items)


# ------------------------------------------------------------------------------------------ IEMOCAP


HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def iemocap_tree(root: Path) -> dict[str, tuple[str, str, int]]:
    """Sessions 1 and 2: two dialogs each, kept, merged and left-out labels, annotator lines,
    a label without audio and audio without a label."""
    codes = ["neu", "hap", "exc", "ang", "sad", "fru", "xxx"]
    keep = {"neu": "Neutral", "hap": "Happy", "exc": "Happy", "ang": "Angry", "sad": "Sad"}
    expected = {}
    for s in (1, 2):
        session = root / f"Session{s}"
        for dialog in (f"Ses0{s}F_impro01", f"Ses0{s}M_script01_1"):
            lines = [HEADER]
            for n, code in enumerate(codes):
                utt = f"{dialog}_{'FM'[n % 2]}{n:03d}"
                tone(session / "sentences" / "wav" / dialog / f"{utt}.wav", 16000, 0.1)
                lines.append(f"[{n}.1000 - {n}.9000]\t{utt}\t{code}\t[2.5000, 3.0000, 2.5000]\n"
                             f"C-E2:\tNeutral;\t()\nC-E3:\tFrustration;\t()\nA-E1:\tval 3; act 2; dom  3;\t()\n\n")
                if code in keep:
                    expected[f"iemocap-{utt}"] = (f"Ses0{s}{'FM'[n % 2]}", keep[code], s)
            lines.append(f"[9.0 - 9.5]\t{dialog}_F099\tneu\t[2.5000, 2.5000, 2.5000]\n")  # no audio file
            tone(session / "sentences" / "wav" / dialog / f"{dialog}_M098.wav", 16000, 0.1)  # no label
            evaluation = session / "dialog" / "EmoEvaluation"
            evaluation.mkdir(parents=True, exist_ok=True)
            (evaluation / f"{dialog}.txt").write_text("".join(lines))
            # the raw per-annotator files in sub-folders are not the label files
            (evaluation / "Categorical").mkdir(exist_ok=True)
            (evaluation / "Categorical" / f"{dialog}_e1_cat.txt").write_text(f"{dialog}_F000 :Neutral state; ()\n")
    return expected


def test_iemocap_rows_sessions_and_left_out_labels(tmp_path):
    expected = iemocap_tree(tmp_path)
    collected, advanced = collect(IemocapAdapter, tmp_path)
    assert collected.labels == ("Happy", "Sad", "Angry", "Neutral")
    assert collected.excluded == {"label fru (left out)": 4, "label xxx (left out)": 4, "no audio file": 4, "no label": 4}
    assert advanced == 4 + 4 * 8
    assert len(collected.items) == len(expected) == 20
    for item in collected.items:
        speaker, label, fold = expected[item.utt_id]
        assert (item.speaker, item.label, item.fold, item.validation_fold) == (speaker, label, fold, previous(fold, 5))
        assert item.source_path.stem == item.utt_id.removeprefix("iemocap-")
    # the utterance's own speaker (last part of its id), not the dialog's first speaker
    assert collected.items and {i.speaker for i in collected.items} == {"Ses01F", "Ses01M", "Ses02F", "Ses02M"}
    assert {i.speaker for i in collected.items if i.utt_id == "iemocap-Ses01F_impro01_M001"} == {"Ses01M"}
    check_splits(collected.items)


def test_iemocap_unknown_label_code_is_an_error(tmp_path):
    iemocap_tree(tmp_path)
    label_file = tmp_path / "Session2" / "dialog" / "EmoEvaluation" / "Ses02F_impro01.txt"
    label_file.write_text(label_file.read_text() + "[9.6 - 9.9]\tSes02F_impro01_F097\tzzz\t[2.5, 2.5, 2.5]\n")
    with pytest.raises(PldistillError, match=r"Ses02F_impro01_F097.*'zzz'"):
        collect(IemocapAdapter, tmp_path)


# ------------------------------------------------------------------------------------------- EmoBox


EMOBOX_MAP = {"hap": "Happy", "exc": "Happy", "sad": "Sad", "neu": "Neutral"}


def emobox_tree(tmp_path: Path, valid: dict[int, list[str]] | None = None) -> Path:
    """A 3-fold corpus `mycorp` in EmoBox format: 6 speakers (2 test speakers per fold), 4 clips each;
    the keys carry no speaker, the wav paths do. Returns the metadata folder."""
    meta = tmp_path / "meta"
    (meta / "label_map.json").parent.mkdir(parents=True)
    (meta / "label_map.json").write_text(json.dumps(EMOBOX_MAP, indent=4))
    for fold in (1, 2, 3):
        lines = []
        for speaker in (2 * fold - 1, 2 * fold):
            for n, emo in enumerate(EMOBOX_MAP):
                key = f"mycorp-{speaker}{n:03d}"
                wav = f"downloads/mycorp/audio/spk{speaker}/{speaker}{n:03d}.wav"
                tone(tmp_path / "dl" / wav, 16000, 0.1)
                lines.append(json.dumps({"key": key, "dataset": "mycorp", "wav": wav, "type": "raw", "sample_rate": 16000,
                                         "num_frame": 1600.0, "task": "category", "length": 0.1, "emo": emo, "channel": 1}))
        (meta / f"fold_{fold}").mkdir()
        (meta / f"fold_{fold}" / f"mycorp_test_fold_{fold}.jsonl").write_text("\n".join(lines) + "\n")
        (meta / f"fold_{fold}" / f"mycorp_train_fold_{fold}.jsonl").write_text("")  # not read
        if valid and fold in valid:
            rows = [json.dumps({"key": k, "dataset": "mycorp", "wav": "x", "emo": "neu"}) for k in valid[fold]]
            (meta / f"fold_{fold}" / f"mycorp_valid_fold_{fold}.jsonl").write_text("\n".join(rows) + "\n")
    return meta


@pytest.mark.parametrize("root", ["dl/downloads/mycorp", "dl", "dl/downloads"])
def test_emobox_rerooting_and_carved_stratified_validation(tmp_path, root):
    meta = emobox_tree(tmp_path)
    collected, advanced = collect(EmoboxAdapter, tmp_path / root, dataset="mycorp", metadata=str(meta))
    assert collected.labels == ("Happy", "Sad", "Neutral") and collected.excluded == {} and advanced == 24
    items = collected.items
    assert len(items) == 24 and all(i.source_path.is_file() and i.speaker == "unknown" for i in items)
    for i in items:
        speaker, n = int(i.utt_id[len("mycorp-")]), int(i.utt_id[-3:])
        assert i.fold == (speaker + 1) // 2 and i.label == EMOBOX_MAP[list(EMOBOX_MAP)[n]]
        assert i.source_path == tmp_path / "dl" / "downloads" / "mycorp" / "audio" / f"spk{speaker}" / f"{speaker}{n:03d}.wav"
    check_splits(items, speaker_wise=False)
    # each fold's validation set: half (+-1) of every other fold's clips of every label
    groups = Counter((i.fold, i.label) for i in items)
    for k in (1, 2, 3):
        for (fold, label), size in groups.items():
            if fold != k:
                got = sum(1 for i in items if i.validation_fold == k and i.fold == fold and i.label == label)
                assert abs(got - size / 2) <= 0.5, (k, fold, label)
    again, _ = collect(EmoboxAdapter, tmp_path / root, dataset="mycorp", metadata=str(meta))
    assert again.items == items  # deterministic for a seed


def test_emobox_speaker_pattern_gives_speaker_wise_validation(tmp_path):
    meta = emobox_tree(tmp_path)
    collected, _ = collect(EmoboxAdapter, tmp_path / "dl", dataset="mycorp", metadata=str(meta),
                           speaker_pattern=r"/(spk\d+)/")  # not in the key: found in the wav path
    items = collected.items
    assert {i.speaker for i in items} == {f"spk{s}" for s in range(1, 7)}
    assert all(i.validation_fold == previous(i.fold, 3) for i in items)
    check_splits(items, speaker_wise=True)
    # a pattern found in the key wins; speakers spanning folds fall back to the carve
    collected, _ = collect(EmoboxAdapter, tmp_path / "dl", dataset="mycorp", metadata=str(meta),
                           speaker_pattern=r"(\d{3})$")
    assert {i.speaker for i in collected.items} == {f"{n:03d}" for n in range(4)}
    assert not any(i.speaker_independent for i in collected.items)


def test_emobox_official_validation_files(tmp_path):
    meta = emobox_tree(tmp_path, valid={1: ["mycorp-3000", "mycorp-5001"], 2: ["mycorp-1002", "mycorp-5001"]})
    collected, _ = collect(EmoboxAdapter, tmp_path / "dl", dataset="mycorp", metadata=str(meta))
    by_id = {i.utt_id: i for i in collected.items}
    assert by_id["mycorp-3000"].validation_fold == 1 and by_id["mycorp-1002"].validation_fold == 2
    assert by_id["mycorp-5001"].validation_fold == 1  # listed twice: the first fold keeps it
    assert all(i.validation_fold != i.fold for i in collected.items)


def test_emobox_missing_audio_is_counted_or_an_error(tmp_path):
    meta = emobox_tree(tmp_path)
    (tmp_path / "dl" / "downloads" / "mycorp" / "audio" / "spk2" / "2001.wav").unlink()
    collected, _ = collect(EmoboxAdapter, tmp_path / "dl", dataset="mycorp", metadata=str(meta))
    assert len(collected.items) == 23 and collected.excluded == {}
    assert collected.missing == [str(tmp_path / "dl" / "downloads" / "mycorp" / "audio" / "spk2" / "2001.wav")]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(PldistillError, match=r"downloads/mycorp/audio/spk1/1000.wav.*downloads/<dataset>/"):
        collect(EmoboxAdapter, tmp_path / "elsewhere", dataset="mycorp", metadata=str(meta))


def test_emobox_emo_outside_the_label_map_is_an_error(tmp_path):
    meta = emobox_tree(tmp_path)
    test_file = meta / "fold_2" / "mycorp_test_fold_2.jsonl"
    test_file.write_text(test_file.read_text().replace('"emo": "sad"', '"emo": "fru"', 1))
    with pytest.raises(PldistillError, match=r"mycorp_test_fold_2.jsonl:\d+: emo 'fru'.*label_map.json"):
        collect(EmoboxAdapter, tmp_path / "dl", dataset="mycorp", metadata=str(meta))
    with pytest.raises(PldistillError, match="metadata"):
        collect(EmoboxAdapter, tmp_path / "dl", dataset="mycorp")


# ------------------------------------------------------------------------------------------- folder


def folder_tree(root: Path) -> list[Path]:
    """Label folders with 4 speakers (spkN_ prefix) x 3 clips, wav/flac/ogg, one nested sub-folder."""
    paths = []
    for label in ("Happy", "Sad", "Neutral"):
        for s in range(1, 5):
            for n in range(3):
                ext = ["wav", "flac", "ogg"][n]
                sub = "take2/" if n == 2 else ""
                paths.append(tone(root / label / f"{sub}spk{s}_{n}.{ext}", 16000, 0.1))
    (root / "notes.txt").write_text("outside the label folders")
    (root / "Sad" / "notes.txt").write_text("not audio")
    return paths


def test_folder_labels_without_speakers_get_stratified_folds(tmp_path):
    folder_tree(tmp_path)
    collected, advanced = collect(FolderAdapter, tmp_path, dataset="mine", n_folds=3)
    assert collected.labels == ("Happy", "Neutral", "Sad") and advanced == 38
    assert collected.excluded == {"file outside a label folder": 1, "not an audio file": 1}
    items = collected.items
    assert len(items) == 36 and all(i.speaker == "unknown" for i in items)
    assert all(i.label == i.source_path.relative_to(tmp_path).parts[0] for i in items)
    assert {i.utt_id for i in items} >= {"mine-Happy_spk1_0", "mine-Sad_take2_spk4_2"}
    for label in collected.labels:  # 12 clips per label: 4 per fold
        assert Counter(i.fold for i in items if i.label == label) == {1: 4, 2: 4, 3: 4}
    check_splits(items, speaker_wise=False)


def test_folder_speaker_pattern_gives_speaker_wise_folds(tmp_path):
    folder_tree(tmp_path)
    collected, _ = collect(FolderAdapter, tmp_path, dataset="mine", n_folds=3, speaker_pattern=r"^(spk\d)_")
    items = collected.items
    assert {i.speaker for i in items} == {"spk1", "spk2", "spk3", "spk4"}
    folds = defaultdict(set)
    for i in items:
        folds[i.speaker].add(i.fold)
    assert all(len(f) == 1 for f in folds.values()) and {f for s in folds.values() for f in s} == {1, 2, 3}
    assert all(i.validation_fold == previous(i.fold, 3) for i in items)
    check_splits(items, speaker_wise=True)
    again, _ = collect(FolderAdapter, tmp_path, dataset="mine", n_folds=3, speaker_pattern=r"^(spk\d)_")
    assert again.items == items


def test_folder_csv_with_speaker_and_fold_columns(tmp_path):
    paths = folder_tree(tmp_path / "audio")
    (tmp_path / "lists").mkdir()
    rows = ["path,label,speaker,fold"]
    for i, p in enumerate(paths):
        speaker = p.stem.split("_")[0]
        shown = {0: str(p), 1: str(p.relative_to(tmp_path / "audio")), 2: f"../audio/{p.relative_to(tmp_path / 'audio')}"}[i % 3]
        rows.append(f"{shown},{p.relative_to(tmp_path / 'audio').parts[0].lower()},{speaker},{int(speaker[-1]) % 3 + 1}")
    rows.append("missing/file.wav,happy,spk1,1")
    (tmp_path / "lists" / "data.csv").write_text("\n".join(rows) + "\n")
    collected, advanced = collect(FolderAdapter, tmp_path / "audio", dataset="mine", csv=str(tmp_path / "lists" / "data.csv"))
    assert collected.labels == ("happy", "neutral", "sad") and advanced == 37
    assert collected.excluded == {} and collected.missing == [str(tmp_path / "lists" / "missing/file.wav")]
    items = collected.items
    assert len(items) == 36 and all(i.fold == int(i.speaker[-1]) % 3 + 1 for i in items)
    assert all(i.validation_fold == previous(i.fold, 3) for i in items)
    check_splits(items, speaker_wise=True)


def test_folder_csv_without_speaker_or_fold_columns(tmp_path):
    paths = folder_tree(tmp_path)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.relative_to(tmp_path).parts[0]}" for p in paths]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    collected, _ = collect(FolderAdapter, tmp_path, dataset="mine", csv="data.csv", n_folds=4)  # csv found under root
    assert len(collected.items) == 36 and {i.fold for i in collected.items} == {1, 2, 3, 4}
    check_splits(collected.items, speaker_wise=False)
    # a speaker column without folds: speakers dealt into min(n_folds, speakers) folds
    rows = ["path,label,speaker"] + [f"{p.relative_to(tmp_path)},{p.parent.name if p.parent.name != 'take2' else p.parent.parent.name},"
                                     f"{p.stem.split('_')[0]}" for p in paths]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    collected, _ = collect(FolderAdapter, tmp_path, dataset="mine", csv=str(tmp_path / "data.csv"), n_folds=5)
    assert {i.fold for i in collected.items} == {1, 2, 3, 4}
    check_splits(collected.items, speaker_wise=True)


@pytest.mark.parametrize("bad", ["A, B", "Happy]", "[Sad", " Calm"])
def test_folder_unusable_label_is_an_error(tmp_path, bad):
    folder_tree(tmp_path / "folders")
    tone(tmp_path / "folders" / bad / "x.wav", 16000, 0.1)
    with pytest.raises(PldistillError, match="not usable as a label word"):
        collect(FolderAdapter, tmp_path / "folders", dataset="mine", n_folds=3)
    if bad.startswith(" "):
        return  # CSV cells are stripped
    csv = tmp_path / "data.csv"
    csv.write_text(f'path,label\nfolders/Happy/spk1_0.wav,"{bad}"\nfolders/Sad/spk1_0.wav,Sad\n')
    with pytest.raises(PldistillError, match=r"data.csv:2: label .* not usable"):
        collect(FolderAdapter, None, dataset="mine", csv=str(csv))


def test_folder_empty_label_and_empty_label_folder_are_errors(tmp_path):
    folder_tree(tmp_path / "folders")
    (tmp_path / "data.csv").write_text("path,label\nfolders/Happy/spk1_0.wav,\n")
    with pytest.raises(PldistillError, match=r"data.csv:2: label ''"):
        collect(FolderAdapter, None, dataset="mine", csv=str(tmp_path / "data.csv"))
    (tmp_path / "folders" / "Angry").mkdir()
    with pytest.raises(PldistillError, match=r"Angry: label folder holds no audio"):
        collect(FolderAdapter, tmp_path / "folders", dataset="mine", n_folds=3)


# ------------------------------------------------------------------------------------- end to end


def test_preprocess_ravdess_end_to_end(tmp_path):
    from pldistill_cli.manifest import read_manifest
    from pldistill_cli.preprocess import preprocess

    expected = ravdess_tree(tmp_path / "corpus", "zip")
    layout = Layout(data=tmp_path / "data")
    result = preprocess("ravdess", Params(preprocess=PreprocessParams(workers=1)), layout, tmp_path / "corpus")
    assert result.n_utterances == 48 and not result.quarantine
    assert sum(result.label_counts.values()) == 48
    df = read_manifest(result.manifest)
    assert set(df["id"]) == set(expected)
    for row in df.itertuples():
        speaker, label, fold = expected[row.id]
        assert (row.speaker, row.label, row.fold, row.validation_fold) == (speaker, label, fold, previous(fold, 6))
    assert df["speaker_independent"].all()


def test_a_protocols_twin_files_are_both_kept_and_named(tmp_path):
    """Two files of identical audio, the same actor and emotion (RAVDESS has such a pair): both kept, in the same
    fold, and named under the summary's warnings; the same audio from another actor is an error."""
    import json
    import shutil

    from pldistill_cli.errors import PldistillError
    from pldistill_cli.manifest import read_manifest
    from pldistill_cli.preprocess import preprocess

    expected = ravdess_tree(tmp_path / "corpus", "actors")
    actor = tmp_path / "corpus/Actor_01"
    original, twin = actor / "03-01-02-01-01-01-01.wav", actor / "03-01-02-02-01-01-01.wav"  # emotion 02, intensity 2
    shutil.copy(original, twin)
    layout = Layout(data=tmp_path / "data")
    result = preprocess("ravdess", Params(preprocess=PreprocessParams(workers=1)), layout, tmp_path / "corpus")
    assert result.n_utterances == len(expected) + 1 and not any("duplicate" in r for r in result.excluded)
    df = read_manifest(result.manifest).set_index("id")
    assert df.loc[f"ravdess-{twin.stem}", "fold"] == df.loc[f"ravdess-{original.stem}", "fold"]
    summary = json.loads((layout.prepared("ravdess") / "summary.json").read_text())
    assert [w for w in summary["warnings"] if twin.name in w and original.name in w and "both kept" in w]
    shutil.copy(original, tmp_path / "corpus/Actor_02/03-01-02-01-01-01-02.wav")  # another speaker
    with pytest.raises(PldistillError, match="different labels or speakers"):
        preprocess("ravdess", Params(preprocess=PreprocessParams(workers=1)), layout, tmp_path / "corpus")

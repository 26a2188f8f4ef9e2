"""predict and export as a user meets them: folders and patterns as input, the answering model named, whole
file names, and an exported folder that names its teacher by its source and has the user's file modes.
(The pipeline tests score a trained student and run the exported card's snippet: test_pipeline.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pldistill_cli.datasets import CORPORA
from pldistill_cli.models import ExportMeta, StudentMeta, TeacherMeta
from pldistill_cli.inputs import expand_inputs, unusable_input
from pldistill_cli.predict import describe_model

LONG_NAME = "03-01-01-01-01-01-01-a-file-name-longer-than-the-eighty-columns-of-a-terminal-window.wav"


KINDS = {"train-teacher": TeacherMeta, "distill": StudentMeta, "export": ExportMeta}


def _meta(stage: str = "distill", **changes):
    """A model's metadata of the kind `stage` writes: a pl-distill student unless changed."""
    common = dict(dataset="synthetic", fold=1, labels=CORPORA["synthetic"].labels, prompt="prompt", preset="tiny", seed=42,
                  params={"preprocess": {"min_seconds": 0.2}}, versions={})
    own = {} if stage == "train-teacher" else dict(
        method="pl-distill", cache={},
        teacher={"path": "data/runs/synthetic/fold1/teacher", "weights": "f00d", "checkpoint": None})
    return KINDS[stage](**{**common, **own, **changes})


@pytest.fixture(scope="module")
def student(tiny_teacher, tmp_path_factory) -> Path:
    """An (untrained) tiny student saved as distill saves one: its answers are not the point here."""
    from pldistill_cli.models import save_model
    from pldistill_cli.prompt import PromptLayout

    model, processor = tiny_teacher
    folder = tmp_path_factory.mktemp("predict") / "student-pl-distill-s42"
    prompt = PromptLayout.from_processor(processor, CORPORA["synthetic"].labels)
    save_model(model, processor, folder, _meta(prompt=prompt.text))
    return folder


def _tone(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)), rate)


def test_folders_and_patterns_stand_for_their_audio_files_sorted(tmp_path):
    for name in ("clips/b.wav", "clips/a.flac", "clips/sub/c.WAV", "clips/.hidden/d.wav", "clips/._e.wav"):
        _tone(tmp_path / name, 0.1)
    (tmp_path / "clips/notes.txt").write_text("not audio")
    (tmp_path / "empty").mkdir()
    clips = tmp_path / "clips"
    given = [clips, tmp_path / "missing.wav", clips / "*.flac", tmp_path / "**/*.wav", tmp_path / "empty",
             tmp_path / "nothing*.wav", clips / "b.wav"]
    assert expand_inputs(given) == [
        clips / "a.flac", clips / "b.wav", clips / "sub/c.WAV",  # the folder: recursively, sorted, audio only
        tmp_path / "missing.wav",  # kept as given: read_audio names it
        clips / "a.flac",  # the pattern's matches
        clips / "b.wav",  # `**` is recursive; a pattern is case-sensitive and skips hidden files
        tmp_path / "empty", tmp_path / "nothing*.wav",  # nothing in them: kept, for unusable_input to name
        clips / "b.wav"]
    assert "a folder with no audio files" in unusable_input(tmp_path / "empty")
    assert "no audio file matches this pattern" in unusable_input(tmp_path / "nothing*.wav")
    assert unusable_input(clips / "b.wav") is None and unusable_input(tmp_path / "missing.wav") is None


def test_the_answering_model_is_named_with_what_it_learnt_from():
    assert describe_model(_meta()) == ("student pl-distill seed 42 of synthetic fold 1 "
                                       "(trained on the synthetic espeak-ng corpus: not real speech)")
    assert describe_model(_meta(stage="export", dataset="ravdess", fold=3, method="ce", seed=7)).startswith(
        "exported student ce seed 7 of ravdess fold 3 (trained on RAVDESS")
    assert describe_model(_meta(stage="train-teacher", mode="full", dataset="mine")) == (
        "teacher (full, tiny preset) of mine fold 1 (trained on your corpus `mine`)")
    hub = _meta(stage="train-teacher", mode="zero-shot", preset="hub",
                checkpoint={"source": "Qwen/Qwen2-Audio-7B-Instruct", "revision": "0a1b2c"})
    assert describe_model(hub) == ("teacher (zero-shot, Qwen/Qwen2-Audio-7B-Instruct at 0a1b2c) asked with the "
                                   "labels of synthetic fold 1; not fine-tuned")


def _predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "pldistill_cli", "predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_predict_on_a_folder_names_the_model_and_every_whole_file_name(student, tmp_path):
    for name in (LONG_NAME, "Actor_02/b.flac", "Actor_01/c.wav"):
        _tone(tmp_path / "clips" / name, 1.5)
    _tone(tmp_path / "clips/long.ogg", 10)  # three 4 s windows of the tiny preset
    (tmp_path / "clips/notes.txt").write_text("not audio")
    result = _predict("--model", str(student), "clips", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == (f"model: {student}: student pl-distill seed 42 of synthetic fold 1 "
                                             "(trained on the synthetic espeak-ng corpus: not real speech)")
    lines = result.stdout.splitlines()  # one plain line per file, whole paths, sorted, on any terminal width
    files = ["clips/" + n for n in (LONG_NAME, "Actor_01/c.wav", "Actor_02/b.flac", "long.ogg")]
    assert [line.split()[0] for line in lines] == sorted(files) and "…" not in result.stdout + result.stderr
    answers = json.loads(_predict("--model", str(student), "--json", "clips", cwd=tmp_path).stdout)
    assert [a["path"] for a in answers] == sorted(files)
    for line, answer in zip(lines, answers):
        ranked = sorted(answer["probabilities"].items(), key=lambda kv: -kv[1])
        assert line.split()[1:3] == [answer["label"], f"{ranked[0][1]:.2f}"] == [ranked[0][0], f"{ranked[0][1]:.2f}"]
        assert line.endswith(f"; {answer['windows']} window{'s' if answer['windows'] > 1 else ''})")
    assert answers[-1]["windows"] == 3

    (tmp_path / "empty").mkdir()
    result = _predict("--model", str(student), "empty", "clips/*.mp3", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert errors == ["error: empty: a folder with no audio files in it; pass audio files, or a folder that holds "
                      "some (.wav, .flac, .mp3, ...)",
                      "error: clips/*.mp3: no audio file matches this pattern; check it, or pass the files or their "
                      "folder"]


def test_an_export_names_its_teacher_by_source_and_has_the_users_file_modes(student, tmp_path):
    from pldistill_cli.export import export_student, model_card

    umask = os.umask(0o027)  # a user's umask: group may read, others nothing
    try:
        out = export_student(student, tmp_path / "exported")
    finally:
        os.umask(umask)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o640"}, modes
    card = (out / "README.md").read_text()
    assert "- **Teacher**: tiny preset, trained by pldistill on synthetic fold 1 (weights " in card
    assert "data/runs" not in card and "data/runs" in (out / "pldistill.json").read_text()  # provenance stays
    hub = {"path": "/home/me/run/data/runs/ravdess/fold2/teacher", "weights": "f00d",
           "checkpoint": {"source": "Qwen/Qwen2-Audio-7B-Instruct", "revision": "0a1b2c"}}
    card = model_card(_meta(stage="export", teacher=hub, dataset="ravdess", fold=2), 1000)
    assert ("- **Teacher**: `Qwen/Qwen2-Audio-7B-Instruct` at revision `0a1b2c`, the teacher pldistill used on "
            "ravdess fold 2 (weights f00d)") in card and "/home/me" not in card

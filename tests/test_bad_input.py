"""Nothing lost, nothing silent: every bad input and bad setting a user can give ends in one `error:` line
naming the file or setting (exit 1; usage errors exit 2), never a traceback, never garbage with exit 0,
and never a change to what earlier runs wrote."""

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from typer.testing import CliRunner

from pldistill_cli.cli import app

SMALL = {
    "seed": 7,
    "seeds": [7],
    "methods": ["ce"],
    "corpora": {"synthetic": {"adapter": "synthetic", "n_speakers": 6, "n_sentences": 1, "n_folds": 3}},
    "pretrain_encoder": {"clips": 0},
    "pretrain_teacher": {"voices": 0},
    "train_teacher": {"epochs": 1, "batch_size": 8},
    "cache": {"top_k": 4, "batch_size": 8},
    "distill": {"epochs": 1, "batch_size": 8},
}
OUTPUTS = ("data/prepared", "data/runs", "metrics", "export", "params.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small pipeline run: prepared data, teacher, cache, `ce` student, metrics and an export."""
    root = tmp_path_factory.mktemp("bad")
    (root / "params.yaml").write_text(yaml.safe_dump(SMALL))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in (["pretrain-encoder"], ["pretrain-teacher"], ["preprocess"], ["train-teacher"], ["cache-teacher"], ["distill", "--method", "ce"],
                      ["evaluate", "--model", "student", "--method", "ce"], ["export", "--out", "export/ce", "--method", "ce"]):
            result = CliRunner().invoke(app, stage, catch_exceptions=False)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root


def snapshot(root: Path, outputs: tuple[str, ...] = OUTPUTS) -> dict[str, str]:
    """The hash of every file under the outputs (folders or files, relative to root)."""
    files = {}
    for name in outputs:
        path = root / name
        for f in ([path] if path.is_file() else sorted(path.rglob("*")) if path.exists() else []):
            if f.is_file():
                files[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def cli(root: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pldistill_cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300, **popen)


def one_error(result: subprocess.CompletedProcess, code: int, *fragments: str, alone: bool = True) -> str:
    """One `error:` line naming the problem, no traceback; `alone`: nothing else was printed (the error
    came before any work started)."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert lines == errors or not alone, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def fails_cleanly(run: Path, args: list[str], code: int, *fragments: str, params: dict | None = None,
                  alone: bool = True) -> str:
    """The command fails with one error line, and every earlier output is byte-identical afterwards."""
    before = snapshot(run)
    if params is not None:
        (run / "bad.yaml").write_text(yaml.safe_dump(params))
        args = [*args, "--params", "bad.yaml"]
    line = one_error(cli(run, *args), code, *fragments, alone=alone)
    assert snapshot(run) == before
    return line


def with_setting(key: str, value) -> dict:
    params = json.loads(json.dumps(SMALL))
    *path, last = key.split(".")
    node = params
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return params


@pytest.mark.parametrize("command, key, value, allowed", [
    (["distill", "--method", "ce"], "distill.epochs", 0, "greater than or equal to 1"),
    (["train-teacher"], "train_teacher.epochs", -3, "greater than or equal to 1"),
    (["distill", "--method", "ce"], "distill.weights.pl-distill.lambda_p", float("nan"), "greater than or equal to 0"),
    (["cache-teacher"], "cache.temperature", 0, "greater than 0"),
    (["cache-teacher"], "cache.top_k", 0, "greater than or equal to 1"),
    (["train-teacher"], "train_teacher.lr", -0.01, "greater than 0"),
    (["distill"], "distill.grad_accum", 0, "greater than or equal to 1"),
    (["distill"], "distill.batch_size", 0, "greater than or equal to 1"),
    (["preprocess"], "preprocess.sample_rate", -16000, "greater than or equal to 8000"),
    (["preprocess"], "preprocess.max_seconds", 0, "greater than 0"),
    (["preprocess"], "corpora.synthetic.n_speakers", 0, "greater than or equal to 3"),
    (["report"], "methods", ["ce", "nope"], "'ce', 'kd'"),
    (["report"], "datasets", ["../../x"], "not a safe name"),
    (["distill"], "distill.weights.kd.lambda_l", "lots", "valid number"),
    (["evaluate"], "evaluate.scoring", "vote", "'rank' or 'generate'"),
])
def test_out_of_range_settings_are_refused_before_anything_runs(run, command, key, value, allowed):
    fails_cleanly(run, command, 1, f"`{key}[" if isinstance(value, list) else f"`{key}` = {value!r}", allowed,
                  params=with_setting(key, value))


@pytest.mark.parametrize("args, fragments", [
    (["distill", "--params", "."], (".: is a folder, not a params file",)),
    (["distill", "--params", "nope.yaml"], ("nope.yaml: params file not found",)),
    (["preprocess", "--dataset", "../../x"], ("--dataset `../../x` is not a safe name",)),
    (["preprocess", "--dataset", "nope"], ("unknown dataset `nope`",)),
    (["preprocess", "--root", "params.yaml"], ("params.yaml: is a file, not a folder",)),
    (["preprocess", "--dataset", "mine", "--adapter", "folder", "--root", "params.yaml"], ("is a file, not a folder",)),
    (["train-teacher", "--fold", "9"], ("fold 9 does not exist",)),
    (["distill", "--fold", "2"], ("data/runs/synthetic/fold2/teacher: not found",
                                  "run `pldistill train-teacher --dataset synthetic --fold 2`")),
    (["evaluate", "--model", "student", "--method", "kd"], ("student-kd-s7: not found",
                                                             "run `pldistill distill --dataset synthetic --fold 1 --method kd --seed 7`")),
    (["export", "--out", "."], (".: exists and is not an earlier pldistill export",)),
    (["export", "--out", "data"], ("data: exists and is not an earlier pldistill export",)),
    (["predict", "--model", "data", "x.wav"], ("data: no model here",)),
])
def test_bad_paths_and_names_are_one_line_errors(run, args, fragments):
    fails_cleanly(run, args, 1, *fragments)


@pytest.mark.parametrize("args, fragment", [
    (["train-teacher", "--fold", "abc"], "'--fold'"),
    (["train-teacher", "--fold", "0"], "'--fold'"),
    (["cache-teacher", "--device", "gpu"], "'--device'"),
    (["distill", "--method", "nope"], "'--method'"),
    (["evaluate", "--model", "everything"], "'--model'"),
    (["preprocess", "--adapter", "zip"], "'--adapter'"),
    (["distill", "--no-such-option"], "--no-such-option"),
])
def test_usage_errors_exit_2_with_one_line(run, args, fragment):
    fails_cleanly(run, args, 2, fragment)


def test_help_lists_the_closed_choices(run):
    shown = cli(run, "evaluate", "--help").stdout
    assert "teacher|student|references" in shown.replace(" ", "") and "pl-distill" in shown


def test_a_failed_preprocess_leaves_the_prepared_data_as_it_was(run):
    fails_cleanly(run, ["preprocess"], 1, "every file was unusable", "shorter than min_seconds",
                  params=with_setting("preprocess.min_seconds", 100.0), alone=False)


def test_a_non_finite_loss_stops_training_and_saves_nothing(run):
    fails_cleanly(run, ["distill", "--method", "kd"], 1, "non-finite loss", "nothing was saved",
                  params=with_setting("distill.lr", 1e30), alone=False)
    assert not (run / "data/runs/synthetic/fold1/student-kd-s7").exists()


def test_corrupt_outputs_are_named_not_tracebacks(run):
    part = sorted((run / "data/runs/synthetic/fold1/cache").glob("part-*.parquet"))[0]
    weights = run / "data/runs/synthetic/fold1/teacher/model.safetensors"
    for path, command, fragment in ((part, ["distill", "--method", "kd"], "unreadable Parquet part"),
                                    (weights, ["evaluate", "--model", "teacher"], "unreadable model files")):
        original = path.read_bytes()
        try:
            path.write_bytes(original[: len(original) // 2])
            fails_cleanly(run, command, 1, str(path.relative_to(run).parent), fragment, alone=False)
        finally:
            path.write_bytes(original)


class Planted:
    """A pickle that runs code when loaded with weights_only=False."""

    def __reduce__(self):
        return (os.system, ("touch planted-code-ran",))


def test_a_planted_resume_state_is_never_executed(run):
    work = run / "data/work/synthetic/fold1/student-ce-s11"
    work.mkdir(parents=True)
    (work / "state.pt").write_bytes(pickle.dumps({"epoch": 0, "model": Planted()}))
    (work / "state.json").write_text(json.dumps({"fingerprint": "x", "epoch": 0}))
    result = cli(run, "distill", "--method", "ce", "--seed", "11")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (run / "planted-code-ran").exists()
    said = [l for l in result.stderr.splitlines() if "discarded" in l or "Warning" in l]
    assert said == ["warning: discarded an unreadable state in data/work/synthetic/fold1/student-ce-s11; starting "
                    "afresh"], said


def test_a_second_run_of_a_stage_stops_instead_of_racing(run):
    from filelock import FileLock

    lock = FileLock(str(run / "data/work/synthetic/preprocess") + ".lock")
    with lock:
        fails_cleanly(run, ["preprocess"], 1, "another `pldistill preprocess` for these outputs is running")


def test_ctrl_c_says_what_was_kept_and_how_to_resume(run):
    params = with_setting("distill.epochs", 100_000)  # runs until interrupted
    (run / "long.yaml").write_text(yaml.safe_dump(params))
    process = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "pldistill_cli", "distill", "--method", "ce",
                                "--seed", "12", "--params", "long.yaml"], cwd=run, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = run / "data/work/synthetic/fold1/student-ce-s12/state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:  # an epoch done: there is progress to keep
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say where it hangs: on SIGABRT faulthandler prints every thread's stack
        process.send_signal(signal.SIGABRT)
        dump = re.sub(r"\nExtension modules:.*", "", process.communicate(timeout=30)[1])  # the stacks, not the modules
        pytest.fail(f"Ctrl-C did not stop distill within 60 s; its threads:\n{dump[-6000:]}")
    finally:
        process.kill()  # never left training 100,000 epochs in the background (a no-op once it has exited)
    lines = [l for l in stderr.splitlines() if l.strip().startswith("interrupted")]
    assert process.returncode == 130 and "Traceback" not in stderr
    assert lines == ["interrupted: progress kept in data/work/synthetic/fold1/student-ce-s12; re-run the same "
                     "command to resume"]


def test_killing_preprocess_leaves_no_worker_running(run):
    params = with_setting("preprocess.trim_db", 41.0)  # a changed setting: every clip is conditioned again
    params["preprocess"]["workers"] = 2
    (run / "kill.yaml").write_text(yaml.safe_dump(params))
    process = subprocess.Popen([sys.executable, "-m", "pldistill_cli", "preprocess", "--params", "kill.yaml"],
                               cwd=run, stderr=subprocess.DEVNULL)
    children, deadline = set(), time.time() + 60
    while not children and time.time() < deadline:
        time.sleep(0.05)
        for task in Path(f"/proc/{process.pid}/task").glob("*/children"):
            children |= {int(p) for p in task.read_text().split()}
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2)
    assert children and not any(Path(f"/proc/{pid}").exists() and "zombie" not in
                                Path(f"/proc/{pid}/status").read_text().lower() for pid in children)


# ----------------------------------------------------------------------------- folder and CSV corpora


def tone(path: Path, seconds: float, pitch: float) -> Path:
    t = np.arange(int(seconds * 16000)) / 16000
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.3 * np.sin(2 * np.pi * pitch * t), 16000)
    return path


@pytest.fixture
def csv_corpus(tmp_path):
    """Nine speakers (three folds) of two labels, listed in a CSV, plus whatever a test appends."""
    audio = tmp_path / "audio"
    rows = ["path,label,speaker"]
    for s in range(9):
        for j, label in enumerate(("happy", "sad")):
            rows.append(f"{tone(audio / f's{s}_{label}.wav', 0.5, 150 + 10 * s + 300 * j).name},{label},spk{s}")
    params = {"corpora": {"mine": {"adapter": "folder", "csv": str(audio / "clips.csv"), "n_folds": 3}},
              "preprocess": {"workers": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path, audio, rows


def write_csv(audio: Path, rows: list[str]) -> None:
    (audio / "clips.csv").write_text("\n".join(rows) + "\n")


def test_a_clip_listed_twice_is_kept_once_or_refused_when_labels_differ(csv_corpus):
    root, audio, rows = csv_corpus
    # the same file by another path, twice, and a row repeated exactly
    write_csv(audio, rows + [f"{audio}/s0_happy.wav,happy,spk0", "../audio/s1_sad.wav,sad,spk1", rows[4]])
    assert cli(root, "preprocess", "--dataset", "mine").returncode == 0
    summary = json.loads((root / "data/prepared/mine/summary.json").read_text())
    assert summary["utterances"] == 18 and summary["left_out"] == {"duplicate (file)": 3}
    before = snapshot(root)
    write_csv(audio, rows + [rows[4].replace(",sad,", ",happy,")])  # the same row, another label
    one_error(cli(root, "preprocess", "--dataset", "mine"), 1, f"clips.csv:{len(rows) + 1}: {rows[4].split(',')[0]} "
              "is listed at line 5 with label 'sad' and here with label 'happy'")
    assert snapshot(root) == before
    shutil.copy(audio / "s2_sad.wav", audio / "copy.wav")  # the same audio under another name and label
    write_csv(audio, rows + ["copy.wav,happy,spk2"])
    one_error(cli(root, "preprocess", "--dataset", "mine"), 1, "copy.wav (happy", "s2_sad.wav (sad",
              "same audio content with different labels", alone=False)
    assert snapshot(root) == before


def test_missing_and_too_short_clips_are_listed_and_predict_refuses_short_ones(csv_corpus, run):
    root, audio, rows = csv_corpus
    sf.write(audio / "blip.wav", 0.3 * np.ones(8), 16000)  # 8 samples: no audio step at all
    write_csv(audio, rows + ["gone.wav,happy,spk3", "blip.wav,sad,spk3"])
    assert cli(root, "preprocess", "--dataset", "mine").returncode == 0
    summary = json.loads((root / "data/prepared/mine/summary.json").read_text())
    assert summary["missing"] == [str(audio / "gone.wav")]
    assert [q["path"] for q in summary["quarantine"]] == [str(audio / "blip.wav")]
    assert "shorter than min_seconds" in summary["quarantine"][0]["reason"]
    student = run / "data/runs/synthetic/fold1/student-ce-s7"
    one_error(cli(run, "predict", "--model", str(student), str(audio / "blip.wav")), 1, "blip.wav",
              "shorter than 0.2 s", alone=False)


def test_an_empty_csv_is_one_line(csv_corpus):
    root, audio, _ = csv_corpus
    (audio / "clips.csv").write_text("")
    one_error(cli(root, "preprocess", "--dataset", "mine"), 1, "clips.csv: empty CSV", alone=False)

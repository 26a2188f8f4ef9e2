"""One end-to-end CLI run on a few real synthetic clips, then the contracts of what it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pldistill_cli.cli import app
from pldistill_cli.errors import PldistillError
from pldistill_cli.teacher_cache import CACHE_SCHEMA

SMALL = {
    "seed": 7,
    "synthetic": {"n_speakers": 6, "n_sentences": 1, "n_folds": 3},
    "train_teacher": {"epochs": 2, "batch_size": 8},
    "cache": {"top_k": 4, "batch_size": 8},
    "distill": {"epochs": 2, "batch_size": 8},
}
STAGES = [
    ["preprocess"],
    ["train-teacher"],
    ["cache-teacher"],
    ["distill"],
    ["evaluate", "--model", "teacher"],
    ["evaluate", "--model", "student"],
    ["evaluate", "--model", "references"],
    ["report"],
]


def cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    (root / "params.yaml").write_text(yaml.safe_dump(SMALL))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in STAGES:
            cli(*stage)
        yield root
    finally:
        os.chdir(cwd)


def test_metrics_files_have_the_expected_keys_and_ranges(run_dir):
    for model in ("teacher", "student"):
        m = json.loads((run_dir / "metrics/synthetic/fold1" / f"{model}.json").read_text())
        assert {"wa", "ua", "macro_f1", "n", "parameters", "model_weights", "params"} <= set(m)
        assert m["n"] == 16  # two test speakers x 8 emotions x 1 sentence
        for key in ("wa", "ua", "macro_f1"):
            assert 0.0 <= m[key] <= 1.0
    refs = json.loads((run_dir / "metrics/synthetic/fold1/references.json").read_text())
    assert 0.0 <= refs["duration"]["ua"] <= 1.0 and 0.0 <= refs["prosody"]["ua"] <= 1.0
    report = (run_dir / "report/report.md").read_text()
    assert "| teacher |" in report and "| student (PL-Distill) |" in report and "reference:" in report
    assert (run_dir / "report/synthetic-fold1-confusion.png").stat().st_size > 10_000


def test_cache_rows_follow_the_schema_and_never_hold_test_clips(run_dir):
    cache = run_dir / "data/runs/synthetic/fold1/cache"
    table = pq.ParquetDataset(sorted(cache.glob("part-*.parquet"))).read()
    assert table.schema.equals(CACHE_SCHEMA, check_metadata=False)
    rows = table.to_pandas()
    assert set(rows["split"]) == {"train", "validation"} and len(rows) == 32
    assert not any("spk01" in i or "spk02" in i for i in rows["id"])  # fold 1 tests spk01, spk02
    for row in rows.itertuples():
        assert abs(sum(row.attention) - 1) < 1e-4 and 1 <= row.effective_steps <= row.n_audio + 1e-3
        assert len(row.topk_ids) == (len(row.input_ids) - 1) * 4
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["teacher"]["weights"] and "Please identify the emotion" in meta["prompt"]
    assert meta["cache"] == {"attention_layer": -1, "top_k": 4, "temperature": 2.0}
    assert not (run_dir / "data/work/synthetic/fold1").exists() or not any((run_dir / "data/work/synthetic/fold1").iterdir())


def test_models_record_what_made_them(run_dir):
    student = json.loads((run_dir / "data/runs/synthetic/fold1/student/pldistill.json").read_text())
    teacher = json.loads((run_dir / "data/runs/synthetic/fold1/teacher/pldistill.json").read_text())
    assert student["teacher"]["weights"] == teacher["weights"]
    assert student["params"]["distill"]["lambda_p"] == 1.0 and student["seed"] == 7
    assert {"ce", "cka", "kl", "validation_ua"} <= set(student["history"][0])


def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", "pldistill_cli.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, params_text, message",
    [
        (["preprocess", "--dataset", "nope"], None, "unknown dataset `nope`"),
        (["preprocess", "--dataset", "synthetic", "--root", "/no/such/folder"], None, "dataset root not found"),
        (["distill"], "distill:\n  epochs: [\n", "malformed YAML"),
        (["train-teacher", "--fold", "1"], None, "manifest not found"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, params_text, message):
    (tmp_path / "params.yaml").write_text(params_text or yaml.safe_dump(SMALL))
    result = _run(args, tmp_path)
    assert result.returncode == 1
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_a_cache_from_another_teacher_or_prompt_is_refused(run_dir, monkeypatch):
    """distill reads the cache only if it was written by this teacher with this prompt."""
    from pldistill_cli.config import load_params
    from pldistill_cli.distill import distill

    monkeypatch.chdir(run_dir)
    meta_file = run_dir / "data/runs/synthetic/fold1/cache/meta.json"
    original = meta_file.read_text()
    try:
        for field, value in (("teacher", {"path": "elsewhere", "weights": "0123"}), ("prompt", "Say something.")):
            meta_file.write_text(json.dumps({**json.loads(original), field: value}))
            with pytest.raises(PldistillError, match=f"different {field}"):
                distill("synthetic", 1, load_params(Path("params.yaml")))
    finally:
        meta_file.write_text(original)

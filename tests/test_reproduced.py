"""scripts/reproduced.py, which `.ci/run` calls after the quick start, on a small git repository of its own:
a clean tree passes; changed outputs fail where the committed kernels are this CPU's; where they are
another CPU's, changed floats pass unless the committed dvc.lock records other code, params or commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pldistill_cli.config import load_params
from pldistill_cli.models import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
LOCK = {"schema": "2.0", "stages": {"distill@0": {
    "cmd": "pldistill distill --method ce", "params": {"params.yaml": {"seed": 42}},
    "deps": [{"path": "pldistill_cli/distill.py", "md5": "aaa"}, {"path": "data/cache", "md5": "bbb"}],
    "outs": [{"path": "metrics/ce-details.json", "md5": "ccc"}]}}}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def commit(repo: Path, kernels: str) -> None:
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/ce-details.json").write_text(json.dumps({"ua": 0.5, "versions": {"cpu_kernels": kernels}}))
    (repo / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outputs")


def reproduced(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/reproduced.py")], cwd=repo, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    shutil.copy(ROOT / "params.yaml", tmp_path)
    return tmp_path


def changed_floats(repo: Path) -> None:
    (repo / "metrics/ce-details.json").write_text(json.dumps({"ua": 0.5000001}))
    lock = json.loads(json.dumps(LOCK))
    lock["stages"]["distill@0"]["deps"][1]["md5"] = "other data"
    lock["stages"]["distill@0"]["outs"][0]["md5"] = "other output"
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_a_clean_tree_passes_and_changed_floats_fail_on_the_committing_kernels(repo):
    import torch

    torch.set_num_threads(load_params(ROOT / "params.yaml").cpu_threads)  # as the script measures them
    commit(repo, cpu_kernels())
    assert reproduced(repo).returncode == 0
    changed_floats(repo)
    result = reproduced(repo)
    assert result.returncode == 1 and "metrics/ce-details.json" in result.stdout


def test_other_kernels_pass_with_changed_floats_but_not_with_a_stale_lock(repo):
    commit(repo, "kernels of another cpu")
    changed_floats(repo)
    result = reproduced(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round differently" in result.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"]["distill@0"]["deps"][0]["md5"] = "code changed since the commit"
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    result = reproduced(repo)
    assert result.returncode == 1 and "stale" in result.stdout and "distill@0" in result.stdout

"""Several processes (torchrun, gloo on CPU): cache-teacher shards by rank without losing or
repeating an utterance, and distill trains data-parallel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import pldistill_cli
from pldistill_cli.cli import app

PARAMS = {
    "seed": 5,
    "corpora": {"synthetic": {"adapter": "synthetic", "n_speakers": 6, "n_sentences": 1, "n_folds": 3}},
    "pretrain_encoder": {"clips": 0},
    "pretrain_teacher": {"voices": 0},
    "train_teacher": {"epochs": 1, "batch_size": 8},
    "cache": {"top_k": 4, "batch_size": 4},
    "distill": {"epochs": 2, "batch_size": 4},
}


def launch(root: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "pldistill_cli", *args] if processes > 1 else [sys.executable, "-m",
                                                                                       "pldistill_cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def read_cache(folder: Path) -> pd.DataFrame:
    return pq.ParquetDataset(sorted(folder.glob("part-*.parquet"))).read().to_pandas()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in (["pretrain-encoder"], ["pretrain-teacher"], ["preprocess"], ["train-teacher"]):
            result = CliRunner().invoke(app, stage, catch_exceptions=False)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root


def test_two_process_cache_equals_one_process_cache(root):
    cache, store = root / "data/runs/synthetic/fold1/cache", root / "data/encoded"
    two = launch(root, "cache-teacher")
    assert two.returncode == 0, two.stderr[-3000:]
    parts = sorted(p.name for p in cache.glob("part-*.parquet"))
    assert any(p.startswith("part-r0-") for p in parts) and any(p.startswith("part-r1-") for p in parts)
    sharded = read_cache(cache)
    shutil.rmtree(cache)
    shutil.rmtree(store)  # encode again too
    one = launch(root, "cache-teacher", processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    single = read_cache(cache)

    manifest = pd.read_parquet(root / "data/prepared/synthetic/manifest.parquet")
    expected = sorted(manifest.loc[manifest["fold"] != 1, "id"])
    assert sorted(sharded["id"]) == sorted(single["id"]) == expected  # none lost, none repeated
    sharded, single = sharded.set_index("id").loc[expected], single.set_index("id").loc[expected]
    assert (sharded["input_ids"].map(list) == single["input_ids"].map(list)).all()
    for column in ("attention", "topk_logprobs"):  # same batches, other process: equal to float error
        for a, b in zip(sharded[column], single[column]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_two_process_distill_trains(root):
    if not (root / "data/runs/synthetic/fold1/cache").exists():
        assert launch(root, "cache-teacher", processes=1).returncode == 0
    result = launch(root, "distill", "--method", "pl-distill")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr


    made = json.loads((root / "data/runs/synthetic/fold1/student-pl-distill-s5/pldistill.json").read_text())
    losses = [h["loss"] for h in made["history"] if h["epoch"] > 0]  # epoch 0: the probe before training
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_run_whose_world_size_disagrees_stops(root):
    (root / "other.yaml").write_text(yaml.safe_dump({**PARAMS, "world_size": 2}))
    result = launch(root, "distill", "--params", "other.yaml", processes=1)
    assert result.returncode == 1
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "world_size is 2 but 1 process(es) started" in lines[0]


def test_data_parallel_ranks_stay_identical_and_step_as_documented(tmp_path):
    """The shared training loop under torchrun: both ranks end with the same weights (gradients are
    all-reduced), each epoch takes floor(batches / processes / grad_accum) optimizer steps, and each
    rank scores only its share of the validation items but gets every prediction back."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("ddp_probe.py")), str(tmp_path), "11", "2"]
    # the probes import the pldistill_cli this test imported (under mutmut: its mutated copy)
    package_root = str(Path(pldistill_cli.__file__).resolve().parents[1])
    path = os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":  # mutmut: the probes' calls count as this test's
        from mutmut.state import state as mutmut_state

        mutmut_state()._stats.update(*(r["mutmut_functions"] for r in ranks))
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["updates"] == ranks[1]["updates"] == [11 // 2 // 2] * 3
    assert set(ranks[0]["scored"]).isdisjoint(ranks[1]["scored"])
    assert sorted(ranks[0]["scored"] + ranks[1]["scored"]) == list(range(44))
    assert ranks[0]["predictions"] == ranks[1]["predictions"] and all(ranks[0]["predictions"])

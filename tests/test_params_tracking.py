"""DVC re-runs a student only for a setting its method reads: each method's loss weights are its own
params (`distill.weights.<method>`), so changing lambda_p re-runs the methods with a projector term and
no other. Checked on the generated dvc.yaml with DVC itself, in a project whose every dependency and
output is an empty stand-in and whose dvc.lock `dvc commit` wrote: nothing trains, it takes seconds."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pldistill_cli.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
# README's method table: which methods have a projector term, a KL term, a CKA (whose estimator is a setting)
PROJECTOR = {"pdist", "fitnets", "cka", "pl-distill"}
KL = {"kd", "ldist", "fitnets", "cka", "pl-distill"}
CKA = {"pdist", "cka", "pl-distill"}


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The generated dvc.yaml over every method, with a dvc.lock as if every stage had run."""
    from dvc.repo import Repo

    repo = tmp_path_factory.mktemp("tracking")
    shutil.copytree(ROOT / "pldistill_cli", repo / "pldistill_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["methods"] = list(METHODS)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "init", "--no-scm", "-q")
    with Repo(str(repo)) as dvc_repo:
        paths = {Path(x.fs_path) for stage in dvc_repo.index.stages for x in (*stage.deps, *stage.outs)
                 if x.def_path != "params.yaml"}
    for path in sorted(paths):  # a folder where other paths lie under it, else an empty file
        if any(path in other.parents for other in paths):
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    dvc(repo, "commit", "--force", "-q")
    assert stale(repo) == set()
    return repo


def stale(repo: Path, overrides: tuple[str, ...] = ()) -> set[str]:
    """The stages `dvc status` finds changed after the `dvc exp run -S` overrides (DVC's own parser applies
    them), with params.yaml restored afterwards; students named by their method."""
    from dvc.utils.hydra import apply_overrides

    original = (repo / "params.yaml").read_text()
    try:
        if overrides:
            apply_overrides(repo / "params.yaml", list(overrides))
            assert (repo / "params.yaml").read_text() != original
        out = dvc(repo, "status", "--json")
    finally:
        (repo / "params.yaml").write_text(original)
    names = set(yaml.safe_load(out or "{}"))
    # distill@<dataset>-<fold>-<method>-<seed> -> distill <method>
    return {f"{n.split('@')[0]} {n.split('@')[1].split('-', 2)[2].rsplit('-', 1)[0]}" if n.startswith("distill@")
            else n.split("@")[0] for n in names}


def test_a_methods_weight_reruns_only_that_methods_student(project):
    """`dvc exp run -S 'distill.weights.pl-distill.lambda_p=0.5'`: pl-distill's student (and the report, which
    prints every setting) and nothing else."""
    assert stale(project, ("distill.weights.pl-distill.lambda_p=0.5",)) == {"distill pl-distill", "report"}
    assert stale(project, ("distill.weights.kd.lambda_l=0.5",)) == {"distill kd", "report"}


@pytest.mark.parametrize("weight, value, users", [("lambda_p", 0.5, PROJECTOR), ("lambda_l", 0.5, KL),
                                                  ("cka_estimator", "debiased", CKA)])
def test_a_weight_changed_everywhere_reruns_only_the_methods_with_its_term(project, weight, value, users):
    """lambda_p changed for every method that has it re-runs the projector methods' students, and leaves
    ce, kd and ldist alone (so does lambda_l for ce and pdist, cka_estimator for ce, kd, ldist and fitnets)."""
    overrides = tuple(f"distill.weights.{m}.{weight}={value}" for m, row in METHODS.items() if weight in row.weights)
    assert stale(project, overrides) == {f"distill {m}" for m in users} | {"report"}


def test_a_setting_every_student_reads_reruns_them_all(project):
    """The other distill keys stay tracked for every method."""
    assert stale(project, ("distill.lr=0.01",)) == {f"distill {m}" for m in METHODS} | {"report"}

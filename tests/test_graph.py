"""The DVC graph can be trusted: dvc.yaml is generated from the code, declares every module a stage
imports and every setting it reads, and the real `dvc repro` runs a real corpus layout end to end,
re-running exactly the stages whose inputs changed and reproducing every output byte for byte."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import soundfile as sf
import yaml
from pydantic import TypeAdapter

from pldistill_cli.config import CorpusParams, MethodName, Params, Restricted, UndeclaredParams
from pldistill_cli.graph import STAGES, code_deps, main, render

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_generated_from_the_stage_table():
    assert (ROOT / "dvc.yaml").read_text() == render(), "run `python -m pldistill_cli.graph`"
    assert main(["--check"]) == 0


@pytest.mark.parametrize("stage", sorted({s.module for s in STAGES.values()}))
def test_every_module_a_stage_imports_is_a_declared_dependency(stage):
    """What actually gets imported when the stage runs (in a fresh interpreter) is within its declared
    code dependencies: the static import closure misses nothing."""
    probe = (f"import sys, pldistill_cli.cli, pldistill_cli.{stage}; "
             "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() "
             "if n.startswith('pldistill_cli') and getattr(m, '__file__', None))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    imported = {str(Path(f).resolve().relative_to(ROOT)) for f in out.split()} - {"pldistill_cli/cli.py"}
    declared = set(code_deps(next(s for s in STAGES.values() if s.module == stage)))
    # cli.py's own lazy imports belong to the other commands; the stage module's closure must cover the rest
    others = {f"pldistill_cli/{s.module}.py" for s in STAGES.values() if s.module != stage}
    assert imported - others <= declared


def test_params_yaml_spells_out_every_setting_a_stage_declares():
    """DVC fails a stage whose declared param is missing from params.yaml, so the committed file holds
    every setting (and nothing the code does not know)."""
    def keys(tree: dict, prefix: str = "") -> set[str]:
        return set().union(*({f"{prefix}{k}"} | (keys(v, f"{prefix}{k}.") if isinstance(v, dict) else set())
                             for k, v in tree.items()))
    written = keys(yaml.safe_load((ROOT / "params.yaml").read_text()))
    known = keys(TypeAdapter(Params).dump_python(Params()))
    declared = {key.replace("${item.dataset}", "synthetic").replace("${item.method}", method)  # any method can be run
                for stage in yaml.safe_load(render())["stages"].values() for key in stage.get("params", [])
                for method in get_args(MethodName)}
    assert declared <= written and {k for k in known if not k.startswith("corpora.")} <= written
    assert {k for k in written if not k.startswith("corpora.")} <= known


def test_a_stage_reading_an_undeclared_setting_fails():
    corpora = {"synthetic": CorpusParams(adapter="synthetic"), "ravdess": CorpusParams(adapter="ravdess")}
    params = Restricted.of(Params(corpora=corpora), ["seed", "cache.top_k", "corpora.synthetic", "distill",
                                                     "evaluate.scoring"], "demo")
    assert params.seed == 42 and params.cache.top_k == 16 and params.corpora.get("synthetic").n_folds == 5
    assert params.section("distill")["weights"]["pl-distill"]["lambda_p"] == 1.0
    assert set(params.corpora) == {"synthetic", "ravdess"} and params.evaluate.scoring == "rank"
    student = Restricted.of(Params(), ["distill.lr", "distill.weights.kd"], "demo")  # a student: its method's only
    assert student.distill.weights["kd"].lambda_l == 1.0 and student.distill.lr > 0
    for read in (lambda: params.evaluate.batch_size, lambda: params.cache.temperature, lambda: params.section("cache"),
                 lambda: params.corpora.get("ravdess"), lambda: params.world_size, lambda: student.distill.epochs,
                 lambda: student.distill.weights["pl-distill"], lambda: student.section("distill")):
        with pytest.raises(UndeclaredParams, match="demo"):
            read()


def committed_results(repo: Path) -> None:
    """A DVC project holding the committed graph, params and results (no data: nothing runs)."""
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", "metrics", "report"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, repo / name)


def test_dvc_plots_show_writes_a_page_that_opens_offline(tmp_path):
    """`dvc plots show` on the committed report: the page it writes loads nothing from the network
    (no CDN script) and every image it shows is a file beside it."""
    committed_results(tmp_path)
    dvc(tmp_path, "plots", "show", "-o", "plots")
    page = (tmp_path / "plots" / "index.html").read_text()
    assert not re.search(r"<script|<link|@import|url\(", page, re.I), "the page loads something"
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(list((ROOT / "report/figures").glob("*.png"))) > 0
    assert all((tmp_path / "plots" / src).is_file() for src in images)


def test_readmes_experiment_commands_fit_120_columns(tmp_path):
    """README's narrow views of a variant of one method (here pl-distill's lambda_p, its metrics
    as an experiment would change them) fit in 120 columns, the variant's UA and param shown."""
    committed_results(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=tmp_path, check=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["distill"]["weights"]["pl-distill"]["lambda_p"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    student = next((tmp_path / "metrics").glob("*/fold1/student-pl-distill-s*[0-9].json"))
    student.write_text(json.dumps({"test": {"macro_f1": 0.3, "ua": 0.3125, "wa": 0.3}}))
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(dvc exp (?:diff|show) .*?)\s+# ", readme, re.M)
    assert len(commands) == 2
    for command in commands:
        args = [a.strip("'") for a in command.split()[1:]] + (["--md"] if "show" in command else [])
        out = dvc(tmp_path, *args).stdout
        assert "0.3125" in out and "lambda_p" in out, out
        assert max(len(line) for line in out.splitlines()) <= 120, out


def test_constraints_pin_the_versions_that_made_the_committed_results():
    """README's quick start installs with constraints.txt to reproduce dvc.lock: it pins every
    dependency within pyproject's ranges, and the library versions the committed report says made its
    numbers (every model records them) are the pinned ones."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as the pinned set
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {canonicalize_name(name): Version(version) for name, version in re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"] + project["optional-dependencies"]["test"]):
        name = canonicalize_name(requirement.name)
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), requirement
    made_with = re.findall(r"^- (?:cpu_kernels \S+, )?device .*$", (ROOT / "report/report.md").read_text(), re.M)
    assert made_with
    for line in made_with:
        for library in ("numpy", "torch", "transformers"):
            version = Version(re.search(rf"\b{library} (\S+?),?(?: |$)", line)[1])
            assert version.public == str(pins[library]), f"{line}: {library} is pinned at {pins[library]}"


# ---------------------------------------------------------------------------------- the real dvc repro


RAVDESS_ACTORS = (1, 6, 4)  # fold 1 tests actor 1, is validated on fold 6 (actor 6), trains on actor 4
EMOTIONS = ("01", "02", "03", "04", "05", "06", "07", "08")


def ravdess_fixture(root: Path) -> None:
    """Real synthetic speech, saved under RAVDESS's distributed names and layout (48 kHz)."""
    from pldistill_cli.synthesis import EMOTIONS as WORDS, SyntheticSettings, generate_corpus

    rendered = root.parent / "rendered"
    plan = generate_corpus(rendered, SyntheticSettings(seed=3, n_speakers=len(RAVDESS_ACTORS), n_sentences=1))
    speakers = sorted({u.speaker for u in plan})
    for u in plan:
        actor = RAVDESS_ACTORS[speakers.index(u.speaker)]
        code = EMOTIONS[WORDS.index(u.label)]
        wave, rate = sf.read(rendered / f"{u.utt_id}.wav", dtype="float32")
        wave = np.interp(np.arange(int(len(wave) * 48000 / rate)) * rate / 48000, np.arange(len(wave)), wave)
        path = root / f"Actor_{actor:02d}" / f"03-01-{code}-01-01-01-{actor:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave, 48000)
    (root / "Actor_01" / "01-01-01-01-01-01-01.mp4").write_bytes(b"video")  # left out by design


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def lock_hashes(repo: Path) -> dict[str, str]:
    """md5 of every output under data/, as dvc.lock records them."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
            if o["path"].startswith("data/")}


def stages_to_run(repo: Path) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json").stdout or "{}"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvcrepo")
    ravdess_fixture(repo.parent / "RAVDESS")
    shutil.copytree(ROOT / "pldistill_cli", repo / "pldistill_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    # dvc needs every key it tracks in params.yaml: a user starts from the project's file, as here
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {
        "": {"seed": 7, "cpu_threads": 1, "datasets": ["ravdess"], "folds": [1], "methods": ["pl-distill"],
             "seeds": [7], "corpora": {"ravdess": {"adapter": "ravdess", "root": str(repo.parent / "RAVDESS")}}},
        "preprocess": {"workers": 1}, "pretrain_encoder": {"clips": 24, "epochs": 1, "batch_size": 8},
        "pretrain_teacher": {"voices": 3, "sentences": 1, "validation_voices": 1, "epochs": 1, "batch_size": 8},
        "train_teacher": {"epochs": 1, "batch_size": 8},
        "cache": {"top_k": 4, "batch_size": 8}, "distill": {"epochs": 1, "batch_size": 8},
        "evaluate": {"attention_examples": 2},
    }.items():
        (params[section] if section else params).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "repro")
    return repo


def test_dvc_repro_runs_a_real_corpus_layout_to_the_report(repo):
    summary = json.loads((repo / "data/prepared/ravdess/summary.json").read_text())
    assert summary["utterances"] == 24 and summary["left_out"] == {"video (modality 01/02)": 1}
    report = (repo / "report/report.md").read_text()
    assert "| teacher |" in report and "| pl-distill |" in report and "WA 92.08" in report  # the paper's figure
    metrics = json.loads((repo / "metrics/ravdess/fold1/student-pl-distill-s7.json").read_text())
    assert set(metrics["test"]) == {"wa", "ua", "macro_f1"}
    assert stages_to_run(repo) == set()  # a second `dvc repro` would do nothing
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    assert set(plots) == {f"report/figures/{p.name}" for p in (repo / "report/figures").iterdir()}
    assert "report/figures/ravdess-curves.png" in plots  # the training curves among them


@pytest.mark.parametrize("module", ["report.py", "metrics.py", "cache.py", "datasets/ravdess.py", "losses.py"])
def test_editing_a_module_reruns_exactly_the_stages_that_import_it(repo, module):
    path = repo / "pldistill_cli" / module
    original = path.read_text()
    # (the cross-corpus stages have no rows here: the repo's cross_corpus is empty)
    expected = {name for name, stage in STAGES.items()
                if f"pldistill_cli/{module}" in code_deps(stage) and "pair" not in stage.axes}
    try:
        path.write_text(original + "# an edit\n")
        changed = {name.split("@")[0] for name in stages_to_run(repo)}
    finally:
        path.write_text(original)
    assert changed == expected and changed
    assert stages_to_run(repo) == set()


def test_changing_a_setting_reruns_exactly_the_stages_that_read_it(repo):
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    weights = yaml.safe_load(original)["distill"]["weights"]
    for key, value, expected in (("distill", {"weights": {**weights, "pl-distill": {**weights["pl-distill"], "lambda_p": 0.5}}},
                                  {"distill", "report"}),
                                 ("cache", {"top_k": 3}, {"cache-teacher", "distill", "report"}),
                                 ("corpora", {"ravdess": {"adapter": "ravdess", "root": "/elsewhere"}}, {"preprocess"}),
                                 ("pretrain_encoder", {"epochs": 2}, {"pretrain-encoder"}),
                                 ("pretrain_teacher", {"epochs": 2}, {"pretrain-teacher"}),
                                 ("train_teacher", {"encoder": "trained"}, {"train-teacher"})):
        params = yaml.safe_load(original)
        params[key] = {**params.get(key, {}), **value}
        params_file.write_text(yaml.safe_dump(params))
        try:
            assert {name.split("@")[0] for name in stages_to_run(repo)} == expected, key
        finally:
            params_file.write_text(original)


def test_dvc_repro_force_reproduces_every_data_output_byte_for_byte(repo):
    before = lock_hashes(repo)
    dvc(repo, "repro", "-f")
    assert lock_hashes(repo) == before and len(before) == 6  # encoder, teacher-init, prepared, teacher, cache, student


def test_a_cross_corpus_pair_runs_from_dvc_repro_into_the_report(repo, tmp_path):
    """A `cross_corpus` pair is a matrix axis: with SAVEE prepared beside the RAVDESS run, `dvc repro` scores the
    fold's teacher and student on SAVEE's fold-1 test split and the report gains the pair's table; nothing else
    re-runs."""
    from test_cross_corpus import savee_tree

    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    savee_tree(tmp_path / "SAVEE")
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["corpora"]["savee"] = {"adapter": "savee", "root": str(tmp_path / "SAVEE")}
    params["cross_corpus"] = [{"train": "ravdess", "test": "savee"}]
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "pldistill_cli", "preprocess", "--dataset", "savee"], cwd=copy, env=env,
                   check=True, capture_output=True)
    assert stages_to_run(copy) == {"evaluate-cross-teacher@pair0-1", "evaluate-cross-student@pair0-1-pl-distill-7",
                                   "report"}
    dvc(copy, "repro")
    for name in ("teacher", "student-pl-distill-s7"):
        details = json.loads((copy / f"metrics/ravdess/fold1/on-savee/{name}-details.json").read_text())
        assert details["labels"] == ["Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear"]
        assert details["n"] == 7 and details["on"] == "savee"
    report = (copy / "report/report.md").read_text()
    assert "## Cross-corpus" in report and "### ravdess → savee" in report and "| UA on savee |" in report
    assert stages_to_run(copy) == set()

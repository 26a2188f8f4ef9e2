"""Nothing silent, nothing slow: one representative of every kind of bad input (issue 24), with variants,
each asserting the exit status, one `error:` line naming the right file or setting, no traceback, every
earlier output byte-identical, and, for errors that need no model, that neither torch nor transformers was
imported before the error (so the error is fast without timing it; scripts/bench_errors.py times them).

The pipeline's outputs here are stand-ins with the right file kinds (a real manifest, Parquet parts,
JSON, safetensors files): nothing in these errors may need a model, so none is built."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from test_bad_input import snapshot

SMALL = {"seed": 7, "seeds": [7], "methods": ["ce"],
         "corpora": {"synthetic": {"adapter": "synthetic", "n_speakers": 6, "n_sentences": 1, "n_folds": 3}},
         "cache": {"top_k": 4}}
OUTPUTS = ("data/prepared", "data/encoder", "data/teacher-init", "data/runs", "data/encoded", "metrics", "export", "params.yaml")
STORE = "data/encoded/synthetic/k"
TEACHER, CACHE = "data/runs/synthetic/fold1/teacher", "data/runs/synthetic/fold1/cache"
STUDENT = "data/runs/synthetic/fold1/student-ce-s7"
# Runs the CLI and reports, after it exits, whether torch or transformers had been imported.
RUNNER = ("import atexit, json, sys\n"
          "atexit.register(lambda: print('IMPORTED', json.dumps([m for m in ('torch', 'transformers') "
          "if m in sys.modules]), file=sys.stderr))\n"
          "from pldistill_cli.cli import main\nsys.argv[0] = 'pldistill'\nmain()\n")


def safetensors_bytes() -> bytes:
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + np.ones(2, np.float32).tobytes()


def parquet(path: Path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def model_folder(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_audio", "text_config": {"vocab_size": 384, "num_hidden_layers": 2}}))
    (folder / "model.safetensors").write_bytes(safetensors_bytes())
    (folder / "pldistill.json").write_text(json.dumps(meta))


def make_tree(root: Path) -> Path:
    """Stand-ins for a finished small pipeline: a real manifest with 3 folds, the encoder and teacher-init
    records, a teacher, its cache and encoder store, a `ce` student, metrics and an export."""
    import pandas as pd

    from pldistill_cli.manifest import write_manifest

    (root / "params.yaml").write_text(yaml.safe_dump(SMALL))
    rows = [dict(id=f"u{i}", dataset="synthetic", speaker=f"s{i % 6}", label=("happy", "sad")[i % 2], fold=i % 3 + 1,
                 validation_fold=3 if i % 3 == 0 else i % 3, duration=1.0, audio_path=f"audio/u{i}.wav",
                 source_path=f"u{i}.wav", speaker_independent=True) for i in range(12)]
    write_manifest(pd.DataFrame(rows), root / "data/prepared/synthetic/manifest.parquet", ("happy", "sad"))
    (root / "data/prepared/synthetic/summary.json").write_text("{}")
    (root / "data/encoder").mkdir(parents=True)
    (root / "data/encoder/pldistill.json").write_text(json.dumps({"source": "random", "preset": "tiny"}))
    (root / "data/teacher-init").mkdir(parents=True)
    (root / "data/teacher-init/pldistill.json").write_text(json.dumps({"source": "random", "preset": "tiny"}))
    model_folder(root / TEACHER, {"stage": "train-teacher"})
    parquet(root / CACHE / "part-r0-00000.parquet", id=["u1", "u2"], split=["train", "validation"])
    (root / CACHE / "meta.json").write_text(json.dumps({"encoder": {"store": STORE}}))
    (root / CACHE / "teacher_projector.safetensors").write_bytes(safetensors_bytes())
    parquet(root / STORE / "part-r0-00000.parquet", id=["u1", "u2"])
    model_folder(root / STUDENT, {"stage": "distill", "params": {"preprocess": {"min_seconds": 0.2}}})
    model_folder(root / "export/ce", {"stage": "export"})
    (root / "metrics/synthetic/fold1").mkdir(parents=True)
    (root / "metrics/synthetic/fold1/student-ce-s7.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("early"))


def cli(root: Path, *args: str, env: dict | None = None) -> tuple[int, list[str], list[str]]:
    """Exit status, the non-empty stderr lines, and the heavy modules imported by the time it exited."""
    result = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=root, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "1000", **(env or {})})
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    imported = [json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("IMPORTED ")]
    return result.returncode, [l for l in lines if not l.startswith("IMPORTED ")], imported[0] if imported else None


# ---------------------------------------------------------------------------------- what to break, and how


def corrupt(path: str, data: bytes | None = None, keep: float = 0.5):
    """Replace a file by `data` (default: its first half) for one case; put it back afterwards."""
    def setup(root: Path):
        target = root / path
        original = target.read_bytes()
        target.write_bytes(data if data is not None else original[: int(len(original) * keep)])
        return lambda: target.write_bytes(original)
    return setup


def moved(path: str):
    def setup(root: Path):
        (root / path).rename(root / f"{path}.away")
        return lambda: (root / f"{path}.away").rename(root / path)
    return setup


def written(files: dict[str, bytes | str]):
    """Extra input files for one case (params files, CSVs, audio), removed afterwards."""
    def setup(root: Path):
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                (root / name).write_text(content)
            else:
                (root / name).write_bytes(content)
        return lambda: [shutil.rmtree(root / name.split("/")[0], ignore_errors=True) if "/" in name else
                        (root / name).unlink(missing_ok=True) for name in files]
    return setup


def locked(folder: str):
    def setup(root: Path):
        from filelock import FileLock

        lock = FileLock(str(root / folder) + ".lock")
        lock.acquire()
        return lock.release
    return setup


def params(**settings) -> str:
    merged = json.loads(json.dumps(SMALL))
    for key, value in settings.items():
        *path, last = key.split("__")
        node = merged
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return yaml.safe_dump(merged)


def wav(seconds: float = 1.0, value: float | None = None, subtype: str = "PCM_16") -> bytes:
    import io

    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) if value is None else np.full(len(t), value)
    out = io.BytesIO()
    sf.write(out, wave, 16000, format="WAV", subtype=subtype)
    return out.getvalue()


CSV_PARAMS = yaml.safe_dump({"corpora": {"mine": {"adapter": "folder", "csv": "in/c.csv", "n_folds": 3}}})


def csv(text: str) -> dict:
    return {"in/c.csv": text, "in/a.wav": wav(), "in/b.wav": wav(), "mine.yaml": CSV_PARAMS}


# kind (the benchmark's row), command, exit status, what the one line says, the setup of the case
CASES = [
    # params files
    ("empty params file", ["distill", "--params", "p.yaml"], 1, ["p.yaml: holds no settings"], written({"p.yaml": ""})),
    ("empty params file", ["train-teacher", "--params", "p.yaml"], 1, ["p.yaml: holds no settings"],
     written({"p.yaml": "# every setting commented out\n#seed: 7\n\n"})),
    ("key written twice", ["distill", "--params", "p.yaml"], 1, ["p.yaml: `distill.epochs` is set twice (lines 2 and 4)"],
     written({"p.yaml": "distill:\n  epochs: 20\n  lr: 0.001\n  epochs: 1\n"})),
    ("key written twice", ["report", "--params", "p.yaml"], 1, ["p.yaml: `seed` is set twice (lines 1 and 3)"],
     written({"p.yaml": "seed: 1\nfolds: [1]\nseed: 2\n"})),
    ("entry listed twice", ["report", "--params", "p.yaml"], 1, ["p.yaml: `folds` lists 1 twice"],
     written({"p.yaml": params(folds=[1, 1])})),
    ("entry listed twice", ["report", "--params", "p.yaml"], 1, ["p.yaml: `seeds` lists 7 twice"],
     written({"p.yaml": params(seeds=[7, 3, 7])})),
    ("entry listed twice", ["report", "--params", "p.yaml"], 1, ["p.yaml: `methods` lists 'ce' twice"],
     written({"p.yaml": params(methods=["ce", "kd", "ce"])})),
    ("entry listed twice", ["report", "--params", "p.yaml"], 1, ["p.yaml: `datasets` lists 'synthetic' twice"],
     written({"p.yaml": params(datasets=["synthetic", "synthetic"])})),
    ("entry listed twice", ["evaluate", "--model", "references", "--params", "p.yaml"], 1,
     ["p.yaml: `evaluate.references` lists 'prosody' twice"],
     written({"p.yaml": params(evaluate__references=["prosody", "prosody"])})),
    # settings checked against the teacher, before cache-teacher writes anything
    ("cache.top_k > vocabulary", ["cache-teacher", "--params", "other.yaml"], 1,
     ["other.yaml: cache.top_k 100000 is larger than the teacher's vocabulary (384"],
     written({"other.yaml": params(cache__top_k=100000)})),
    ("cache.top_k > vocabulary", ["cache-teacher", "--params", "other.yaml"], 1,
     ["other.yaml: cache.attention_layer 99 is outside the teacher's 2 LLM layers"],
     written({"other.yaml": params(cache__attention_layer=99)})),
    # processes and devices
    ("world_size", ["distill", "--params", "other.yaml"], 1, ["other.yaml: world_size is 3 but 1 process(es)"],
     written({"other.yaml": params(world_size=3)})),
    ("world_size", ["train-teacher", "--params", "other.yaml"], 1, ["other.yaml: world_size is 2 but 4 process(es)"],
     written({"other.yaml": params(world_size=2)}), {"WORLD_SIZE": "4"}),
    ("--device cuda without a GPU", ["distill", "--device", "cuda"], 1, ["--device: device `cuda` requested"],
     None, {"CUDA_VISIBLE_DEVICES": ""}),
    ("--device cuda without a GPU", ["cache-teacher", "--params", "p.yaml"], 1, ["p.yaml: cache.device: device `cuda`"],
     written({"p.yaml": params(cache__device="cuda")}), {"CUDA_VISIBLE_DEVICES": "-1"}),
    ("--device cuda without a GPU", ["predict", "--model", STUDENT, "--device", "cuda", "x.wav"], 1, ["--device"],
     None, {"CUDA_VISIBLE_DEVICES": ""}),
    # the report's folds
    ("report: fold does not exist", ["report", "--params", "p.yaml"], 1,
     ["p.yaml: `folds` lists 7, but fold 7 does not exist; dataset `synthetic` has folds [1, 2, 3]"],
     written({"p.yaml": params(folds=[1, 7])})),
    # truncated or missing outputs of earlier stages
    ("truncated output", ["distill"], 1, [f"{CACHE}/part-r0-00000.parquet: unreadable Parquet part",
                                          "re-run `pldistill cache-teacher --dataset synthetic --fold 1`"],
     corrupt(f"{CACHE}/part-r0-00000.parquet")),
    ("truncated output", ["distill"], 1, [f"{CACHE}/part-r0-00000.parquet: unreadable Parquet part"],
     corrupt(f"{CACHE}/part-r0-00000.parquet", b"PAR1 not really")),
    ("truncated output", ["distill"], 1, [f"{STORE}/part-r0-00000.parquet: unreadable Parquet part", f"delete {STORE}"],
     corrupt(f"{STORE}/part-r0-00000.parquet", keep=0.9)),
    ("truncated output", ["distill"], 1, [f"{CACHE}/teacher_projector.safetensors: unreadable safetensors file"],
     corrupt(f"{CACHE}/teacher_projector.safetensors", keep=0.05)),
    ("truncated output", ["cache-teacher"], 1, [f"{TEACHER}: unreadable model files (model.safetensors",
                                                "re-run `pldistill train-teacher --dataset synthetic --fold 1`"],
     corrupt(f"{TEACHER}/model.safetensors", keep=0.9)),
    ("truncated output", ["evaluate", "--model", "teacher"], 1, [f"{TEACHER}/pldistill.json: unreadable JSON file"],
     corrupt(f"{TEACHER}/pldistill.json")),
    ("truncated output", ["export", "--out", "export/new", "--method", "ce"], 1, [f"{STUDENT}/config.json: unreadable JSON file"],
     corrupt(f"{STUDENT}/config.json")),
    ("truncated output", ["distill"], 1, [f"{STORE}: the encoder store the cache {CACHE} reads is gone"], moved(STORE)),
    ("truncated output", ["distill"], 1, [f"{CACHE}: not found; run `pldistill cache-teacher"], moved(CACHE)),
    # a second run of the same stage
    ("another run holds the lock", ["distill", "--method", "ce"], 1, ["another `pldistill distill` for these outputs is running"],
     locked("data/work/synthetic/fold1/student-ce-s7")),
    ("another run holds the lock", ["cache-teacher"], 1, ["another `pldistill cache-teacher` for these outputs"],
     locked("data/work/synthetic/fold1/cache-teacher")),
    # export destinations
    ("export --out", ["export", "--out", "."], 1, [".: exists and is not an earlier pldistill export"], None),
    ("export --out", ["export", "--out", "data"], 1, ["data: exists and is not an earlier pldistill export"], None),
    ("export --out", ["export", "--out", "mine"], 1, ["mine: exists and is not an earlier pldistill export"],
     written({"mine/notes.txt": "my own file"})),
    ("export --out", ["export", "--out", "params.yaml/sub"], 1, ["params.yaml/sub: params.yaml is a file, not a folder"],
     None),
    ("export --out", ["export", "--out", "params.yaml"], 1, ["params.yaml: exists and is not an earlier"], None),
    # predict's inputs: named before the model loads
    ("predict: bad audio", ["predict", "--model", STUDENT, "gone.wav"], 1, ["gone.wav: file not found"], None),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in/empty.wav"], 1, ["in/empty.wav: unreadable"],
     written({"in/empty.wav": b""})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in/bad.wav"], 1, ["in/bad.wav: unreadable"],
     written({"in/bad.wav": b"RIFF\x00\x00\x00\x00WAVEjunk" * 10})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in/notes.txt"], 1, ["in/notes.txt: unreadable"],
     written({"in/notes.txt": "not audio at all\n"})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in/nan.wav"], 1, ["in/nan.wav: non-finite samples"],
     written({"in/nan.wav": wav(1.0, float("nan"), "FLOAT")})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in/silent.wav"], 1, ["in/silent.wav: silent"],
     written({"in/silent.wav": wav(1.0, 0.0)})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in/short.wav"], 1,
     ["in/short.wav: 0.100 s is shorter than 0.2 s"], written({"in/short.wav": wav(0.1)})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in"], 1, ["in: a folder with no audio files"],
     written({"in/notes.txt": "no audio here\n"})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in"], 1, ["in/sub/short.wav: 0.100 s is shorter"],
     written({"in/sub/short.wav": wav(0.1), "in/notes.txt": "a folder stands for the audio files in it\n"})),
    ("predict: bad audio", ["predict", "--model", STUDENT, "in/*.flac"], 1, ["in/*.flac: no audio file matches"],
     written({"in/x.wav": wav()})),
    # preprocess: the corpus and its options
    ("preprocess: corpus", ["preprocess", "--root", "nowhere"], 1, ["nowhere: dataset root not found"], None),
    ("preprocess: corpus", ["preprocess", "--root", "params.yaml"], 1, ["params.yaml: is a file, not a folder"], None),
    ("preprocess: corpus", ["preprocess", "-d", "mine", "--params", "mine.yaml"], 1, ["in/c.csv: empty CSV"], written(csv(""))),
    ("preprocess: corpus", ["preprocess", "-d", "mine", "--params", "mine.yaml"], 1, ["in/c.csv: needs the columns path and label"],
     written(csv("file,emotion\na.wav,happy\n"))),
    ("preprocess: corpus", ["preprocess", "-d", "mine", "--params", "mine.yaml"], 1, ["in/c.csv:3: 4 fields, but the header names 2"],
     written(csv("path,label\na.wav,happy\nb.wav,sad,x,y\n"))),
    ("preprocess: corpus", ["preprocess", "-d", "mine", "--params", "mine.yaml"], 1,
     ["in/c.csv:4: a.wav is listed at line 2 with label 'happy' and here with label 'sad'"],
     written(csv("path,label\na.wav,happy\nb.wav,sad\na.wav,sad\n"))),
    ("preprocess: corpus", ["preprocess", "-d", "mine", "--params", "mine.yaml"], 1, ["in/c.csv:3: fold 'x' is not a fold number"],
     written(csv("path,label,fold\na.wav,happy,1\nb.wav,sad,x\n"))),
    ("preprocess: corpus", ["preprocess", "-d", "mine", "--params", "mine.yaml"], 1, ["in/c.csv:2: empty speaker"],
     written(csv("path,label,speaker\na.wav,happy,\n"))),
    ("preprocess: corpus", ["preprocess", "-d", "mine", "--params", "mine.yaml"], 1,
     ["mine.yaml: corpora.mine.csv is set, but the ravdess adapter does not read it"],
     written({"mine.yaml": CSV_PARAMS.replace("folder", "ravdess")})),
    ("preprocess: option the adapter ignores", ["preprocess", "--adapter", "ravdess", "--root", ".", "--csv", "x.csv"], 2,
     ["'--csv'", "the ravdess adapter does not read --csv"], None),
    ("preprocess: option the adapter ignores", ["preprocess", "--metadata", "."], 2,
     ["'--metadata'", "the synthetic adapter does not read --metadata"], None),
    ("preprocess: option the adapter ignores", ["preprocess", "-d", "mine", "--params", "mine.yaml", "--speaker-pattern", "x",
                                                "--adapter", "savee"], 2, ["the savee adapter does not read --speaker-pattern"],
     written({"mine.yaml": CSV_PARAMS.replace("    csv: in/c.csv\n", "")})),
]


def run_case(root: Path, case: tuple) -> tuple[int, list[str], list[str]]:
    _, args, _, _, setup, *env = case
    restore = setup(root) if setup else None
    try:
        return cli(root, *args, env=env[0] if env else None)
    finally:
        if restore:
            restore()


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}: {' '.join(c[1])}" for c in CASES])
def test_each_error_is_one_line_before_torch_and_changes_nothing(tree, case):
    kind, args, code, fragments = case[:4]
    before = snapshot(tree, OUTPUTS)
    status, lines, imported = run_case(tree, case)
    assert status == code, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert imported == [], f"{imported} imported before the error"
    assert snapshot(tree, OUTPUTS) == before
    assert not (tree / "data/work/synthetic/fold1/cache-teacher").exists()  # cache-teacher wrote nothing


def test_stage_errors_name_the_params_file_given(tree):
    """Stage code says `params.yaml:`; the CLI names the file actually given with --params."""
    (tree / "n.yaml").write_text(params(corpora={"synthetic": {"adapter": "synthetic", "n_speakers": 7, "n_folds": 3}}))
    try:
        status, lines, _ = cli(tree, "preprocess", "--params", "n.yaml")
    finally:
        (tree / "n.yaml").unlink()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: n.yaml: corpora.synthetic.n_folds"), lines


def test_a_good_input_passes_the_checks(tree):
    """The checks refuse only what is broken: with every output whole, distill gets as far as importing
    the stage (then fails on the stand-in cache, which is not a real one)."""
    status, lines, imported = cli(tree, "distill", "--method", "ce")
    assert status != 0 and "torch" in imported, lines[-3:]


# ------------------------------------------------------------------------------ resume states, same bytes


def test_resume_states_are_announced_and_junk_is_discarded_with_one_line(tmp_path, capsys):
    import pickle

    import torch

    from pldistill_cli.training import _resume

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    state, progress = tmp_path / "state.pt", tmp_path / "state.json"
    progress.write_text(json.dumps({"fingerprint": "f", "epoch": 2, "best_score": 0.5, "best_epoch": 3, "history": []}))
    for content in (pickle.dumps({"epoch": 2, "model": Planted()}), b"junk" * 10, b""):
        state.write_bytes(content)
        assert _resume(state, progress, "f") is None and not (tmp_path / "ran").exists()
        assert capsys.readouterr().err.splitlines() == [f"warning: discarded an unreadable state in {tmp_path}; "
                                                        "starting afresh"]
    torch.save({"epoch": 2, "model": {}, "optimizer": {}, "schedule": {}, "rng": torch.get_rng_state(), "best": None},
               state)
    assert _resume(state, progress, "other settings") is None
    assert "made with other settings; starting afresh" in capsys.readouterr().err
    assert _resume(state, progress, "f")[1]["epoch"] == 2
    assert capsys.readouterr().err.splitlines() == [f"resuming from epoch 3 (saved in {tmp_path})"]
    progress.write_text("{")
    assert _resume(state, progress, "f") is None and "discarded an unreadable state" in capsys.readouterr().err


def test_a_saved_processor_does_not_depend_on_how_it_was_loaded(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 made transformers write `local_files_only: true` into tokenizer_config.json."""
    import huggingface_hub.constants
    from transformers import AutoProcessor

    from pldistill_cli.models import build_processor, get_preset, save_processor

    save_processor(build_processor(get_preset("tiny")), tmp_path / "built")
    for offline in (False, True):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        save_processor(AutoProcessor.from_pretrained(tmp_path / "built"), tmp_path / f"offline-{offline}")
    for name in os.listdir(tmp_path / "built"):
        assert (tmp_path / "built" / name).read_bytes() == (tmp_path / "offline-True" / name).read_bytes() == \
            (tmp_path / "offline-False" / name).read_bytes(), name

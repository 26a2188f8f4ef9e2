"""One end-to-end CLI run on a few real synthetic clips, then the contracts of what it wrote."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pldistill_cli.cli import app
from pldistill_cli.errors import PldistillError
from pldistill_cli.cache import CACHE_SCHEMA

SMALL = {
    "seed": 7,
    "seeds": [7],
    "methods": ["ce", "pl-distill"],
    "corpora": {"synthetic": {"adapter": "synthetic", "n_speakers": 6, "n_sentences": 1, "n_folds": 3}},
    "pretrain_encoder": {"clips": 24, "epochs": 1, "batch_size": 8},  # the real path, briefly
    "pretrain_teacher": {"voices": 3, "sentences": 1, "validation_voices": 1, "epochs": 1, "batch_size": 8},
    "train_teacher": {"epochs": 2, "batch_size": 8},
    "cache": {"top_k": 4, "batch_size": 8},
    "distill": {"epochs": 2, "batch_size": 8},
}
STAGES = [
    ["pretrain-encoder"],
    ["pretrain-teacher"],
    ["preprocess"],
    ["train-teacher"],
    ["cache-teacher"],
    ["distill", "--method", "ce"],
    ["distill", "--method", "pl-distill"],
    ["evaluate", "--model", "teacher"],
    ["evaluate", "--model", "student", "--method", "ce"],
    ["evaluate", "--model", "student", "--method", "pl-distill"],
    ["evaluate", "--model", "references"],
    ["report"],
]


def cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


AUDIO_READS: dict[str, set[str]] = {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Runs every stage through the CLI, recording which audio files each stage reads."""
    import pldistill_cli.data as data
    import pldistill_cli.cache_teacher as cache_teacher

    readers = (data, cache_teacher)  # the modules that open audio files
    root = tmp_path_factory.mktemp("e2e")
    (root / "params.yaml").write_text(yaml.safe_dump(SMALL))
    cwd, read_audio = os.getcwd(), data.read_audio
    os.chdir(root)
    try:
        for stage in STAGES:
            reads = AUDIO_READS.setdefault(stage[0], set())
            for module in readers:
                module.read_audio = lambda path, *a, _reads=reads: (_reads.add(Path(path).stem), read_audio(path, *a))[1]
            cli(*stage)
        yield root
    finally:
        for module in readers:
            module.read_audio = read_audio
        os.chdir(cwd)


def test_only_evaluate_reads_the_test_split(run_dir):
    import pandas as pd

    manifest = pd.read_parquet(run_dir / "data/prepared/synthetic/manifest.parquet")
    test_ids = set(manifest.loc[manifest["fold"] == 1, "id"])
    for stage in ("train-teacher", "cache-teacher"):
        assert AUDIO_READS[stage] and not AUDIO_READS[stage] & test_ids, stage
    assert not AUDIO_READS["distill"]  # the student trains from the cache alone
    assert test_ids <= AUDIO_READS["evaluate"]


def test_metrics_files_have_the_expected_keys_and_ranges(run_dir):
    folder = run_dir / "metrics/synthetic/fold1"
    for model in ("teacher", "student-ce-s7", "student-pl-distill-s7"):
        metrics = json.loads((folder / f"{model}.json").read_text())  # DVC metrics: only what people compare
        assert set(metrics) == {"test"} and set(metrics["test"]) == {"wa", "ua", "macro_f1"}
        m = json.loads((folder / f"{model}-details.json").read_text())
        assert {"n", "parameters", "model_weights", "params", "recall", "confusion", "ua_ci95", "speakers",
                "versions", "trained_with"} <= set(m)
        assert {k: m[k] for k in ("wa", "ua", "macro_f1")} == pytest.approx(metrics["test"], abs=1e-6)
        assert m["n"] == 16 and m["speakers"] == 2  # two test speakers x 8 emotions x 1 sentence
        for key in ("wa", "ua", "macro_f1"):
            assert 0.0 <= m[key] <= 1.0
        assert m["ua_ci95"][0] <= m["ua"] <= m["ua_ci95"][1]
        assert sum(map(sum, m["confusion"])) == 16 and m["unmatched"] == 0
        latency = json.loads((folder / f"{model}-latency.json").read_text())
        assert latency["encoder_ms"] > 0 and latency["llm_ms"] > 0
    references = json.loads((folder / "references.json").read_text())
    assert set(references) == {"duration", "prosody"} and all(0 <= r["test"]["ua"] <= 1 for r in references.values())
    predictions = __import__("pandas").read_csv(folder / "teacher-predictions.csv")
    details = json.loads((folder / "teacher-details.json").read_text())
    cm = np.array(details["confusion"])  # recomputed from the predictions CSV: WA = trace / n, UA = mean recall
    assert details["wa"] == pytest.approx((predictions["label"] == predictions["prediction"]).mean())
    assert details["wa"] == pytest.approx(np.trace(cm) / cm.sum())
    recalls = [(group["prediction"] == label).mean() for label, group in predictions.groupby("label")]
    assert details["ua"] == pytest.approx(np.mean(recalls))
    report = (run_dir / "report/report.md").read_text()
    for section in ("| teacher |", "| pl-distill |", "| ce |", "| reference: prosody |", "### UA per fold",
                    "### Paired comparisons", "### Are the distillation terms alive?"):
        assert section in report, section
    assert "reference:" in report
    pictures = re.findall(r"!\[.*\]\((.*)\)", report)
    assert len(pictures) == 6 and all((run_dir / "report" / p).stat().st_size > 5_000 for p in pictures)
    page = (run_dir / "report/report.html").read_text()
    assert page.count("<img") == 6 and page.count("data:image/png;base64,") == 6
    assert "http://" not in page and "https://" not in page  # opens offline


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
    assert meta["cache"] == {"attention_layer": -1, "top_k": 4, "temperature": 2.0, "projector_targets": "linear"}
    assert meta["preprocess"]["sample_rate"] == 16000 and "workers" not in meta["preprocess"]
    store = run_dir / meta["encoder"]["store"]  # the encoder output lives once per corpus, keyed by encoder
    assert store.parent == run_dir / "data/encoded/synthetic" and len(meta["encoder"]["weights"]) == 16
    work = run_dir / "data/work/synthetic/fold1"  # finished stages leave no state behind (only their lock files)
    assert not [p for p in work.rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_models_record_what_made_them(run_dir):
    student = json.loads((run_dir / "data/runs/synthetic/fold1/student-pl-distill-s7/pldistill.json").read_text())
    teacher = json.loads((run_dir / "data/runs/synthetic/fold1/teacher/pldistill.json").read_text())
    assert student["teacher"]["weights"] == teacher["weights"]
    assert student["params"]["distill"]["weights"] == {"pl-distill": {"lambda_p": 1.0, "lambda_l": 1.0,
                                                                      "cka_estimator": "biased"}}  # its own only
    assert student["seed"] == 7
    assert student["method"] == "pl-distill"
    before, first = student["history"][:2]  # a probe of every term before training, then each epoch
    assert before["epoch"] == 0 and {"probe_ce", "probe_cka", "probe_kl", "grad_ce", "grad_projector", "grad_kl"} <= set(before)
    assert {"ce", "cka", "kl", "validation_ua", "updates", "probe_cka", "grad_kl"} <= set(first)


def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", "pldistill_cli.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, params_text, message",
    [
        (["preprocess", "--dataset", "nope"], None, "unknown dataset `nope`"),
        (["preprocess", "--dataset", "synthetic", "--root", "/no/such/folder"], None, "dataset root not found"),
        (["distill"], "distill:\n  epochs: [\n", "malformed YAML"),
        (["train-teacher", "--fold", "1"], None, "data/prepared/synthetic: not found; run `pldistill preprocess --dataset synthetic`"),
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
        result = _run(["distill", "--method", "ce"], run_dir)  # as a user sees it: one line, exit 1
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        assert result.returncode == 1 and len(lines) == 1 and "different prompt" in lines[0]
    finally:
        meta_file.write_text(original)


def test_generation_scoring_counts_unmatched_answers(run_dir, monkeypatch):
    from pldistill_cli.config import load_params
    from pldistill_cli.evaluate import evaluate_model
    from pldistill_cli.metrics import UNMATCHED

    monkeypatch.chdir(run_dir)
    params = load_params(Path("params.yaml"))
    import dataclasses

    params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, scoring="generate"))
    result = evaluate_model("synthetic", 1, "teacher", params)
    predictions = __import__("pandas").read_csv(run_dir / "metrics/synthetic/fold1/teacher-predictions.csv",
                                                keep_default_na=False)
    assert "answer" in predictions and result["unmatched"] == int((predictions["prediction"] == UNMATCHED).sum())
    for answer, prediction in zip(predictions["answer"], predictions["prediction"]):
        named = [l for l in result["labels"] if re.search(rf"(?<![A-Za-z]){l}(?![A-Za-z])", answer, re.IGNORECASE)]
        assert prediction == (named[0] if len(named) == 1 else UNMATCHED), answer  # parsed from the answer
    cli("evaluate", "--model", "teacher")  # back to ranking for the other tests


def test_predict_answers_good_files_and_names_bad_ones(run_dir):
    import numpy as np
    import soundfile as sf

    clip = next((run_dir / "data/prepared/synthetic/audio").glob("*spk01*.wav"))
    wave, rate = sf.read(clip)
    sf.write(run_dir / "long.flac", np.tile(wave, 6)[: rate * 10], rate)  # 10 s: three 4 s windows
    (run_dir / "corrupt.wav").write_bytes(b"RIFF not audio")
    sf.write(run_dir / "empty.wav", np.zeros(0), 16000)
    files = [str(clip), "long.flac", "missing.wav", "corrupt.wav", "empty.wav"]
    result = _run(["predict", "--json", *files], run_dir)
    assert result.returncode == 1
    answers = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert answers[clip.name]["label"] in answers[clip.name]["probabilities"]
    assert abs(sum(answers["long.flac"]["probabilities"].values()) - 1) < 1e-5 and answers["long.flac"]["windows"] == 3
    # recomputed: each 4 s window scored on its own, probabilities averaged with weights 4, 4, 2 seconds
    from pldistill_cli.audio import read_audio
    from pldistill_cli.predict import Predictor

    predictor = Predictor(run_dir / "data/runs/synthetic/fold1/student-pl-distill-s7", "cpu")
    long = read_audio(run_dir / "long.flac", 16000)
    windows = [long[:64000], long[64000:128000], long[128000:]]
    from pldistill_cli.forward import audio_features, encode_audio, score_labels

    def scored(window):  # one window alone
        features, mask = audio_features(predictor.processor, [window])
        encoded, lengths = encode_audio(predictor.model, features, mask)
        return score_labels(predictor.model, predictor.prompt, encoded, lengths).softmax(-1)[0].numpy()

    probs = [scored(w) for w in windows]
    expected = (4 * probs[0] + 4 * probs[1] + 2 * probs[2]) / 10
    got = np.array([answers["long.flac"]["probabilities"][l] for l in predictor.prompt.labels])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 3 and all(len(l.split("\n")) == 1 for l in errors)
    assert {answers[n]["error"] for n in ("missing.wav", "corrupt.wav", "empty.wav")} == {
        "file not found", answers["corrupt.wav"]["error"], "empty"}


def test_export_is_a_hub_model_whose_card_snippet_scores_like_predict(run_dir, capsys):
    from pldistill_cli.predict import Predictor

    out = run_dir / "exported"
    for _ in range(2):  # the second export replaces the first (an earlier export)
        cli_result = CliRunner().invoke(app, ["export", "--out", str(out)], catch_exceptions=False)
        assert cli_result.exit_code == 0, cli_result.output
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    metrics = json.loads((run_dir / "metrics/synthetic/fold1/student-pl-distill-s7.json").read_text())["test"]
    assert {"license", "datasets", "metrics", "pipeline_tag", "tags", "model-index"} <= set(front)
    scores = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert scores == pytest.approx({"accuracy": metrics["wa"], "recall": metrics["ua"], "f1": metrics["macro_f1"]},
                                   abs=1e-4)
    labels = json.loads((out / "pldistill.json").read_text())["labels"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    assert config["label2id"] == {label: i for i, label in enumerate(labels)}

    clip = next((run_dir / "data/prepared/synthetic/audio").glob("*spk02*.wav"))
    snippet = card.split("```python\n")[1].split("```")[0]  # exactly the card's lines, run as a user would
    namespace: dict = {}
    exec(snippet.replace("THIS_FOLDER", str(out)).replace('"clip.wav"', repr(str(clip))), namespace)
    exported = Predictor(out, "cpu").predict(clip)
    original = Predictor(run_dir / "data/runs/synthetic/fold1/student-pl-distill-s7", "cpu").predict(clip)
    assert namespace["probabilities"] == pytest.approx(exported.probabilities, abs=1e-4)
    assert exported.probabilities == pytest.approx(original.probabilities, abs=1e-5)
    assert capsys.readouterr().out.startswith(exported.label)
    assert "data/runs" not in card  # the teacher is named by its source, not by a folder on this machine

    # a 10 s, 48 kHz stereo recording (two clips, one per channel): the card's lines mix it down, resample it
    # and score it in encoder windows as `pldistill predict` does
    import soundfile as sf

    from pldistill_cli.audio import read_audio

    other = next((run_dir / "data/prepared/synthetic/audio").glob("*spk03*.wav"))
    left, right = (np.resize(read_audio(c, 48000), 48000 * 10) for c in (clip, other))
    sf.write(run_dir / "stereo-48k.wav", np.stack([left, 0.5 * right], axis=1), 48000)
    exec(snippet.replace("THIS_FOLDER", str(out)).replace('"clip.wav"', repr(str(run_dir / "stereo-48k.wav"))),
         namespace)
    predicted = _run(["predict", "--json", "--model", str(out), "stereo-48k.wav"], run_dir)
    answer = json.loads(predicted.stdout)[0]
    assert answer["windows"] == 3, predicted.stderr  # 4 + 4 + 2 s with the tiny preset's 4 s window
    assert namespace["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-4)


def test_an_interrupted_cache_resumes_to_the_same_rows(run_dir, monkeypatch):
    import shutil

    import pldistill_cli.cache as cache
    import pldistill_cli.cache_teacher as cache_teacher
    from pldistill_cli.config import load_params

    monkeypatch.chdir(run_dir)
    params = load_params(Path("params.yaml"))
    final = run_dir / "data/runs/synthetic/fold1/cache"
    reference = pq.ParquetDataset(sorted(final.glob("part-*.parquet"))).read().to_pandas().set_index("id").sort_index()
    shutil.rmtree(final)
    store = next((run_dir / "data/encoded/synthetic").iterdir())
    shutil.rmtree(store)
    write_part, written = cache.write_part, []

    def dies_after_two(folder, rank, rows, schema):
        if schema is cache.CACHE_SCHEMA and len(written) == 2:
            raise KeyboardInterrupt
        written.append(folder) if schema is cache.CACHE_SCHEMA else None
        return write_part(folder, rank, rows, schema)

    for module in (cache, cache_teacher):
        monkeypatch.setattr(module, "write_part", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.build_cache("synthetic", 1, params)
    assert not final.exists() and len(list((run_dir / "data/work/synthetic/fold1/cache-teacher").glob("part-*"))) == 2
    encoded_before = len(cache.ids_in(store))  # the batch that died had already been encoded
    assert encoded_before == 3 * params.cache.batch_size
    resumed, encoded = [], []

    def counted(f, k, r, schema):
        (resumed if schema is cache.CACHE_SCHEMA else encoded).append(len(r))
        return write_part(f, k, r, schema)

    for module in (cache, cache_teacher):
        monkeypatch.setattr(module, "write_part", counted)
    cache_teacher.build_cache("synthetic", 1, params)
    rebuilt = pq.ParquetDataset(sorted(final.glob("part-*.parquet"))).read().to_pandas().set_index("id").sort_index()
    assert len(resumed) == len(list(final.glob("part-*.parquet"))) - 2  # finished parts were kept
    assert sum(encoded) == len(reference) - encoded_before  # each clip goes through the encoder once
    assert list(rebuilt.index) == list(reference.index)
    for column in ("attention", "topk_logprobs"):
        for a, b in zip(rebuilt[column], reference[column]):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_lora_student_trains_and_saves_as_a_plain_model(run_dir, monkeypatch):
    import dataclasses

    import torch

    from transformers import Qwen2AudioForConditionalGeneration

    from pldistill_cli.config import load_params
    from pldistill_cli.distill import distill

    monkeypatch.chdir(run_dir)
    params = load_params(Path("params.yaml"))
    params = dataclasses.replace(params, distill=dataclasses.replace(params.distill, train_llm="lora", epochs=1))
    distill("synthetic", 1, params, method_name="kd", seed=3)
    saved = run_dir / "data/runs/synthetic/fold1/student-kd-s3"
    model, loading = Qwen2AudioForConditionalGeneration.from_pretrained(saved, output_loading_info=True)
    # every weight of the plain architecture is in the file under its own name (an unmerged peft model would
    # save `base_layer` and `lora_` keys, and those projections would load randomly initialised)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    assert not any("lora" in n for n, _ in model.named_parameters())
    from pldistill_cli.distill import build_student

    processor = __import__("transformers").AutoProcessor.from_pretrained(saved)
    base, _, _ = build_student(params, processor, run_dir / "data/runs/synthetic/fold1/teacher", 3)
    merged, start = model.state_dict(), base.state_dict()
    lora_targets = [n for n in merged if re.search(r"language_model\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj\.weight", n)]
    assert len(lora_targets) == 7 * 2 and all(not torch.equal(merged[n], start[n]) for n in lora_targets)
    frozen = [n for n in merged if "language_model" in n and "norm" in n or "embed_tokens" in n]
    assert frozen and all(torch.equal(merged[n], start[n]) for n in frozen)  # only where LoRA trained
    teacher = Qwen2AudioForConditionalGeneration.from_pretrained(run_dir / "data/runs/synthetic/fold1/teacher")
    for name, value in teacher.model.audio_tower.state_dict().items():
        assert (model.model.audio_tower.state_dict()[name] == value).all(), name


def test_a_gram_cache_gives_the_same_projector_term_as_the_linear_one(run_dir, tmp_path, monkeypatch):
    import dataclasses
    import shutil

    import torch

    from pldistill_cli.config import load_params
    from pldistill_cli.cache import TeacherCache, expected_meta
    from pldistill_cli.cache_teacher import build_cache
    from pldistill_cli.distill import build_student
    from pldistill_cli.layout import Layout
    from pldistill_cli.methods import METHODS
    from pldistill_cli.terms import TargetCollate, Teacher, distillation_terms
    from pldistill_cli.prompt import PromptLayout
    from transformers import AutoProcessor

    monkeypatch.chdir(run_dir)
    params = load_params(Path("params.yaml"))
    gram_params = dataclasses.replace(params, cache=dataclasses.replace(params.cache, projector_targets="gram"))
    gram_layout = Layout(data=tmp_path / "data")
    for part in ("prepared", "runs/synthetic/fold1/teacher"):
        shutil.copytree(run_dir / "data" / part, gram_layout.data / part, symlinks=True)
    build_cache("synthetic", 1, gram_params, gram_layout)

    teacher_dir = Layout().teacher("synthetic", 1)
    processor = AutoProcessor.from_pretrained(teacher_dir)
    labels = tuple(json.loads((teacher_dir / "pldistill.json").read_text())["labels"])
    prompt = PromptLayout.from_processor(processor, labels)
    student, _, _ = build_student(params, processor, teacher_dir, seed=0)
    for method in ("pl-distill", "cka"):
        terms = {}
        for name, layout, settings in (("linear", Layout(), params), ("gram", gram_layout, gram_params)):
            identity = expected_meta(layout.teacher("synthetic", 1), prompt, settings)
            cache = TeacherCache(layout.cache("synthetic", 1), identity, prompt)
            columns = METHODS[method].columns + (("gram",) if name == "gram" else ())
            rows = cache.split("train", columns)
            batch = TargetCollate(prompt)([rows[i] for i in range(4)])
            if name == "gram":  # the stored Gram is Z Z^T of the exact teacher projector output
                z = batch["encoded"][0, : batch["lengths"][0]] @ cache.projector_weight.T + cache.projector_bias
                torch.testing.assert_close(batch["gram"][0, : len(z), : len(z)], z @ z.T, rtol=1e-4, atol=1e-4)
            with torch.no_grad():
                teacher = Teacher.of(cache.projector_weight, cache.projector_bias, 2.0)
                terms[name] = distillation_terms(student, batch, METHODS[method], teacher, 1.0, 1.0)
        assert terms["linear"]["cka"] > 0
        torch.testing.assert_close(terms["gram"]["cka"], terms["linear"]["cka"], rtol=0, atol=1e-5)


def test_refit_retrains_afresh_on_train_and_validation_for_the_chosen_epochs(run_dir, monkeypatch):
    import dataclasses

    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    from pldistill_cli.config import load_params
    from pldistill_cli.distill import distill

    monkeypatch.chdir(run_dir)
    params = load_params(Path("params.yaml"))
    folder = run_dir / "data/runs/synthetic/fold1/student-ce-s21"
    selected = distill("synthetic", 1, params, method_name="ce", seed=21)
    chosen = Qwen2AudioForConditionalGeneration.from_pretrained(folder).lm_head.weight.detach().clone()
    refit = distill("synthetic", 1, dataclasses.replace(params, distill=dataclasses.replace(params.distill, refit=True)),
                    method_name="ce", seed=21)
    assert selected.refit is None and refit.best_epoch == selected.best_epoch  # the same selection run
    assert refit.refit == {"epochs": selected.best_epoch, "clips": 32}  # 16 train + 16 validation clips
    assert not torch.equal(Qwen2AudioForConditionalGeneration.from_pretrained(folder).lm_head.weight, chosen)


def test_a_refit_teacher_retrains_on_train_and_validation(run_dir, monkeypatch, tmp_path):
    import dataclasses
    import shutil

    from pldistill_cli.config import load_params
    from pldistill_cli.layout import Layout
    from pldistill_cli.train_teacher import train_teacher

    monkeypatch.chdir(run_dir)
    params = load_params(Path("params.yaml"))
    layout = Layout(data=tmp_path / "data")
    for made_before in ("prepared", "encoder", "teacher-init"):
        shutil.copytree(run_dir / "data" / made_before, layout.data / made_before)
    params = dataclasses.replace(params, train_teacher=dataclasses.replace(params.train_teacher, refit=True))
    made = train_teacher("synthetic", 1, params, layout)
    assert made.refit == {"epochs": made.best_epoch, "clips": 32}  # 16 train + 16 validation clips


def test_with_a_label_fraction_ce_trains_on_the_labelled_clips_and_kd_on_every_clip(run_dir, monkeypatch):
    """label_fraction 0.25 of 2 training clips per class keeps 1 per class (at least one): 8 of the 16. With refit,
    `ce` retrains on those and the 16 validation clips; `kd` on all 32 (its KL reads the unlabelled ones too)."""
    import dataclasses

    from pldistill_cli.config import load_params
    from pldistill_cli.distill import distill

    monkeypatch.chdir(run_dir)
    params = load_params(Path("params.yaml"))
    scarce = dataclasses.replace(params, distill=dataclasses.replace(params.distill, refit=True, label_fraction=0.25))
    ce, kd = (distill("synthetic", 1, scarce, method_name=method, seed=23) for method in ("ce", "kd"))
    assert ce.refit["clips"] == 8 + 16 and kd.refit["clips"] == 16 + 16
    assert ce.params["distill"]["label_fraction"] == kd.params["distill"]["label_fraction"] == 0.25

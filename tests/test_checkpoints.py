"""Real checkpoints (`model.preset: hub`) through the code path that loads them, with tiny folders
on disk: a teacher whose vocabulary is larger than the student's, and a student LLM with tied
embeddings and a tokenizer without the audio tokens (as Qwen2-0.5B-Instruct is)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, Qwen2AudioForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from pldistill_cli.checkpoints import load_student_llm, resolve_checkpoint
from pldistill_cli.config import ModelParams, TrainTeacherParams
from pldistill_cli.distill import build_student, distill
from pldistill_cli.errors import PldistillError
from pldistill_cli.evaluate import evaluate_model
from pldistill_cli.models import (AUDIO_TOKEN, add_lora, build_teacher, build_tokenizer,
                                  count_parameters, get_preset, load_model)
from pldistill_cli.checkpoints import weights_fingerprint
from pldistill_cli.pretrain_encoder import pretrain_encoder
from pldistill_cli.train_teacher import train_teacher
from pldistill_cli.cache import TeacherCache
from pldistill_cli.cache_teacher import build_cache

TEACHER_VOCAB, STUDENT_VOCAB = 448, 416  # both beyond their tokenizers (384 and 381 tokens)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    tiny = get_preset("tiny")
    teacher, processor = build_teacher(dataclasses.replace(tiny, teacher_llm={**tiny.teacher_llm,
                                                                              "vocab_size": TEACHER_VOCAB}), 0)
    teacher.save_pretrained(root / "teacher")
    processor.save_pretrained(root / "teacher")
    torch.manual_seed(1)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=STUDENT_VOCAB, tie_word_embeddings=True, **tiny.student_llm))
    llm.save_pretrained(root / "llm")
    build_tokenizer(tiny.vocab_size, audio_tokens=False).save_pretrained(root / "llm")
    return root


def hub_params(params, root, mode="lora"):
    return dataclasses.replace(
        params,
        model=ModelParams(preset="hub", teacher=str(root / "teacher"), student_llm=str(root / "llm")),
        train_teacher=TrainTeacherParams(mode=mode, epochs=1, batch_size=8),
        distill=dataclasses.replace(params.distill, train_llm="lora"),
    )


@pytest.fixture(scope="module")
def hub_run(prepared, checkpoints):
    """train-teacher (LoRA) -> cache-teacher -> distill (LoRA student) -> evaluate, on the real-checkpoint path."""
    params, layout = prepared
    layout = dataclasses.replace(layout, data=layout.data.parent / "hub-data")
    layout.data.mkdir()
    (layout.data / "prepared").symlink_to(prepared[1].data / "prepared")
    params = hub_params(params, checkpoints)
    pretrain_encoder(params, layout)  # with a real checkpoint: only the record that its encoder is used
    train_teacher("synthetic", 1, params, layout)
    build_cache("synthetic", 1, params, layout)
    distill("synthetic", 1, params, layout, "pl-distill")
    return params, layout


def test_a_lora_teacher_is_its_adapter_and_a_reference_to_the_checkpoint(hub_run, checkpoints):
    params, layout = hub_run
    folder = layout.teacher("synthetic", 1)
    made = json.loads((folder / "pldistill.json").read_text())
    assert made["base"]["revision"] == weights_fingerprint(checkpoints / "teacher")
    assert (folder / "adapter_config.json").exists() and not (folder / "config.json").exists()
    teacher, _ = load_model(folder)
    original = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoints / "teacher")
    for name, value in original.model.audio_tower.state_dict().items():  # LoRA never touched the encoder
        assert torch.equal(teacher.model.audio_tower.state_dict()[name], value), name
    changed = [n for n, v in original.model.language_model.state_dict().items()
               if not torch.equal(teacher.model.language_model.state_dict()[n], v)]
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    layers = teacher.config.text_config.num_hidden_layers
    # the merged adapter moved exactly the listed projections of every LLM layer
    assert sorted(changed) == sorted(f"layers.{i}.{m}.weight" for i in range(layers) for m in modules)


def test_lora_reaches_exactly_the_listed_llm_modules_of_the_teacher(checkpoints):
    teacher = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoints / "teacher")
    add_lora(teacher, projector="frozen")
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    layers = teacher.config.text_config.num_hidden_layers
    assert len(trainable) == layers * 7 * 2  # q, k, v, o, gate, up, down x (A, B)
    assert all("language_model.layers." in n and ".lora_" in n for n in trainable)
    assert not any("audio_tower" in n or "projector" in n for n in trainable)


def test_student_from_an_llm_folder_with_tied_embeddings(hub_run, checkpoints):
    params, layout = hub_run
    teacher_dir = layout.teacher("synthetic", 1)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(teacher_dir)
    student, origin, _ = build_student(params, processor, teacher_dir, seed=0)
    llm = Qwen2ForCausalLM.from_pretrained(checkpoints / "llm")
    embed = student.model.language_model.embed_tokens.weight
    assert student.lm_head.weight is embed  # tied as in the LLM, counted once
    assert count_parameters(student) == (count_parameters(llm) + count_parameters(student.model.audio_tower)
                                         + count_parameters(student.model.multi_modal_projector))
    audio_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, "<|audio_bos|>", "<|audio_eos|>")]
    assert origin["initialised_rows"] == audio_ids
    known = sorted(AutoTokenizer.from_pretrained(checkpoints / "llm").get_vocab().values())
    mean = llm.model.embed_tokens.weight[known].mean(0)
    for i in audio_ids:
        torch.testing.assert_close(embed[i], mean)
    others = [i for i in range(STUDENT_VOCAB) if i not in audio_ids]
    assert torch.equal(embed[others], llm.model.embed_tokens.weight[others])

    saved = layout.student("synthetic", 1, "student-pl-distill-s42")  # trained by hub_run, saved untied
    plain = Qwen2AudioForConditionalGeneration.from_pretrained(saved)
    assert torch.equal(plain.lm_head.weight, plain.model.language_model.embed_tokens.weight)
    assert plain.config.text_config.vocab_size == STUDENT_VOCAB


def test_the_cache_feeds_a_smaller_student_vocabulary(hub_run):
    import pyarrow.parquet as pq

    params, layout = hub_run
    ids = [i for part in sorted(layout.cache("synthetic", 1).glob("part-*.parquet"))
           for row in pq.read_table(part, columns=["topk_ids"]).column("topk_ids").to_pylist() for i in row]
    # the teacher's top-k reaches ids the student has no row for: the KL's drop-and-renormalise path runs
    assert STUDENT_VOCAB <= max(ids) < TEACHER_VOCAB
    result = evaluate_model("synthetic", 1, "student", params, layout, "pl-distill")
    assert result["parameters"] > 0 and 0 <= result["ua"] <= 1
    made = json.loads((layout.student("synthetic", 1, "student-pl-distill-s42") / "pldistill.json").read_text())
    kl = [h["kl"] for h in made["history"] if "kl" in h]
    assert kl and all(0 < k < float("inf") for k in kl)


def test_every_output_records_the_checkpoint_revisions(hub_run, checkpoints):
    params, layout = hub_run
    teacher_revision = {"source": str(checkpoints / "teacher"), "revision": weights_fingerprint(checkpoints / "teacher")}
    llm_revision = weights_fingerprint(checkpoints / "llm")
    cache_meta = json.loads((layout.cache("synthetic", 1) / "meta.json").read_text())
    student = json.loads((layout.student("synthetic", 1, "student-pl-distill-s42") / "pldistill.json").read_text())
    assert cache_meta["teacher"]["checkpoint"] == teacher_revision
    assert student["teacher"]["checkpoint"] == teacher_revision and student["student_llm"]["revision"] == llm_revision
    scored = evaluate_model("synthetic", 1, "teacher", params, layout)["checkpoints"]
    assert scored["checkpoint"] == teacher_revision


def test_the_cache_refuses_a_student_encoder_that_is_not_the_teachers_or_trains(hub_run):
    from transformers import AutoProcessor

    from pldistill_cli.prompt import PromptLayout
    from pldistill_cli.datasets import CORPORA
    from pldistill_cli.cache import expected_meta

    params, layout = hub_run
    teacher_dir = layout.teacher("synthetic", 1)
    processor = AutoProcessor.from_pretrained(teacher_dir)
    prompt = PromptLayout.from_processor(processor, CORPORA["synthetic"].labels)
    cache = TeacherCache(layout.cache("synthetic", 1), expected_meta(teacher_dir, prompt, params), prompt)
    student, _, stored = build_student(params, processor, teacher_dir, seed=0)
    encoder = student.model.audio_tower
    cache.check_student_encoder(encoder, stored)
    encoder.requires_grad_(True)
    with pytest.raises(PldistillError, match="encoder is trainable"):
        cache.check_student_encoder(encoder, stored)
    encoder.requires_grad_(False)
    other = {k: v + 1e-3 if k == "conv1.weight" else v for k, v in stored.items()}
    with pytest.raises(PldistillError, match="not this student's encoder"):  # other stored weights
        cache.check_student_encoder(encoder, other)
    with torch.no_grad():
        encoder.conv1.weight.add_(1e-3)
    with pytest.raises(PldistillError, match="not this student's encoder"):  # the module changed since it was built
        cache.check_student_encoder(encoder, stored)


def test_a_zero_shot_teacher_is_the_checkpoint_as_is(prepared, checkpoints, tmp_path):
    params, layout = prepared
    layout = dataclasses.replace(layout, data=tmp_path / "data")
    layout.data.mkdir()
    (layout.data / "prepared").symlink_to(prepared[1].data / "prepared")
    pretrain_encoder(hub_params(params, checkpoints, "zero-shot"), layout)
    train_teacher("synthetic", 1, hub_params(params, checkpoints, "zero-shot"), layout)
    teacher, _ = load_model(layout.teacher("synthetic", 1))
    original = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoints / "teacher")
    for name, value in original.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


def test_tokenizers_that_disagree_are_refused(checkpoints, tmp_path):
    import shutil

    shutil.copytree(checkpoints / "llm", tmp_path / "llm")
    spec = json.loads((tmp_path / "llm/tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: the same tokens, other ids
    (tmp_path / "llm/tokenizer.json").write_text(json.dumps(spec))
    teacher_tokenizer = AutoTokenizer.from_pretrained(checkpoints / "teacher")
    with pytest.raises(PldistillError, match="must share the teacher's tokenizer"):
        load_student_llm(str(tmp_path / "llm"), "main", teacher_tokenizer)


@pytest.mark.parametrize("source, message", [
    ("/no/such/folder", "neither a folder nor a hub id"),
    ("nobody-here/no-such-model-xyz", "could not be fetched"),
])
def test_a_wrong_model_id_or_path_is_one_error_line(source, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never touch the network
    with pytest.raises(PldistillError, match=message) as error:
        resolve_checkpoint(source, "main", "model.teacher")
    assert "\n" not in str(error.value)


def test_a_checkpoint_of_another_architecture_fails_the_cli_with_one_line(prepared, checkpoints, tmp_path):
    import yaml

    params, layout = prepared
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(layout.data / "prepared")
    settings = {"corpora": {"synthetic": {"adapter": "synthetic", "n_speakers": 6, "n_sentences": 1, "n_folds": 3}},
                "model": {"preset": "hub", "teacher": str(checkpoints / "llm")}, "train_teacher": {"mode": "zero-shot"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    for stage in ("pretrain-encoder", "pretrain-teacher", "train-teacher"):
        result = subprocess.run([sys.executable, "-m", "pldistill_cli", stage], cwd=tmp_path, text=True,
                                capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "a `qwen2` checkpoint, expected qwen2_audio" in result.stderr

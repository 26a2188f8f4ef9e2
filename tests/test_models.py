"""The tiny presets are the real architecture: save/load, student assembly, and the shared forward paths."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pldistill_cli.errors import PldistillError
from pldistill_cli.prompt import PromptLayout
from pldistill_cli.forward import (audio_features, capture_audio_attention, encode_audio,
                                   forward_from_encoder, score_labels, step_mask)
from pldistill_cli.datasets import CORPORA
from pldistill_cli.models import (TeacherMeta, assemble_student, build_student_llm, build_teacher, count_parameters, get_preset,
                                  load_encoder, load_model, save_model)

LABELS = CORPORA["synthetic"].labels


def _waves(seconds=(1.0, 2.5, 1.7)):
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in seconds]


def _right_padded(prompt, lengths, extra=()):
    seqs = [prompt.prompt_ids(int(t)) + list(extra) for t in lengths]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), prompt.pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


def test_forward_from_encoder_equals_the_models_own_forward(tiny_teacher):
    model, processor = tiny_teacher
    prompt = PromptLayout.from_processor(processor, LABELS)
    waves = _waves()
    inputs = processor(text=[prompt.text] * 3, audio=waves, sampling_rate=16000, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**inputs).logits
        features, mask = audio_features(processor, waves)
        encoded, lengths = encode_audio(model, features, mask)
        ids, attn = _right_padded(prompt, lengths)
        logits, _, _ = forward_from_encoder(model, encoded, lengths, ids, attn)
    for i in range(3):
        assert inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist() == ids[i][attn[i].bool()].tolist()
        torch.testing.assert_close(logits[i][attn[i].bool()], reference[i][inputs["attention_mask"][i].bool()])


def test_label_scores_equal_brute_force_answer_likelihoods(tiny_teacher):
    model, processor = tiny_teacher
    prompt = PromptLayout.from_processor(processor, LABELS)
    with torch.no_grad():
        encoded, lengths = encode_audio(model, *audio_features(processor, _waves()))
        scores = score_labels(model, prompt, encoded, lengths)
        for i in range(len(lengths)):
            for j, answer in enumerate(prompt.answers):
                ids, attn = _right_padded(prompt, lengths[i : i + 1], answer)
                logits, _, _ = forward_from_encoder(model, encoded[i : i + 1], lengths[i : i + 1], ids, attn)
                logp = logits[0].log_softmax(-1)
                start = len(ids[0]) - len(answer)
                expected = sum(logp[start - 1 + n, tok] for n, tok in enumerate(answer))
                assert torch.isclose(scores[i, j], expected, atol=1e-4)
    assert any(len(a) > 2 for a in prompt.answers), "multi-token label words are exercised"


@pytest.mark.parametrize("layer", [0, -1, "mean"])
def test_attention_capture_equals_eager_attention_at_that_layer(tiny_teacher, layer):
    model, processor = tiny_teacher
    prompt = PromptLayout.from_processor(processor, LABELS)
    with torch.no_grad():
        encoded, lengths = encode_audio(model, *audio_features(processor, _waves()))
        ids, attn = _right_padded(prompt, lengths, prompt.answers[0])
        pos = torch.arange(ids.shape[1])[None]
        audio = ids == prompt.audio_token_id
        prompt_len = torch.tensor([len(prompt.prompt_ids(int(t))) for t in lengths])
        queries = (pos >= len(prompt.prefix) + lengths[:, None]) & (pos < prompt_len[:, None])
        with capture_audio_attention(model, layer, queries, audio, attn) as captured:
            forward_from_encoder(model, encoded, lengths, ids, attn)
        model.set_attn_implementation("eager")
        try:
            projected = model.model.multi_modal_projector(encoded)[step_mask(lengths, encoded.shape[1])]
            embeds = model.model.get_input_embeddings()(ids).masked_scatter(audio[..., None], projected)
            out = model.model.language_model(inputs_embeds=embeds, attention_mask=attn,
                                             position_ids=(attn.cumsum(-1) - 1).clamp(min=0), output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
    weights = captured["weights"]
    layers = range(len(out.attentions)) if layer == "mean" else [layer]
    for i in range(3):
        per_layer = []
        for n in layers:  # each layer's weights renormalised over the audio keys, then averaged over layers
            expected = out.attentions[n][i][:, queries[i]].mean(0).mean(0) * audio[i]
            per_layer.append(expected / expected.sum())
        torch.testing.assert_close(weights[i], torch.stack(per_layer).mean(0), atol=1e-6, rtol=1e-5)
        assert torch.isclose(weights[i][audio[i]].sum(), torch.tensor(1.0))


META = TeacherMeta(dataset="synthetic", fold=1, labels=LABELS, prompt="prompt", preset="tiny", seed=0, params={}, versions={},
                   mode="full")


def test_student_assembly_from_a_saved_teacher(tiny_teacher, tmp_path):
    teacher, processor = tiny_teacher
    save_model(teacher, processor, tmp_path / "teacher", META)
    config, weights, audio_token = load_encoder(tmp_path / "teacher")
    preset = get_preset("tiny")
    student = assemble_student(config, weights, audio_token, build_student_llm(preset, len(processor.tokenizer), 1), 1)
    for name, value in teacher.model.audio_tower.state_dict().items():
        torch.testing.assert_close(student.model.audio_tower.state_dict()[name], value)
    assert not any(p.requires_grad for p in student.model.audio_tower.parameters())
    assert student.model.multi_modal_projector.linear.weight.requires_grad
    assert student.config.text_config.hidden_size < teacher.config.text_config.hidden_size
    assert student.model.multi_modal_projector.linear.out_features == preset.student_llm["hidden_size"]
    assert count_parameters(student) < count_parameters(teacher)

    save_model(student, processor, tmp_path / "student", META)
    reloaded, reloaded_processor = load_model(tmp_path / "student")
    assert isinstance(reloaded, Qwen2AudioForConditionalGeneration)
    assert reloaded_processor.chat_template == processor.chat_template
    prompt = PromptLayout.from_processor(reloaded_processor, LABELS)
    assert prompt == PromptLayout.from_processor(processor, LABELS)
    with torch.no_grad():
        a = score_labels(student.eval(), prompt, *encode_audio(student, *audio_features(processor, _waves())))
        b = score_labels(reloaded, prompt, *encode_audio(reloaded, *audio_features(reloaded_processor, _waves())))
    torch.testing.assert_close(a, b)
    assert AutoProcessor.from_pretrained(tmp_path / "student").feature_extractor.chunk_length == 4


def test_count_parameters_counts_shared_storage_once():
    layer = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(layer, torch.nn.Linear(4, 4, bias=False))
    model[1].weight = layer.weight
    assert count_parameters(model) == 16


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(PldistillError, match="config.json missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(PldistillError, match="expected qwen2_audio"):
        load_model(tmp_path)


def test_cached_encoder_output_and_projector_weights_reproduce_the_teacher_targets(tiny_teacher):
    """The compact PDist target (encoder output X plus the projector's W, b) gives the teacher's
    projector output exactly, so AW-CKA from the cache equals AW-CKA from full teacher features."""
    from pldistill_cli.losses import aw_cka

    teacher, processor = tiny_teacher
    with torch.no_grad():
        encoded, lengths = encode_audio(teacher, *audio_features(processor, _waves()))
        full = teacher.model.multi_modal_projector(encoded)
        linear = teacher.model.multi_modal_projector.linear
        compact = encoded @ linear.weight.T + linear.bias
    torch.testing.assert_close(compact, full, rtol=1e-6, atol=1e-6)
    mask = step_mask(lengths, encoded.shape[1])
    student_features = torch.randn(3, encoded.shape[1], 32)
    weights = torch.rand(3, encoded.shape[1])
    torch.testing.assert_close(aw_cka(student_features, compact, weights, mask),
                               aw_cka(student_features, full, weights, mask), rtol=0, atol=1e-6)


def test_small_preset_keeps_the_papers_proportions():
    preset = get_preset("small")
    teacher, processor = build_teacher(preset, 0)
    student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                               teacher.config.audio_token_index,
                               build_student_llm(preset, len(processor.tokenizer), 0), 0)
    ratio = count_parameters(teacher) / count_parameters(student)
    encoder_share = count_parameters(student.model.audio_tower) / count_parameters(student)
    assert 7.0 < ratio < 8.2 and 0.5 < encoder_share < 0.62  # paper: about 7.6 and 0.56
    assert processor.feature_extractor.chunk_length == 30 and teacher.config.audio_config.max_source_positions == 1500


@pytest.mark.parametrize("projector", ["full", "lora"])
def test_lora_reaches_every_llm_projection_and_never_the_encoder(tiny_teacher, projector):
    from pldistill_cli.models import add_lora

    teacher, processor = tiny_teacher
    student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                               teacher.config.audio_token_index,
                               build_student_llm(get_preset("tiny"), len(processor.tokenizer), 0), 0)
    wrapped = add_lora(student, projector=projector)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert not any("audio_tower" in n for n in trainable)
    assert not any("lora" in n for n, _ in student.model.audio_tower.named_parameters())
    layers = student.config.text_config.num_hidden_layers
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        for ab in ("lora_A", "lora_B"):
            assert sum(f".{module}.{ab}." in n for n in trainable) == layers, (module, ab)
    on_projector = [n for n in trainable if "multi_modal_projector" in n]
    if projector == "full":
        assert len(on_projector) == 2 and all("modules_to_save" in n for n in on_projector)
    else:
        assert len(on_projector) == 2 and all("lora_" in n for n in on_projector)
    assert len(trainable) == layers * 7 * 2 + 2


def test_a_merged_lora_student_scores_after_reloading_as_it_did_in_memory(tiny_teacher, tmp_path):
    from pldistill_cli.datasets import CORPORA
    from pldistill_cli.models import add_lora

    teacher, processor = tiny_teacher
    student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                               teacher.config.audio_token_index,
                               build_student_llm(get_preset("tiny"), len(processor.tokenizer), 1), 1)
    lora = add_lora(student, 4, 16, 0.0)
    with torch.no_grad():  # stand-in for training: move every LoRA B matrix off zero
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompt = PromptLayout.from_processor(processor, CORPORA["synthetic"].labels)
    encoded = torch.randn(2, 6, teacher.config.audio_config.d_model, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([6, 4])
    student.eval()
    with torch.no_grad():
        in_memory = score_labels(student, prompt, encoded, lengths)
    lora.merge_and_unload()
    save_model(student, processor, tmp_path / "student", META)
    reloaded, _ = load_model(tmp_path / "student")
    with torch.no_grad():
        torch.testing.assert_close(score_labels(reloaded, prompt, encoded, lengths), in_memory, rtol=1e-5, atol=1e-5)


def test_spec_augment_masks_only_real_frames_and_is_off_by_default():
    from pldistill_cli.data import spec_augment

    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 16, 50, generator=g)
    mask = torch.zeros(3, 50, dtype=torch.long)
    for i, n in enumerate((50, 30, 12)):
        mask[i, :n] = 1
    assert torch.equal(spec_augment(features, mask), features)
    out = spec_augment(features, mask, time_masks=2, time_mask_frames=8, freq_masks=2, freq_mask_bins=4,
                       generator=torch.Generator().manual_seed(1))
    changed = out != features
    assert changed.any() and not changed[~mask.bool()[:, None, :].expand_as(changed)].any()  # padding untouched
    for i, n in enumerate((50, 30, 12)):
        mean = features[i, :, :n].mean()
        torch.testing.assert_close(out[i][changed[i]], mean.expand(int(changed[i].sum())))
        frames = changed[i].all(0)[:n].sum()  # whole masked frames: at most 2 spans of 8
        bins = changed[i][:, :n].all(1).sum()  # whole masked bands: at most 2 of 4 bins
        assert frames <= 16 and bins <= 8

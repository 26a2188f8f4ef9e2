"""A second family of audio LLMs, defined here in one class (FramesAudio: raw 10 ms frames, a two-layer
strided conv encoder, a linear projector, a Qwen2 LLM), registered, and run through every model-facing step
of the pipeline: what cache-teacher computes of a clip, a distillation step's terms, evaluate's label
scoring, building and loading. The proof that a new family is one module; and an unknown model_type is a
one-line error."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2Model

from pldistill_cli.data import text_batch
from pldistill_cli.errors import PldistillError
from pldistill_cli import families
from pldistill_cli.families import AudioLLM, family_of, register
from pldistill_cli.families.qwen2_llm import Qwen2Decoder
from pldistill_cli.forward import (audio_features, audio_steps, encode_audio, forward_from_encoder,
                                   forward_with_audio_attention, score_labels, step_mask, topk_from_hidden)
from pldistill_cli.datasets import CORPORA
from pldistill_cli.losses import topk_logprobs
from pldistill_cli.methods import METHODS
from pldistill_cli.models import (PRESETS, Preset, add_lora, assemble_student, build_student_llm, build_teacher,
                                  load_encoder, load_model)
from pldistill_cli.terms import TargetCollate, Teacher, distillation_terms

LABELS = CORPORA["synthetic"].labels
RATE = 16000


class FramesEncoderConfig(PretrainedConfig):
    model_type = "frames_encoder"

    def __init__(self, frame: int = 160, d_model: int = 48, **kwargs):
        super().__init__(**kwargs)
        self.frame, self.d_model = frame, d_model


class FramesAudioConfig(PretrainedConfig):
    model_type = "frames_audio"

    def __init__(self, encoder: dict | None = None, llm: dict | None = None, audio_token_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.llm, self.audio_token_id = encoder or {}, llm or {}, audio_token_id


class FramesAudioModel(PreTrainedModel):
    """Encoder: frames [B, frame, F] -> two convs of stride 2 -> X [B, T, d]; then Z = X W^T + b, a Qwen2 LLM."""

    config_class = FramesAudioConfig

    def __init__(self, config: FramesAudioConfig):
        super().__init__(config)
        enc, llm = FramesEncoderConfig(**config.encoder), Qwen2Config(**config.llm)
        conv = [torch.nn.Conv1d(enc.frame, enc.d_model, 3, 2, 1), torch.nn.GELU(),
                torch.nn.Conv1d(enc.d_model, enc.d_model, 3, 2, 1)]
        self.encoder = torch.nn.Sequential(*conv)
        self.projector = torch.nn.Linear(enc.d_model, llm.hidden_size)
        self.language_model = Qwen2Model(llm)
        self.lm_head = torch.nn.Linear(llm.hidden_size, llm.vocab_size, bias=False)
        self.post_init()


class FramesProcessor:
    """The tokenizer and chat template of a preset; the audio features are its raw samples in 10 ms frames."""

    def __init__(self, tokenizer, window_seconds: int, chat_template: str):
        self.tokenizer, self.window_seconds, self.chat_template = tokenizer, window_seconds, chat_template

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


def _dict(config) -> dict:
    return config if isinstance(config, dict) else config.to_dict()


class FramesAudio(Qwen2Decoder, AudioLLM):
    name = "frames audio (a test family)"
    model_types = ("frames_audio",)
    encoder_types = ("frames_encoder",)
    processor_class = FramesProcessor
    model_class = FramesAudioModel
    encoder_prefix = "encoder."
    lora_targets = r"language_model\.layers\.\d+\.self_attn\.(q|v)_proj"
    projector_lora = r"projector"
    projector_name = "projector"

    def audio_features(self, processor, waves):
        window = processor.window_seconds * RATE
        samples = torch.zeros(len(waves), window)
        for i, wave in enumerate(waves):
            samples[i, : min(len(wave), window)] = torch.from_numpy(wave[:window])
        lengths = torch.tensor([min(len(w), window) for w in waves])
        frames = samples.view(len(waves), window // 160, 160).transpose(1, 2)
        return frames, (torch.arange(window // 160)[None] * 160 < lengths[:, None]).long()

    def audio_steps(self, feature_mask):
        once = (feature_mask.sum(-1) - 1) // 2 + 1
        return (once - 1) // 2 + 1

    def encoder_config(self, config):
        return FramesEncoderConfig(**config.encoder)

    def audio_token_id(self, config) -> int:
        return config.audio_token_id

    def new_encoder_config(self, spec, window_seconds):
        return FramesEncoderConfig(**spec)

    def new_processor(self, window_seconds, tokenizer, chat_template):
        return FramesProcessor(tokenizer, window_seconds, chat_template)

    def assemble(self, encoder_config, llm_config, audio_token_id):
        return FramesAudioModel(FramesAudioConfig(_dict(encoder_config), _dict(llm_config), audio_token_id))

    def encoder(self, model):
        return model.encoder

    def projector(self, model):
        return model.projector

    def llm(self, model):
        return model.language_model

    def head(self, model):
        return model.lm_head

    def encode(self, model, features, feature_mask):
        encoded = model.encoder(features).transpose(1, 2)
        return encoded, self.audio_steps(feature_mask).to(encoded.device)


TINY = PRESETS["tiny"]
PRESET = Preset("frames", 2, dict(frame=160, d_model=48), TINY.teacher_llm, TINY.student_llm, family="frames_audio")


@pytest.fixture
def frames(monkeypatch):
    """The test family, registered for one test only, and its teacher built from PRESET."""
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    family = register(FramesAudio())
    model, processor = build_teacher(PRESET, seed=0)
    return family, model.eval(), processor


def _waves(seconds=(0.6, 1.9, 1.2, 3.0)):
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(RATE * s))).astype(np.float32) for s in seconds]


@torch.no_grad()
def _cache_teacher(model, processor, prompt):
    """What cache-teacher computes of each clip, through the same calls: X, lengths, text, hidden states,
    attention over the audio steps, top-k log-probabilities."""
    features, mask = audio_features(processor, _waves())
    encoded, lengths = encode_audio(model, features, mask)
    text = text_batch(prompt, lengths.tolist(), [LABELS[i] for i in range(len(lengths))])
    hidden, weights = forward_with_audio_attention(model, prompt, encoded, lengths, text.input_ids,
                                                   text.attention_mask, -1, logits=False)
    top = topk_from_hidden(family_of(model).head(model), hidden[:, :-1], 4, 2.0)
    return features, mask, encoded, lengths, text, hidden, weights, top


def test_the_test_family_is_found_by_model_config_and_processor(frames):
    family, model, processor = frames
    assert family_of(model) is family_of(model.config) is family_of(processor) is family_of("frames_encoder") is family
    assert family_of("qwen2_audio") is not family
    assert isinstance(model, FramesAudioModel)
    assert model.config.audio_token_id == processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")


def test_cache_teachers_steps_run_through_the_family(frames):
    family, model, processor = frames
    prompt = family.prompt(processor, LABELS)
    features, mask, encoded, lengths, text, hidden, weights, (top_ids, top_lp) = _cache_teacher(model, processor,
                                                                                                prompt)
    assert features.shape == (4, 160, 200)
    assert mask.sum(-1).tolist() == [60, 190, 120, 200]  # 3.0 s cut to the 2 s window
    assert lengths.tolist() == [15, 48, 30, 50] == audio_steps(mask, processor).tolist()
    assert encoded.shape == (4, 50, 48) and family.projector(model).in_features == 48
    # the projector output that forward_from_encoder places in the audio slots is X W^T + b
    _, projected, _ = forward_from_encoder(model, encoded, lengths, text.input_ids, text.attention_mask)
    torch.testing.assert_close(projected, encoded @ model.projector.weight.T + model.projector.bias)
    for i, w in enumerate(weights):
        assert w.shape == (lengths[i],) and (w >= 0).all() and torch.isclose(w.sum(), torch.tensor(1.0))
    logits = model.lm_head(hidden[:, :-1])
    expected_ids, expected_lp = topk_logprobs(logits, 4, 2.0)
    torch.testing.assert_close(top_lp, expected_lp)
    assert torch.equal(top_ids, expected_ids)


def test_the_captured_attention_is_the_last_layers_eager_attention(frames):
    family, model, processor = frames
    prompt = family.prompt(processor, LABELS)
    _, _, encoded, lengths, text, _, weights, _ = _cache_teacher(model, processor, prompt)
    ids, attn = text.input_ids, text.attention_mask
    audio = ids == prompt.audio_token_id
    pos = torch.arange(ids.shape[1])[None]
    prompt_len = torch.tensor([len(prompt.prompt_ids(int(t))) for t in lengths])
    queries = (pos >= len(prompt.prefix) + lengths[:, None]) & (pos < prompt_len[:, None])
    model.language_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            z = model.projector(encoded)[step_mask(lengths, encoded.shape[1])]
            embeds = model.language_model.embed_tokens(ids).masked_scatter(audio[..., None], z)
            out = model.language_model(inputs_embeds=embeds, attention_mask=attn,
                                       position_ids=(attn.cumsum(-1) - 1).clamp(min=0), output_attentions=True)
    finally:
        model.language_model.set_attn_implementation("sdpa")
    for i in range(len(lengths)):
        expected = out.attentions[-1][i][:, queries[i]].mean(0).mean(0)[audio[i]]
        torch.testing.assert_close(weights[i], expected / expected.sum(), atol=1e-6, rtol=1e-5)


def test_a_distillation_step_of_a_student_of_the_family(frames):
    family, teacher, processor = frames
    prompt = family.prompt(processor, LABELS)
    _, _, encoded, lengths, text, _, weights, (top_ids, top_lp) = _cache_teacher(teacher, processor, prompt)
    student = assemble_student(family.encoder_config(teacher.config), family.encoder(teacher).state_dict(),
                               family.audio_token_id(teacher.config),
                               build_student_llm(PRESET, len(processor.tokenizer), 1), 1)
    assert isinstance(student, FramesAudioModel) and not any(p.requires_grad for p in student.encoder.parameters())
    assert torch.equal(student.encoder[0].weight, teacher.encoder[0].weight)
    items = []
    for i, t in enumerate(lengths.tolist()):
        s = int(text.attention_mask[i].sum())
        items.append({"index": i, "label": LABELS[i], "input_ids": text.input_ids[i, :s], "encoded": encoded[i, :t],
                      "attention": weights[i], "topk_ids": top_ids[i, : s - 1], "topk_logprobs": top_lp[i, : s - 1]})
    batch = TargetCollate(prompt)(items)
    projector = family.projector(teacher)
    cached = Teacher.of(projector.weight.detach(), projector.bias.detach(), 2.0)
    terms = distillation_terms(student, batch, METHODS["pl-distill"], cached, 0.5, 0.25)
    assert torch.isclose(terms["loss"], terms["ce"] + 0.5 * (1 - terms["cka"]) + 0.25 * terms["kl"])
    assert 0 < terms["cka"] <= 1 and terms["kl"] > 0 and terms["ce"] > 0
    terms["loss"].backward()
    assert student.projector.weight.grad.abs().sum() > 0
    assert student.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_label_scores_of_the_family_equal_brute_force_answer_likelihoods(frames):
    family, model, processor = frames
    prompt = family.prompt(processor, LABELS)
    with torch.no_grad():
        encoded, lengths = encode_audio(model, *audio_features(processor, _waves()))
        scores = score_labels(model, prompt, encoded, lengths)
        for i, steps in enumerate(lengths.tolist()):
            asked = prompt.prompt_ids(steps)
            for j, answer in enumerate(prompt.answers):
                ids = torch.tensor([asked + list(answer)])
                logits, _, _ = forward_from_encoder(model, encoded[i : i + 1], lengths[i : i + 1], ids,
                                                    torch.ones_like(ids))
                predicted = logits[0, len(asked) - 1 : -1].log_softmax(-1)  # what each answer token is predicted from
                assert torch.isclose(scores[i, j], predicted.gather(1, torch.tensor(answer)[:, None]).sum(), atol=1e-4)


def test_a_saved_model_of_the_family_loads_through_it(frames, tmp_path):
    family, model, _ = frames
    AutoConfig.register("frames_audio", FramesAudioConfig, exist_ok=True)  # as transformers knows Qwen2-Audio's
    model.save_pretrained(tmp_path)
    loaded = family.load(tmp_path, torch.float32)
    assert isinstance(loaded, FramesAudioModel)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    config, weights, audio_token = load_encoder(tmp_path)  # what distill reads of the teacher
    assert isinstance(config, FramesEncoderConfig) and audio_token == model.config.audio_token_id
    assert weights.keys() == model.encoder.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.encoder.state_dict().items())


@pytest.mark.parametrize("projector", ["full", "lora", "frozen"])
def test_lora_takes_the_familys_llm_layers_and_projector_never_its_encoder(frames, projector):
    family, teacher, processor = frames
    student = assemble_student(family.encoder_config(teacher.config), family.encoder(teacher).state_dict(),
                               family.audio_token_id(teacher.config),
                               build_student_llm(PRESET, len(processor.tokenizer), 1), 1)
    trained = {n for n, p in add_lora(student, projector=projector).named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "modules_to_save" in n for n in trained)
    assert {n.split(".lora_")[0].split("base_model.model.")[1] for n in trained if "language_model" in n} == {
        f"language_model.layers.{i}.self_attn.{x}_proj" for i in range(2) for x in "qv"}
    assert any("projector" in n for n in trained) == (projector != "frozen")
    assert not any("encoder" in n for n in trained)


def test_an_unknown_model_type_is_one_line_naming_the_known_families(tmp_path):
    with pytest.raises(PldistillError) as error:
        family_of(Qwen2Config(), "model.teacher")
    assert str(error.value) == "model.teacher: a `qwen2` checkpoint, expected qwen2_audio (Qwen2-Audio)"
    with pytest.raises(PldistillError, match=r"^processor: a `object` processor, expected the processor of qwen2_audio "
                                             r"\(Qwen2-Audio\)$"):
        family_of(object(), "processor")
    Qwen2Config().save_pretrained(tmp_path)
    with pytest.raises(PldistillError, match=f"^{tmp_path}: a `qwen2` checkpoint, expected qwen2_audio"):
        load_model(tmp_path)

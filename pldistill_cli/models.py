"""Teacher and student models: presets, the shared processor, student assembly, save and load.

Both models are of the teacher's family (families.AudioLLM; the presets build Qwen2-Audio). The student
is assembled the way the paper does it: the teacher's audio encoder (config and weights, frozen), a new
linear projector, and a smaller LLM; it always uses the teacher's processor (tokenizer, feature
extractor, chat template).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, TypeVar, Union

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as validated

from .checkpoints import Checkpoint, resolve_checkpoint, weights_fingerprint
from .config import Params, fingerprint
from .errors import PldistillError
from .families import family_of
from .files import fresh_folder, replace_folder, write_json
from .inputs import METADATA_FILE
from .methods import MethodName
from .prompt import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, CHAT_TEMPLATE, END_OF_TURN, SPECIAL_TOKENS, SYSTEM_PROMPT, user_prompt

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# The label sets the presets' tokenizer is trained on: the built-in corpora's (datasets/) when it was made,
# written out so that no model stage depends on a corpus parser and a new corpus changes no preset's tokenizer.
TOKENIZER_LABEL_SETS: tuple[tuple[str, ...], ...] = (
    ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear", "Calm"),  # synthetic
    ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear", "Calm"),  # ravdess
    ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear"),  # savee
    ("Happy", "Sad", "Angry", "Neutral"),  # iemocap
)


@dataclass(frozen=True)
class Preset:
    """Model sizes built from configs, of a teacher family (families; its encoder config takes `encoder`).
    `window_seconds` sets the encoder's input window (the real encoder always sees 30 s; tiny presets
    shorten it to keep CPU runs fast)."""

    name: str
    window_seconds: int
    encoder: dict[str, Any]
    teacher_llm: dict[str, Any]
    student_llm: dict[str, Any]
    vocab_size: int = 400
    family: str = "qwen2_audio"  # a model_type of families.FAMILIES


PRESETS = {
    "tiny": Preset(
        name="tiny",
        window_seconds=4,
        encoder=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, dropout=0.1),
        teacher_llm=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
        student_llm=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
    ),
    # The real 30 s encoder window and the paper's proportions (teacher : student parameters about
    # 7.6 : 1, encoder about 0.56 of the student), small enough to benchmark on a CPU.
    "small": Preset(
        name="small",
        window_seconds=30,
        encoder=dict(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024),
        teacher_llm=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                         num_key_value_heads=4),
        student_llm=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2),
    ),
    # The paper's sizes with random weights (Qwen2-Audio-7B's encoder and LLM, Qwen2-0.5B as the
    # student LLM), for GPU memory and speed checks without downloading checkpoints.
    "paper": Preset(
        name="paper",
        window_seconds=30,
        encoder=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120),
        teacher_llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=156032, rope_theta=10000.0),
        student_llm=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=True),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PldistillError(f"params.yaml: unknown model.preset `{name}`; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_tokenizer(vocab_size: int, audio_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on the prompts and label words, with Qwen's special tokens.
    As in Qwen2-Audio, the audio tokens come after the text vocabulary (a text LLM's tokenizer,
    `audio_tokens=False`, agrees with it on every id it has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text_specials = [t for t in SPECIAL_TOKENS if t not in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=text_specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [SYSTEM_PROMPT, "system user assistant Audio 1:"]
    texts += [user_prompt(labels) for labels in TOKENIZER_LABEL_SETS]
    texts += [" ".join(labels) for labels in TOKENIZER_LABEL_SETS]
    tok.train_from_iterator(texts * 8, trainer)
    specials = [t for t in SPECIAL_TOKENS[1:] if audio_tokens or t in text_specials]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_TURN, pad_token="<|endoftext|>",
                                   additional_special_tokens=specials)


def check_sample_rate(processor, sample_rate: int) -> None:
    """The prepared audio's rate (preprocess.sample_rate) must be the one the model's features expect."""
    expected = processor.feature_extractor.sampling_rate
    if sample_rate != expected:
        raise PldistillError(f"params.yaml: preprocess.sample_rate is {sample_rate} but the model's feature "
                             f"extractor expects {expected} Hz; set it to {expected} and re-run `pldistill preprocess`")


def build_processor(preset: Preset):
    """The preset's processor: its family's feature extractor, the offline tokenizer, Qwen's chat template."""
    return family_of(preset.family).new_processor(preset.window_seconds, build_tokenizer(preset.vocab_size),
                                                  CHAT_TEMPLATE)


def _llm_config(spec: dict[str, Any], vocab_size: int) -> Qwen2Config:
    """A preset's LLM config; the spec may widen the vocabulary beyond the tokenizer's (as real checkpoints do)."""
    return Qwen2Config(**{"vocab_size": vocab_size, "max_position_embeddings": 2048, "tie_word_embeddings": False, **spec})


def build_teacher(preset: Preset, seed: int, dropout: float | None = None, attention_dropout: float | None = None
                  ) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised teacher of the real architecture, from the preset's configs; `dropout`
    (the encoder's hidden and activation dropout) and `attention_dropout` (encoder and LLM) replace
    the preset's when given."""
    processor = build_processor(preset)
    tokenizer = processor.tokenizer
    encoder_spec, llm_spec = dict(preset.encoder), dict(preset.teacher_llm)
    if dropout is not None:
        encoder_spec.update(dropout=dropout, activation_dropout=dropout)
    if attention_dropout is not None:
        encoder_spec["attention_dropout"] = llm_spec["attention_dropout"] = attention_dropout
    family = family_of(preset.family)
    encoder = family.new_encoder_config(encoder_spec, preset.window_seconds)
    llm = _llm_config(llm_spec, len(tokenizer))
    torch.manual_seed(seed)
    return family.assemble(encoder, llm, tokenizer.convert_tokens_to_ids(family.audio_token)), processor


def build_student_llm(preset: Preset, vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(_llm_config(preset.student_llm, vocab_size))


def load_encoder(teacher_dir: Path) -> tuple[Any, dict[str, torch.Tensor], int]:
    """The teacher's audio encoder (config, weights) and audio token id, read from its files without
    loading the teacher's LLM (checkpoints store the encoder under its family's `encoder_prefix`)."""
    from safetensors import safe_open

    files = model_files(teacher_dir, "run `pldistill train-teacher` first")
    config = model_config(files)
    family = family_of(config, str(files))
    weights = {}
    for file in sorted(files.glob("*.safetensors")):
        with unreadable(teacher_dir), safe_open(str(file), "pt") as f:
            for key in f.keys():
                name = key.removeprefix("model.")  # transformers 5 nests the parts under model., earlier ones not
                if name.startswith(family.encoder_prefix):
                    weights[name.removeprefix(family.encoder_prefix)] = f.get_tensor(key)
    if not weights:
        raise PldistillError(f"{files}: no {family.encoder_prefix.rstrip('.')} weights found in its safetensors files")
    return family.encoder_config(config), weights, family.audio_token_id(config)


def assemble_student(encoder_config, encoder_weights: dict[str, torch.Tensor], audio_token_index: int,
                     llm: Qwen2ForCausalLM, seed: int) -> torch.nn.Module:
    """Student = the teacher's audio encoder (weights copied, frozen) + a new projector + `llm`, a model of
    the encoder's family."""
    family = family_of(encoder_config, "the teacher's audio encoder")
    torch.manual_seed(seed)
    student = family.assemble(encoder_config.to_dict(), llm.config.to_dict(), audio_token_index)
    family.encoder(student).load_state_dict(encoder_weights)
    family.llm(student).load_state_dict(llm.model.state_dict())
    if llm.config.tie_word_embeddings:
        # The container never ties lm_head to the embeddings itself: share them as the LLM does
        # (saved as two equal tensors, see save_model).
        family.head(student).weight = family.llm(student).get_input_embeddings().weight
    else:
        family.head(student).load_state_dict(llm.lm_head.state_dict())
    family.encoder(student).requires_grad_(False)
    return student


def add_lora(model, r: int = 8, alpha: int = 256, dropout: float = 0.1, projector: str = "full"):
    """Wrap the model with peft LoRA on the LLM's linear layers (its family's `lora_targets`: for Qwen2 the
    q, k, v, o, gate, up and down projections). The projector is fully trainable (`projector: full`), gets
    LoRA too (`lora`, the paper's option for the student) or stays frozen (`frozen`, the teacher); the audio
    encoder always stays frozen."""
    from peft import LoraConfig, get_peft_model

    family = family_of(model)
    targets = family.lora_targets
    if projector == "lora":
        targets = rf"({targets}|{family.projector_lora})"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=[family.projector_name] if projector == "full" else None)
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once per storage (tied or shared weights are not counted twice)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.shape)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


@validated(frozen=True)
class Provenance:
    """What identifies a saved model in the outputs made from it (a cache's meta.json, a student's
    pldistill.json): its folder, its weights hash and, for a model from a real checkpoint, that checkpoint."""

    path: str
    weights: Optional[str]
    checkpoint: Optional[dict[str, str]] = None  # source, revision


@validated(frozen=True, kw_only=True)
class ModelMeta:
    """pldistill.json, the metadata every model folder carries: one kind per stage that writes it
    (TeacherMeta, StudentMeta, ExportMeta), saved through save_model / save_reference. `ModelMeta.read` reads
    any kind (validated as the kind its `stage` names); `Kind.read` only that kind."""

    stage: str
    dataset: str
    fold: int
    labels: tuple[str, ...]
    prompt: str
    preset: str
    seed: int
    params: dict[str, Any]  # the params sections that made it
    versions: dict[str, str]  # python, torch, transformers, numpy and the device that made it
    best_epoch: Optional[int] = None
    validation_ua: Optional[float] = None
    refit: Optional[dict[str, int]] = None  # retrained afresh after selection: {"epochs": best_epoch, "clips": train + validation}
    history: tuple[dict[str, float], ...] = ()  # per epoch: mean loss terms, validation UA, diagnostics
    weights: Optional[str] = None  # hash of the weights, set when saved

    def write(self, folder: Path) -> None:
        write_json(folder / METADATA_FILE, dataclasses.asdict(self))

    @classmethod
    def read(cls, folder: Path) -> "AnyModelMeta":
        kind = AnyModelMeta if cls is ModelMeta else cls
        return _read_meta(kind, folder, "model" if cls is ModelMeta else cls.WHAT)


@validated(frozen=True, kw_only=True)
class TeacherMeta(ModelMeta):
    """train-teacher's model: a preset trained by pldistill, or a real checkpoint (fine-tuned or as is)."""

    WHAT: ClassVar[str] = "teacher"
    stage: Literal["train-teacher"] = "train-teacher"
    mode: Literal["full", "lora", "zero-shot"]
    checkpoint: Optional[dict[str, str]] = None  # a teacher from a real checkpoint: source, revision
    base: Optional[dict[str, str]] = None  # a model kept as a reference to a checkpoint: source, revision, path


@validated(frozen=True, kw_only=True)
class StudentMeta(ModelMeta):
    """distill's model: one method's student, trained with one seed on the teacher's cached targets."""

    WHAT: ClassVar[str] = "student"
    stage: Literal["distill"] = "distill"
    method: MethodName
    teacher: Provenance
    cache: dict[str, Any]  # the cache it was trained on: its CacheMeta
    student_llm: Optional[dict[str, Any]] = None  # where its LLM came from


@validated(frozen=True, kw_only=True)
class ExportMeta(StudentMeta):
    """export's model: a student with any LoRA merged, in fp32, and the test scores of its run."""

    WHAT: ClassVar[str] = "exported student"
    stage: Literal["export"] = "export"  # type: ignore[assignment]
    test_metrics: Optional[dict[str, Any]] = None


AnyModelMeta = Annotated[Union[TeacherMeta, StudentMeta, ExportMeta], Field(discriminator="stage")]


def _read_meta(cls, folder: Path, what: str, maker: str = "the stage that made it"):
    """A folder's pldistill.json, validated as `cls`."""
    path = folder / METADATA_FILE
    if not path.exists():
        raise PldistillError(f"{folder}: no {METADATA_FILE}; not a pldistill {what} folder (run {maker}, or pass a "
                             "folder made by pldistill)")
    try:
        return TypeAdapter(cls).validate_python(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError):
        raise PldistillError(f"{path}: not a valid {what} description; re-run {maker}") from None


@validated(frozen=True)
class PretrainingMeta:
    """pldistill.json of a pretraining stage's folder (STAGE writes it, train-teacher reads it): what made it,
    and whether it pretrained (then WEIGHTS_FILE holds the weights), kept the random start (COUNT 0) or
    leaves it to the hub checkpoint."""

    STAGE: ClassVar[str]
    WHAT: ClassVar[str]  # what the folder is, in error messages
    COUNT: ClassVar[str]  # the stage's setting that is 0 to keep the random start
    WEIGHTS_FILE: ClassVar[str]
    source: Literal["pretrained", "random", "checkpoint"]  # random: COUNT 0; checkpoint: model.preset hub
    preset: str
    seed: int
    params: dict[str, Any]  # the stage's settings
    versions: dict[str, str]
    best_epoch: Optional[int] = None
    history: tuple[dict[str, float], ...] = ()
    weights: Optional[str] = None  # hash of the weights, set when saved


@validated(frozen=True)
class EncoderMeta(PretrainingMeta):
    """pretrain-encoder's record (Layout.encoder), read by train-teacher through pretrained_encoder."""

    STAGE: ClassVar[str] = "pretrain-encoder"
    WHAT: ClassVar[str] = "encoder"
    COUNT: ClassVar[str] = "clips"
    WEIGHTS_FILE: ClassVar[str] = "encoder.safetensors"  # the audio tower's weights
    clips: int = 0  # pretraining utterances, held-out ones included
    held_out: dict[str, float] = dataclasses.field(default_factory=dict)  # R^2 per prosody target, tune accuracy


@validated(frozen=True)
class TeacherInitMeta(PretrainingMeta):
    """pretrain-teacher's record (Layout.teacher_init), read by train-teacher through pretrained_teacher."""

    STAGE: ClassVar[str] = "pretrain-teacher"
    WHAT: ClassVar[str] = "pretrained teacher"
    COUNT: ClassVar[str] = "voices"
    WEIGHTS_FILE: ClassVar[str] = "teacher.safetensors"  # every weight: encoder, projector, LLM
    encoder: Optional[str] = None  # weights hash of the pretrained encoder it was trained on
    labels: tuple[str, ...] = ()  # the label words of its prompt, in prompt order
    clips: int = 0  # pool utterances, validation ones included
    validation_ua: Optional[float] = None


Pretrained = TypeVar("Pretrained", bound=PretrainingMeta)  # what a pretraining stage records


def save_pretrained(folder: Path, weights: Optional[dict[str, torch.Tensor]], meta: Pretrained) -> Pretrained:
    """A pretraining stage's weights (if any) and metadata, swapped in whole; returns the metadata as saved."""
    from safetensors.torch import save_file

    tmp = fresh_folder(folder)
    if weights is not None:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / meta.WEIGHTS_FILE))
    meta = dataclasses.replace(meta, weights=weights_fingerprint(tmp))
    write_json(tmp / METADATA_FILE, dataclasses.asdict(meta))
    replace_folder(tmp, folder)
    return meta


def begin_pretraining(cls: type[Pretrained], params: Params, folder: Path, device: torch.device
                      ) -> tuple[dict[str, Any], Optional[Pretrained]]:
    """The start of a pretraining stage (`cls.STAGE`): what its record says made it (preset, seed, the stage's
    settings), and, when there is nothing to train, that record, saved. model.preset hub's checkpoint comes
    pretrained (source checkpoint), and `cls.COUNT` 0 keeps the preset's random start (source random): either
    way the folder records only which, without weights. None when there is something to train."""
    made_by = dict(preset=params.model.preset, seed=params.seed, params=params.section(cls.STAGE.replace("-", "_")))
    hub = params.model.preset == "hub"
    if not hub and made_by["params"][cls.COUNT]:
        return made_by, None
    from .ui import console

    console.print(f"{cls.WHAT}: the checkpoint's (pretrained)" if hub else f"{cls.WHAT}: random ({cls.COUNT} 0)")
    meta = cls(source="checkpoint" if hub else "random", versions=environment(device), **made_by)
    return made_by, save_pretrained(folder, None, meta)


def read_pretrained(cls: type[Pretrained], folder: Path, preset: str
                    ) -> tuple[Pretrained, Optional[dict[str, torch.Tensor]]]:
    """What `cls.STAGE` made for `preset`: its metadata and, if it pretrained one, the weights. A record made
    for another preset, or missing or unreadable, is one error line that says to re-run the stage."""
    from safetensors.torch import load_file

    redo = f"`pldistill {cls.STAGE}`"
    meta = _read_meta(cls, folder, cls.WHAT, redo)
    if meta.preset != preset:
        raise PldistillError(f"{folder}: pretrained for model.preset {meta.preset}, not {preset}; run {redo}")
    if meta.source != "pretrained":
        return meta, None
    with unreadable(folder):
        return meta, load_file(str(folder / cls.WEIGHTS_FILE))


def pretrained_encoder(folder: Path, preset: str) -> tuple[EncoderMeta, Optional[dict[str, torch.Tensor]]]:
    """What pretrain-encoder made for `preset`: its metadata and, if it pretrained one, the weights."""
    return read_pretrained(EncoderMeta, folder, preset)


def pretrained_teacher(folder: Path, preset: str, encoder: Optional[str]
                       ) -> tuple[TeacherInitMeta, Optional[dict[str, torch.Tensor]]]:
    """What pretrain-teacher made for `preset` on the encoder whose weights hash is `encoder` (data/encoder's):
    its metadata and, if it pretrained one, the teacher's weights (every weight: encoder, projector, LLM)."""
    meta, weights = read_pretrained(TeacherInitMeta, folder, preset)
    if weights is not None and meta.encoder != encoder:
        raise PldistillError(f"{folder}: pretrained on another encoder than data/encoder's; "
                             f"run `pldistill {meta.STAGE}`")
    return meta, weights


def environment(device: torch.device | str) -> dict[str, str]:
    """The versions, device and CPU kernels that made an output: the same ones reproduce it bit for bit."""
    import platform

    import numpy
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "device": str(device),
            "machine": platform.machine(), "cpu_kernels": cpu_kernels()}


@functools.cache
def cpu_kernels() -> str:
    """A hash of one AdamW step of the tiny teacher on fixed inputs, on this CPU with the current thread
    count. MKL, oneDNN and ATen's vector code choose their kernels by CPU, and those round differently:
    with the same versions, two machines reproduce each other's outputs bit for bit where this agrees
    (an AVX-512 Xeon and an older one differ from the first epoch on). `.ci/run` compares it."""
    import hashlib

    with torch.random.fork_rng():
        model, _ = build_teacher(get_preset("tiny"), seed=0)
        family = family_of(model)
        llm = family.llm(model)
        features, ids = torch.randn(2, 128, 400), torch.randint(0, model.config.text_config.vocab_size, (2, 16))
        audio = family.project(model, family.encoder(model)(features).last_hidden_state)
        embeds = torch.cat([audio, llm.get_input_embeddings()(ids)], 1)
        logits = family.head(model)(llm(inputs_embeds=embeds).last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits[:, -16:-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()
        digest = hashlib.sha256(loss.detach().numpy().tobytes())
        for weight in model.parameters():
            digest.update(weight.detach().numpy().tobytes())
    return digest.hexdigest()[:16]


LOAD_ONLY = ("local_files_only", "is_local")  # how a tokenizer was loaded (HF_HUB_OFFLINE, a local folder), not what it is


def save_processor(processor, folder: Path) -> None:
    """save_pretrained without the options the tokenizer was loaded with: transformers writes them into
    tokenizer_config.json, so the same model saved under another environment (HF_HUB_OFFLINE=1) would
    give other bytes."""
    kwargs = processor.tokenizer.init_kwargs
    kept = {k: kwargs.pop(k) for k in LOAD_ONLY if k in kwargs}
    try:
        processor.save_pretrained(folder)
    finally:
        kwargs.update(kept)


def save_model(model: torch.nn.Module, processor, folder: Path, meta: ModelMeta) -> None:
    """save_pretrained into a temporary folder, then swap it in. Tied output and input embeddings
    are written as two equal tensors: the container has no tied-weight declaration, so plain
    transformers loads them back correctly only that way."""
    tmp = fresh_folder(folder)
    family = family_of(model)
    head, embed = family.head(model), family.llm(model).get_input_embeddings()
    tied = head.weight is embed.weight
    if tied:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    try:
        model.save_pretrained(tmp)
    finally:
        if tied:
            head.weight = embed.weight
    save_processor(processor, tmp)
    meta = dataclasses.replace(meta, weights=weights_fingerprint(tmp))
    meta.write(tmp)
    replace_folder(tmp, folder)
    return meta


def save_reference(folder: Path, processor, base: Checkpoint, meta: TeacherMeta,
                   adapter: Any = None) -> None:
    """A model kept as a pointer to a checkpoint (`base`) plus, if given, a peft LoRA adapter: no copy
    of the checkpoint's weights. load_model resolves it."""
    tmp = fresh_folder(folder)
    if adapter is not None:
        adapter.save_pretrained(tmp)
    save_processor(processor, tmp)
    weights = fingerprint([base.source, base.revision, weights_fingerprint(tmp)])
    pointer = {"source": base.source, "revision": base.revision, "path": str(base.path)}
    dataclasses.replace(meta, base=pointer, weights=weights).write(tmp)
    replace_folder(tmp, folder)


def model_files(folder: Path, missing_hint: str = "run the stage that makes it first") -> Path:
    """The folder holding a saved model's config and weights: the folder itself, or for a model kept
    as a reference (save_reference), the checkpoint it names, checked to be the same revision."""
    meta = ModelMeta.read(folder) if (folder / METADATA_FILE).exists() else None
    base = meta.base if isinstance(meta, TeacherMeta) else None
    if (folder / "config.json").exists() or not base:
        model_config(folder, missing_hint)
        return folder
    checkpoint = resolve_checkpoint(base["source"], base["revision"], f"{folder}: base checkpoint")
    if checkpoint.revision != base["revision"]:
        raise PldistillError(f"{folder}: its checkpoint `{base['source']}` changed since it was made (revision "
                             f"{checkpoint.revision}, recorded {base['revision']}); re-run the stage that made it")
    model_config(checkpoint.path)
    return checkpoint.path


CPU_AS_CUDA = "PLDISTILL_CPU_AS_CUDA"


def bf16_device(device: torch.device | str) -> bool:
    """Whether `device` takes CUDA's precision choices (bf16 frozen weights with `model.dtype: auto`, bf16
    autocast): CUDA, or any device with PLDISTILL_CPU_AS_CUDA=1, which reproduces a GPU run's numerics (and
    their bugs) on a CPU. Every such choice goes through this one test."""
    return torch.device(device).type == "cuda" or os.environ.get(CPU_AS_CUDA) == "1"


def weights_dtype(setting: str, device: torch.device, frozen: bool) -> torch.dtype:
    """bf16 when asked, or by default for frozen (inference-only) weights on a GPU; fp32 otherwise
    (trained weights stay fp32 under bf16 autocast)."""
    if setting == "bf16" or (setting == "auto" and frozen and bf16_device(device)):
        return torch.bfloat16
    return torch.float32


def provenance(folder: Path) -> Provenance:
    """The Provenance of the model saved in `folder`."""
    made_by = TeacherMeta.read(folder)
    return Provenance(str(folder), made_by.weights, made_by.checkpoint)


def model_config(folder: Path, missing_hint: str = "run the stage that makes it first"):
    """The folder's config; a missing folder or an architecture of no known family is a one-line error."""
    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise PldistillError(f"{folder}: no model here (config.json missing); {missing_hint}")
    config = AutoConfig.from_pretrained(folder)
    family_of(config, str(folder))
    return config


def load_model(folder: Path, device: torch.device | str = "cpu",
               missing_hint: str = "run the stage that makes it first",
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """Load a saved model (or a reference to a checkpoint, with its LoRA adapter merged) and its
    processor; a missing folder or another architecture is a one-line error."""
    from transformers import AutoProcessor

    files = model_files(folder, missing_hint)
    with unreadable(folder):
        model = family_of(model_config(files)).load(files, dtype)
        if (folder / "adapter_config.json").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        processor = AutoProcessor.from_pretrained(folder)
    model.to(device).eval()
    return model, processor


@contextmanager
def unreadable(folder: Path):
    """A truncated or corrupt model file is a one-line error naming the folder, not a traceback."""
    try:
        yield
    except PldistillError:
        raise
    except Exception as exc:  # safetensors, json and tokenizer errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise PldistillError(f"{folder}: unreadable model files ({reason}); re-run the stage that made it") from None

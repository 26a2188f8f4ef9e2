"""Typed settings read from params.yaml, validated once where they are read (type and range of every
field, one declaration each); a bad value is one line naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict

from .errors import PldistillError
from .methods import METHODS, MethodName


def _number(value: Any) -> Any:
    """`1e-3` is a string to YAML 1.1 (no dot): read numeric strings as numbers (never a bool as one)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _distinct(values: tuple) -> tuple:
    """A list setting names each entry once (`folds: [1, 1]` would count fold 1 twice)."""
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise ValueError(f"lists {twice!r} twice; list each entry once")
    return values


_numeric = BeforeValidator(_number)
Distinct = AfterValidator(_distinct)
Int = Annotated[int, Field(strict=True)]
Count = Annotated[int, Field(strict=True, ge=1)]  # epochs, batch sizes, workers, ...
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[float, _numeric, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, _numeric, Field(strict=True, ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, _numeric, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)]
Real = Annotated[float, _numeric, Field(strict=True, allow_inf_nan=False)]
# Dataset names become folder names under data/ and metrics/: letters, digits, - and _ only.
SLUG = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Slug = Annotated[str, Field(pattern=SLUG)]
Device = Literal["auto", "cpu", "cuda"]
AdapterName = Literal["", "synthetic", "ravdess", "savee", "iemocap", "emobox", "folder"]

settings = dataclass(frozen=True, config=ConfigDict(extra="forbid"))


@settings
class CorpusParams:
    """Where a corpus lives and how to read it; `params.yaml: corpora: NAME: {...}`."""

    adapter: AdapterName = ""  # "" = the corpus name (synthetic, ravdess, savee, iemocap)
    root: Optional[str] = None  # the corpus as distributed (audio root); `--root` overrides it
    metadata: Optional[str] = None  # emobox: folder with fold_K/*.jsonl and label_map.json
    speaker_pattern: Optional[str] = None  # emobox / folder: regex whose first group is the speaker
    csv: Optional[str] = None  # folder: CSV with columns path, label and optional speaker, fold
    n_folds: Annotated[int, Field(strict=True, ge=3)] = 5  # folds to make (synthetic, folder, emobox without folds)
    n_speakers: Annotated[int, Field(strict=True, ge=3, le=16)] = 10  # synthetic: voices (a multiple of n_folds)
    n_sentences: Annotated[int, Field(strict=True, ge=1, le=10)] = 6  # synthetic: sentences per speaker and emotion


@settings
class PreprocessParams:
    sample_rate: Annotated[int, Field(strict=True, ge=8000, le=192000)] = 16000  # the encoder's rate (16 kHz)
    workers: Count = 2
    max_seconds: Positive = 30.0  # the encoder window; longer clips follow `long_clips`
    min_seconds: NonNegative = 0.2  # shorter clips are quarantined (too few audio steps to mean anything)
    long_clips: Literal["truncate", "skip"] = "truncate"
    trim_silence: bool = False
    trim_db: Positive = 40.0  # frames this far below the clip's peak frame count as silence
    normalize_loudness: bool = False
    target_dbfs: Annotated[float, _numeric, Field(strict=True, lt=0, ge=-80, allow_inf_nan=False)] = -23.0


@settings
class ModelParams:
    preset: Literal["tiny", "small", "paper", "hub"] = "tiny"  # hub: the real checkpoints below
    teacher: str = "Qwen/Qwen2-Audio-7B-Instruct"  # hub id or local folder (preset hub)
    teacher_revision: str = "main"  # branch, tag or commit; the resolved commit is recorded
    student_llm: str = "Qwen/Qwen2-0.5B-Instruct"  # the student's LLM: hub id or local folder (preset hub)
    student_llm_revision: str = "main"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 frozen weights on CUDA, fp32 otherwise
    gradient_checkpointing: bool = False  # recompute LLM activations in backward (less memory)


@settings
class SpecAugmentParams:
    """SpecAugment on the teacher's training log-mels (Park et al., 2019; no time warping): per clip,
    `time_masks` spans of up to `time_mask_frames` 10 ms frames and `freq_masks` bands of up to
    `freq_mask_bins` mel bins (0 = off)."""

    time_masks: NonNegativeInt = 0
    time_mask_frames: NonNegativeInt = 0
    freq_masks: NonNegativeInt = 0
    freq_mask_bins: NonNegativeInt = 0


@settings
class PretrainEncoderParams:
    """pretrain-encoder (presets built from configs): the audio encoder trained to hear prosody in
    emotion-free synthetic speech before any teacher sees the corpus (clips 0 = keep it random)."""

    clips: NonNegativeInt = 2000  # utterances; a tenth of them is held out to score the encoder
    epochs: Count = 16
    batch_size: Count = 32
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.01
    device: Device = "auto"


@settings
class PretrainTeacherParams:
    """pretrain-teacher (presets built from configs): the teacher's pretraining, the part Qwen2-Audio's
    pretraining plays in the paper. The preset's teacher, on the pretrained encoder, learns to answer the
    prompt on labelled emotional speech in voices and sentences that no fold uses (voices 0 = no
    pretraining: train-teacher starts from random weights)."""

    voices: Annotated[int, Field(strict=True, ge=0, le=84)] = 84  # of synthetic.PRETRAIN_VOICES, a speaker each
    sentences: Annotated[int, Field(strict=True, ge=1, le=12)] = 3  # per voice and emotion (of PRETRAIN_SENTENCES)
    validation_voices: Count = 8  # the last voices, held out to choose the epoch
    epochs: Count = 20
    patience: NonNegativeInt = 6
    batch_size: Count = 16
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.01
    max_grad_norm: Positive = 1.0
    device: Device = "auto"


@settings
class TrainTeacherParams:
    # full: every weight from the preset's random init (tiny, small); lora: peft LoRA on the LLM of a
    # real checkpoint (encoder and projector frozen); zero-shot: the checkpoint as is
    mode: Literal["full", "lora", "zero-shot"] = "full"
    encoder: Literal["frozen", "trained"] = "frozen"  # full mode: whether the pretrained encoder trains too
    epochs: Count = 40
    patience: NonNegativeInt = 0  # stop after this many epochs without a better validation UA (0 = never)
    refit: bool = False  # then retrain on train + validation for the best epoch count (no validation left)
    spec_augment: SpecAugmentParams = dataclasses.field(default_factory=lambda: SpecAugmentParams())
    dropout: Optional[Fraction] = None  # full mode: the encoder's hidden and activation dropout (None = preset's)
    attention_dropout: Optional[Fraction] = None  # full mode: encoder and LLM attention dropout (None = preset's)
    feature_memory_mb: NonNegativeInt = 1024  # keep train + validation log-mels in memory up to this size
    batch_size: Count = 16  # per process (GPU)
    grad_accum: Count = 1
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.01
    max_grad_norm: Positive = 1.0
    device: Device = "auto"
    lora_r: Count = 8
    lora_alpha: Positive = 256
    lora_dropout: Fraction = 0.1


@settings
class CacheSettings:
    """What shapes the cached values: a cache records them (cache.CacheMeta) and its readers check them."""

    # the teacher LLM layer whose text-to-audio attention weights AW-CKA (-1 = last), or "mean" (every layer)
    attention_layer: Int | Literal["mean"] = -1
    top_k: Count = 16
    temperature: Positive = 2.0
    # PDist targets: linear = the teacher projector's W and b once (exact, from the shared encoder
    # output); gram = each clip's raw Gram K = Z Z^T of the teacher's projector output [T, T]
    projector_targets: Literal["linear", "gram"] = "linear"


@settings
class CacheParams(CacheSettings):
    batch_size: Count = 16
    device: Device = "auto"


# The weights of each method's loss terms, `distill.weights.<method>` (L = CE + lambda_p (1 - CKA), or
# lambda_p MSE for FitNets, + lambda_l KL): a method has only the weights of the terms it switches on
# (methods.Method.weights), so that DVC re-runs only the methods a changed weight reaches.
# Each weight's type and default. cka_estimator: biased = AW-CKA as in the paper (weighted HSIC with its
# diagonal); debiased = the weighted U-statistic of Song et al.'s unbiased HSIC (no inflation when T is small
# against the width).
_WEIGHTS: dict[str, tuple[Any, Any]] = {"lambda_p": (NonNegative, 1.0), "lambda_l": (NonNegative, 1.0),
                                        "cka_estimator": (Literal["biased", "debiased"], "biased")}


def _weights_of(method: str) -> type:
    """The settings class of one method's weights: a field for each weight its terms read and no other,
    so a weight the method would ignore is refused as an unknown setting."""
    names = METHODS[method].weights
    namespace = {"__annotations__": {k: _WEIGHTS[k][0] for k in names}, **{k: _WEIGHTS[k][1] for k in names}}
    return settings(type(f"Weights_{method.replace('-', '_')}", (), namespace))


_WEIGHT_CLASSES = {method: _weights_of(method) for method in METHODS}
# `pl-distill` is no Python name: the methods' weights are a mapping keyed by method, typed per key
Weights = TypedDict("Weights", _WEIGHT_CLASSES)  # type: ignore[misc]
Weights.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]


def _every_method(value: Any) -> Any:
    """A method left out (or given as an empty key, `ce:`) takes its default weights."""
    if not isinstance(value, dict):
        return value
    return {**{m: {} for m in METHODS}, **{m: {} if w is None else w for m, w in value.items()}}


@settings
class DistillParams:
    weights: Annotated[Weights, BeforeValidator(_every_method)] = dataclasses.field(
        default_factory=lambda: {m: cls() for m, cls in _WEIGHT_CLASSES.items()})
    epochs: Count = 20
    patience: NonNegativeInt = 0  # stop after this many epochs without a better validation UA (0 = never)
    refit: bool = False  # then retrain on train + validation for the best epoch count (no validation left)
    batch_size: Count = 16  # per process (GPU)
    grad_accum: Count = 1
    lr: Positive = 2e-3
    weight_decay: NonNegative = 0.01
    max_grad_norm: Positive = 1.0
    device: Device = "auto"
    train_llm: Literal["full", "frozen", "lora"] = "full"
    lora_r: Count = 8  # LoRA on the LLM's q, k, v, o, gate, up, down (train_llm: lora), as in the paper
    lora_alpha: Positive = 256
    lora_dropout: Fraction = 0.1
    lora_projector: Literal["full", "lora"] = "full"  # the new projector: fully trainable, or LoRA (paper)
    method: MethodName = "pl-distill"  # the default of `pldistill distill`; the pipeline runs every one in `methods`
    loader_workers: NonNegativeInt = 0  # DataLoader worker processes reading the cache
    teacher_memory_mb: NonNegativeInt = 1024  # the teacher's constants of the training clips kept up to this size
    # the share of the fold's training clips whose labels the student sees (chosen per class, at least one each):
    # CE reads only those; the distillation terms read every training clip (the rest are a transfer set)
    label_fraction: Annotated[float, _numeric, Field(strict=True, gt=0, le=1, allow_inf_nan=False)] = 1.0


@settings
class EvaluateParams:
    batch_size: Count = 16
    device: Device = "auto"
    scoring: Literal["rank", "generate"] = "rank"
    max_new_tokens: Count = 8  # generate: answer length limit
    attention_examples: NonNegativeInt = 4  # test clips whose teacher attention the report shows
    # shortcut references fitted on train and scored on test; egemaps needs the `egemaps` extra (openSMILE)
    references: Annotated[tuple[Literal["duration", "prosody", "egemaps"], ...], Field(min_length=1), Distinct] = (
        "duration", "prosody")


def _default_corpora() -> dict[str, CorpusParams]:
    return {"synthetic": CorpusParams(adapter="synthetic")}


@settings
class Params:
    seed: NonNegativeInt = 42
    cpu_threads: Count = 2
    # How dvc.yaml starts train-teacher, cache-teacher and distill: `pldistill` (one process) or a
    # launcher, e.g. `torchrun --standalone --nproc-per-node 4 -m pldistill_cli` (one process per GPU).
    launcher: Annotated[str, Field(min_length=1)] = "pldistill"
    # processes a stage expects (torchrun / accelerate launch); 0 = as many as were started
    world_size: NonNegativeInt = 0
    datasets: Annotated[tuple[Slug, ...], Field(min_length=1), Distinct] = ("synthetic",)
    folds: Annotated[tuple[Count, ...], Field(min_length=1), Distinct] = (1,)
    methods: Annotated[tuple[MethodName, ...], Field(min_length=1), Distinct] = ("pl-distill",)
    seeds: Annotated[tuple[NonNegativeInt, ...], Field(min_length=1), Distinct] = (42,)
    # every dataset's corpus; a corpus given as an empty key (`mine:`) takes the defaults
    corpora: Annotated[dict[Slug, CorpusParams], BeforeValidator(lambda v: {k: x or {} for k, x in v.items()}
                                                                  if isinstance(v, dict) else v)] = \
        dataclasses.field(default_factory=_default_corpora)
    preprocess: PreprocessParams = dataclasses.field(default_factory=PreprocessParams)
    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    pretrain_encoder: PretrainEncoderParams = dataclasses.field(default_factory=PretrainEncoderParams)
    pretrain_teacher: PretrainTeacherParams = dataclasses.field(default_factory=PretrainTeacherParams)
    train_teacher: TrainTeacherParams = dataclasses.field(default_factory=TrainTeacherParams)
    cache: CacheParams = dataclasses.field(default_factory=CacheParams)
    distill: DistillParams = dataclasses.field(default_factory=DistillParams)
    evaluate: EvaluateParams = dataclasses.field(default_factory=EvaluateParams)

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))


# The settings whose change changes what a stage makes (workers, batch sizes and devices do not).
PREPROCESS_KEYS = ("sample_rate", "max_seconds", "min_seconds", "long_clips", "trim_silence", "trim_db",
                   "normalize_loudness", "target_dbfs")
CACHE_KEYS = tuple(f.name for f in dataclasses.fields(CacheSettings))
# What distill reads of its section besides its own method's weights (`method` only names the method
# `pldistill distill` trains when --method is not given, which the CLI resolves before the stage runs).
DISTILL_KEYS = tuple(f.name for f in dataclasses.fields(DistillParams) if f.name not in ("weights", "method"))


def preprocessing(params: Params) -> dict[str, Any]:
    """The preprocessing settings that shape the prepared audio."""
    return {k: getattr(params.preprocess, k) for k in PREPROCESS_KEYS}


def cache_settings(params: Params) -> CacheSettings:
    """The cache settings that shape the cached values."""
    return CacheSettings(**{k: getattr(params.cache, k) for k in CACHE_KEYS})


def check_dataset_name(name: str) -> None:
    """A dataset name is a safe folder name (it never reaches outside data/ or metrics/)."""
    import re

    if not re.fullmatch(SLUG, name):
        raise PldistillError(f"--dataset `{name}` is not a safe name; use letters, digits, - and _ only")


def fingerprint(obj: Any) -> str:
    """Short stable hash of JSON-able data (settings, prompts, ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _key(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _misplaced_weight(loc: tuple) -> str | None:
    """Why a loss weight is refused where it was written, if it is one: directly under `distill` (weights are
    set per method), or under a method that has no term it weights."""
    *path, name = loc
    if name not in _WEIGHTS:
        return None
    users = ", ".join(m for m, row in METHODS.items() if name in row.weights)
    if path == ["distill"]:
        return f"`distill.{name}` is set per method: `distill.weights.<method>.{name}` (methods using it: {users})"
    if path[:2] == ["distill", "weights"] and len(path) == 3:
        return f"`{_key(loc)}`: {path[2]} has no term that {name} weights (methods using it: {users}); remove it"
    return None


def describe(error: ValidationError, where: str) -> str:
    """The first problem of a pydantic error as one line: the key, the value, what is allowed."""
    first = error.errors()[0]
    key, value = _key(first["loc"]), first.get("input")
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        misplaced = _misplaced_weight(first["loc"])
        if misplaced:
            return f"{where}: {misplaced}"
        return f"{where}: unknown setting `{key}`; check its spelling (README lists every setting)"
    if first["type"] == "value_error":
        return f"{where}: {f'`{key}` ' if key else ''}{first['msg'].removeprefix('Value error, ')}"
    if first["type"] == "string_pattern_mismatch":
        return f"{where}: `{key}` = {value!r} is not a safe name; use letters, digits, - and _ only"
    return f"{where}: `{key}` = {value!r}: {first['msg'][0].lower()}{first['msg'][1:]}"


_PARAMS = TypeAdapter(Params)


def _duplicate_key(node: yaml.Node, path: tuple = ()) -> tuple[str, int, int] | None:
    """The first key written twice in one mapping of a YAML node tree: its dotted path and both lines."""
    children = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in lines:
                    return ".".join((*path, key.value)), lines[key.value], key.start_mark.line + 1
                lines[key.value] = key.start_mark.line + 1
            children.append((value, (*path, str(getattr(key, "value", "?")))))
    elif isinstance(node, yaml.SequenceNode):
        children = [(item, path) for item in node.value]
    for child, where in children:
        found = _duplicate_key(child, where)
        if found:
            return found
    return None


def params_file(params: Any) -> str:
    """The settings file `params` was read from (what every error about a setting names)."""
    return getattr(params, "source", None) or "params.yaml"


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Read and validate params.yaml; missing settings take the defaults above. An empty or comment-only
    file, a key written twice and a list naming an entry twice are errors, not defaults."""
    if not path.is_file():
        what = "is a folder, not a params file" if path.is_dir() else "params file not found"
        raise PldistillError(f"{path}: {what}; run from the project root or pass --params FILE")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
        twice = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise PldistillError(f"{path}: malformed YAML{line}; fix the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PldistillError(f"{path}: unreadable ({exc.__class__.__name__}); pass a YAML text file") from None
    if raw is None:
        raise PldistillError(f"{path}: holds no settings (it is empty or only comments); write the settings into it "
                             "(a file of defaults says `{}`), or restore it")
    if twice:
        raise PldistillError(f"{path}: `{twice[0]}` is set twice (lines {twice[1]} and {twice[2]}); keep one")
    if not isinstance(raw, dict):
        raise PldistillError(f"{path}: expected a mapping of settings at the top level")
    try:
        params = _PARAMS.validate_python(raw)
    except ValidationError as exc:
        raise PldistillError(describe(exc, str(path))) from None
    object.__setattr__(params, "source", str(path))  # not a setting: where the settings came from
    return params


class UndeclaredParams(RuntimeError):
    """A stage read a setting its DVC stage does not declare: a bug in pldistill (graph.py), not input."""


class Restricted:
    """A read-only view of settings through which a stage sees only the keys it declares as DVC
    params (`keys`: dotted paths such as `seed`, `cache.top_k`, `corpora.ravdess`); reading any other
    key raises, so dvc.yaml can never miss a setting a stage reads."""

    def __init__(self, value: Any, keys: dict, stage: str, where: str = ""):
        self._value, self._keys, self._stage, self._where = value, keys, stage, where

    @classmethod
    def of(cls, params: Params, keys: list[str], stage: str) -> "Params":
        tree: dict = {}
        for key in keys:
            *path, last = key.split(".")
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[last] = True
        return cls(params, tree, stage)  # type: ignore[return-value]

    def _read(self, name: str) -> Any:
        allowed = self._keys.get(name)
        if allowed is None:
            raise UndeclaredParams(f"stage `{self._stage}` reads `{self._where}{name}`, which its DVC stage does not "
                                   "declare; add it to the stage's params in pldistill_cli/graph.py")
        value = self._value[name] if isinstance(self._value, dict) else getattr(self._value, name)
        return value if allowed is True else Restricted(value, allowed, self._stage, f"{self._where}{name}.")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not (dataclasses.is_dataclass(self._value) and name in
                                        {f.name for f in dataclasses.fields(self._value)}):
            return getattr(self._value, name)
        return self._read(name)

    def section(self, name: str) -> dict[str, Any]:
        value = self._read(name)
        if isinstance(value, Restricted):
            raise UndeclaredParams(f"stage `{self._stage}` reads all of `{name}` but declares only some of its keys")
        return dataclasses.asdict(value)

    # mappings (corpora, distill.weights): names may be listed, only declared entries read
    def get(self, name: str, default: Any = None) -> Any:
        return self._read(name) if name in self._value else default

    def __getitem__(self, name: str) -> Any:
        return self._read(name)

    def __contains__(self, name: str) -> bool:
        return name in self._value

    def __iter__(self):
        return iter(self._value)

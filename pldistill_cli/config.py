"""Typed settings read from params.yaml, validated once where they are read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import PldistillError

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class SyntheticParams:
    n_speakers: int = 10
    n_sentences: int = 6
    n_folds: int = 5


@dataclass(frozen=True)
class CorpusParams:
    """Where a real corpus lives and how to read it; `params.yaml: corpora: NAME: {...}`."""

    adapter: str = ""  # synthetic | ravdess | savee | iemocap | emobox | folder ("" = the corpus name)
    root: Optional[str] = None  # the corpus as distributed (audio root); `--root` overrides it
    metadata: Optional[str] = None  # emobox: folder with fold_K/*.jsonl and label_map.json
    speaker_pattern: Optional[str] = None  # emobox / folder: regex whose first group is the speaker
    csv: Optional[str] = None  # folder: CSV with columns path, label and optional speaker, fold
    n_folds: int = 5  # folder / emobox without folds: number of folds to make


@dataclass(frozen=True)
class PreprocessParams:
    sample_rate: int = 16000
    workers: int = 2
    max_seconds: float = 30.0  # the encoder window; longer clips follow `long_clips`
    long_clips: Literal["truncate", "skip"] = "truncate"
    trim_silence: bool = False
    trim_db: float = 40.0  # frames this far below the clip's peak frame count as silence
    normalize_loudness: bool = False
    target_dbfs: float = -23.0  # RMS level after normalisation (peaks limited to -1 dBFS)


@dataclass(frozen=True)
class ModelParams:
    # tiny | small | paper: built from configs (random init); hub: real checkpoints (below)
    preset: str = "tiny"
    teacher: str = "Qwen/Qwen2-Audio-7B-Instruct"  # hub id or local folder (preset hub)
    teacher_revision: str = "main"  # branch, tag or commit; the resolved commit is recorded
    student_llm: str = "Qwen/Qwen2-0.5B-Instruct"  # the student's LLM: hub id or local folder (preset hub)
    student_llm_revision: str = "main"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # weights: auto = bf16 teacher on CUDA, fp32 otherwise
    gradient_checkpointing: bool = False  # recompute LLM activations in backward (less memory)


@dataclass(frozen=True)
class TrainTeacherParams:
    # full: train every weight from the preset's random init (tiny, small); lora: peft LoRA on the
    # LLM of a real checkpoint (encoder and projector frozen); zero-shot: use the checkpoint as is
    mode: Literal["full", "lora", "zero-shot"] = "full"
    epochs: int = 40
    batch_size: int = 16  # per process (GPU)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    device: Device = "auto"
    lora_r: int = 8
    lora_alpha: int = 256
    lora_dropout: float = 0.1


@dataclass(frozen=True)
class CacheParams:
    attention_layer: int = -1
    top_k: int = 16
    temperature: float = 2.0
    # PDist targets: linear = the teacher projector's W and b once (exact, from the shared encoder
    # output); gram = each clip's raw Gram K = Z Z^T of the teacher's projector output [T, T]
    projector_targets: Literal["linear", "gram"] = "linear"
    batch_size: int = 16
    device: Device = "auto"


@dataclass(frozen=True)
class DistillParams:
    lambda_p: float = 1.0
    lambda_l: float = 1.0
    epochs: int = 20
    batch_size: int = 16  # per process (GPU)
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    device: Device = "auto"
    train_llm: Literal["full", "frozen", "lora"] = "full"
    lora_r: int = 8  # LoRA on the LLM's q, k, v, o, gate, up, down (train_llm: lora), as in the paper
    lora_alpha: int = 256
    lora_dropout: float = 0.1
    lora_projector: Literal["full", "lora"] = "full"  # the new projector: fully trainable, or LoRA (paper)
    method: str = "pl-distill"  # the default of `pldistill distill`; the pipeline runs every one in `methods`
    loader_workers: int = 0  # DataLoader worker processes reading the cache


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 16
    device: Device = "auto"
    scoring: Literal["rank", "generate"] = "rank"
    max_new_tokens: int = 8  # generate: answer length limit
    attention_examples: int = 4  # test clips whose teacher attention the report shows


@dataclass(frozen=True)
class Params:
    seed: int = 42
    cpu_threads: int = 2
    # How dvc.yaml starts train-teacher, cache-teacher and distill: `pldistill` (one process) or a
    # launcher, e.g. `torchrun --standalone --nproc-per-node 4 -m pldistill_cli` (one process per GPU).
    launcher: str = "pldistill"
    # processes a stage expects (torchrun / accelerate launch); 0 = as many as were started
    world_size: int = 0
    datasets: tuple[str, ...] = ("synthetic",)
    folds: tuple[int, ...] = (1,)
    methods: tuple[str, ...] = ("pl-distill",)
    seeds: tuple[int, ...] = (42,)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    corpora: dict[str, CorpusParams] = field(default_factory=dict)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    model: ModelParams = field(default_factory=ModelParams)
    train_teacher: TrainTeacherParams = field(default_factory=TrainTeacherParams)
    cache: CacheParams = field(default_factory=CacheParams)
    distill: DistillParams = field(default_factory=DistillParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))


def fingerprint(obj: Any) -> str:
    """Short stable hash of JSON-able data (settings, prompts, ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise PldistillError(f"params.yaml: `{where}` must be a mapping, got {value!r}")
        return _build(typ, value, where)
    origin = get_origin(typ)
    if origin is Union:  # Optional[X]
        inner = [a for a in get_args(typ) if a is not type(None)][0]
        return None if value is None else _coerce(value, inner, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise PldistillError(f"params.yaml: `{where}` must be a mapping, got {value!r}")
        return {str(k): _coerce(v or {}, get_args(typ)[1], f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        if value not in get_args(typ):
            raise PldistillError(f"params.yaml: `{where}` must be one of {list(get_args(typ))}, got {value!r}")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(v, get_args(typ)[0], f"{where}[{i}]") for i, v in enumerate(items))
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ in (int, str, bool) and type(value) is typ:
        return value
    raise PldistillError(f"params.yaml: `{where}` must be {getattr(typ, '__name__', typ)}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    hints = get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise PldistillError(f"params.yaml: unknown setting `{key}`; known: {', '.join(hints)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**values)


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Read and validate params.yaml; missing settings take the defaults above."""
    if not path.exists():
        raise PldistillError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise PldistillError(f"{path}: malformed YAML{line}; fix the file") from None
    if not isinstance(raw, dict):
        raise PldistillError(f"{path}: expected a mapping of settings at the top level")
    return _build(Params, raw)

"""Real checkpoints (`model.preset: hub`): a hub id or a local folder, resolved to a local folder
and a recorded revision; the student's LLM loaded from one and checked against the teacher's
tokenizer. Nothing here passes `trust_remote_code`: the architectures are transformers' own."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, Qwen2ForCausalLM

from .errors import PldistillError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model folder needs; the rest of a hub repository (other formats, examples) is not fetched.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


@dataclass(frozen=True)
class Checkpoint:
    source: str  # the hub id or folder as given
    path: Path  # the local folder with config.json and weights
    revision: str  # the hub commit, or the weights hash of a local folder


def weights_fingerprint(folder: Path) -> str:
    """Hash of a model folder's weights (whole files up to 1 GiB; name, size, head and tail beyond)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            if size <= 1 << 30:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def resolve_checkpoint(source: str, revision: str, setting: str) -> Checkpoint:
    """A local folder as is, or a hub repository at `revision`, downloaded to (or found in) the
    Hugging Face cache. `setting` names the params key for error messages."""
    folder = Path(source).expanduser()
    if folder.exists():
        if not (folder / "config.json").exists():
            raise PldistillError(f"params.yaml: {setting} `{source}` has no config.json; point it at a model folder "
                                 "or a hub id")
        return Checkpoint(source, folder, weights_fingerprint(folder))
    if not HUB_ID.match(source):
        raise PldistillError(f"params.yaml: {setting} `{source}` is neither a folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(source, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except Exception as exc:  # not found, gated, offline: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PldistillError(f"params.yaml: {setting} `{source}` (revision {revision}) could not be fetched: {reason}; "
                             "check the id and revision, the network or HF_TOKEN, or use a local folder") from None
    return Checkpoint(source, path, path.name)  # the snapshot folder is named by its commit


def checked_config(checkpoint: Checkpoint, model_type: str, setting: str):
    config = AutoConfig.from_pretrained(checkpoint.path)
    if config.model_type != model_type:
        raise PldistillError(f"params.yaml: {setting} `{checkpoint.source}` is a `{config.model_type}` checkpoint, "
                             f"expected {model_type}")
    return config


def check_tokenizers_agree(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, vocab_rows: int,
                           source: str) -> None:
    """The student reads the teacher's token ids: both tokenizers must map the ids they share to the
    same tokens, and every id the teacher's tokenizer makes needs a row in the student's embedding."""
    teacher_vocab = {i: t for t, i in teacher.get_vocab().items()}
    student_vocab = {i: t for t, i in student.get_vocab().items()}
    for i in range(min(len(teacher_vocab), len(student_vocab))):
        if teacher_vocab.get(i) != student_vocab.get(i):
            raise PldistillError(f"{source}: its tokenizer maps id {i} to {student_vocab.get(i)!r}, the teacher's to "
                                 f"{teacher_vocab.get(i)!r}; the student LLM must share the teacher's tokenizer")
    if max(teacher_vocab) >= vocab_rows:
        raise PldistillError(f"{source}: {vocab_rows} embedding rows, but the teacher's tokenizer uses ids up to "
                             f"{max(teacher_vocab)}")


def load_student_llm(source: str, revision: str, teacher_tokenizer: PreTrainedTokenizerBase,
                     dtype: torch.dtype = torch.float32) -> tuple[Qwen2ForCausalLM, list[int], Checkpoint]:
    """The student's LLM (a Qwen2 causal LM), checked against the teacher's tokenizer, with the rows
    of the teacher's tokens its own tokenizer lacks (the audio special tokens: never trained)
    initialised; returns those ids too."""
    checkpoint = resolve_checkpoint(source, revision, "model.student_llm")
    checked_config(checkpoint, "qwen2", "model.student_llm")
    llm = Qwen2ForCausalLM.from_pretrained(checkpoint.path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    check_tokenizers_agree(teacher_tokenizer, tokenizer, llm.config.vocab_size, source)
    known = tokenizer.get_vocab()
    untrained = sorted(i for t, i in teacher_tokenizer.get_vocab().items() if t not in known)
    init_untrained_rows(llm, untrained, sorted(known.values()))
    return llm, untrained, checkpoint


@torch.no_grad()
def init_untrained_rows(llm: Qwen2ForCausalLM, rows: list[int], trained: list[int]) -> None:
    """Set embedding (and untied output) rows that never trained to the mean of the trained rows: a
    neutral start, instead of whatever the checkpoint left in its padding rows."""
    if not rows:
        return
    matrices = [llm.get_input_embeddings().weight]
    if llm.lm_head.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(llm.lm_head.weight)
    for weight in matrices:
        weight[rows] = weight[trained].mean(0)

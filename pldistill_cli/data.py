"""Batches for the stages: audio clips from a manifest split, and distillation targets from the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .audio import read_audio
from .forward import audio_features, audio_steps
from .prompt import PromptLayout


@dataclass
class TextBatch:
    """Right-padded chat sequences: prompt with T audio slots, then (optionally) the answer."""

    input_ids: Tensor
    attention_mask: Tensor
    answer_mask: Tensor  # positions whose next token is an answer token

    def to(self, device: torch.device) -> "TextBatch":
        return TextBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.answer_mask)))


def text_batch(prompt: PromptLayout, n_audio: Sequence[int], labels: Sequence[str] | None) -> TextBatch:
    seqs, answer_lengths = [], []
    for i, n in enumerate(n_audio):
        answer = prompt.answer_ids(labels[i]) if labels is not None else ()
        seqs.append(prompt.prompt_ids(int(n)) + list(answer))
        answer_lengths.append(len(answer))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), prompt.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    answer_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (seq, a) in enumerate(zip(seqs, answer_lengths)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        answer_mask[i, len(seq) - 1 - a : len(seq) - 1] = a > 0
    return TextBatch(ids, mask, answer_mask)


class AudioClips(Dataset):
    """Rows of a manifest split -> (row index, waveform)."""

    def __init__(self, rows: pd.DataFrame, sample_rate: int):
        self.rows = rows.reset_index(drop=True)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return i, read_audio(self.rows.at[i, "audio_path"], self.sample_rate)


@dataclass
class AudioBatch:
    rows: list[int]
    features: Tensor
    feature_mask: Tensor
    n_audio: Tensor


class AudioCollate:
    """Log-mel features of a list of clips (picklable, for DataLoader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[tuple[int, np.ndarray]]) -> AudioBatch:
        features, mask = audio_features(self.processor, [w for _, w in items])
        return AudioBatch([i for i, _ in items], features, mask, audio_steps(mask))


def length_sorted_batches(lengths: Sequence[float], batch_size: int) -> list[list[int]]:
    """Batches of clips of similar length (less padding), in length order."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]

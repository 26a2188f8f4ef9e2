"""Batches for the stages: audio clips from a manifest split, and distillation targets from the cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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


class Clips:
    """A manifest split's clips as encoder inputs (AudioBatch). Log-mel features are computed from the
    audio batch by batch, or, `in_memory`, once for the split and then sliced: a teacher trains many
    epochs over the same clips, and recomputing their features every epoch costs as much as a tiny
    model's step. `nbytes` says what keeping them costs."""

    def __init__(self, rows: pd.DataFrame, processor, in_memory: bool = False, chunk: int = 64):
        self.rows, self.processor = rows.reset_index(drop=True), processor
        self.audio, self.collate = AudioClips(self.rows, processor.feature_extractor.sampling_rate), AudioCollate(processor)
        self.features = self.feature_mask = None
        if in_memory and len(self.rows):
            parts = [self.collate([self.audio[i] for i in range(s, min(s + chunk, len(self.rows)))])
                     for s in range(0, len(self.rows), chunk)]
            self.features = torch.cat([b.features for b in parts])
            self.feature_mask = torch.cat([b.feature_mask for b in parts])

    @staticmethod
    def nbytes(n_clips: int, processor) -> int:
        """Memory of n clips' features (float32 log-mel, padded to the encoder window)."""
        extractor = processor.feature_extractor
        return 4 * n_clips * extractor.feature_size * extractor.nb_max_frames

    def __len__(self) -> int:
        return len(self.rows)

    def loader(self, batches: list[list[int]]):
        """The AudioBatch of each list of row indices, in order."""
        if self.features is None:
            return DataLoader(self.audio, batch_sampler=batches, collate_fn=self.collate)
        return (AudioBatch(b, self.features[b], self.feature_mask[b], audio_steps(self.feature_mask[b], self.processor))
                for b in batches)


def spec_augment(features: Tensor, feature_mask: Tensor, time_masks: int = 0, time_mask_frames: int = 0,
                 freq_masks: int = 0, freq_mask_bins: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """SpecAugment (Park et al., 2019) without time warping, for log-mel features [B, M, F] whose real
    frames are the first ones of each clip (feature_mask [B, F]): each clip gets `time_masks` spans of
    0..time_mask_frames frames inside its real frames and `freq_masks` bands of 0..freq_mask_bins mel
    bins, widths and positions uniform; masked values become the clip's mean over its real frames.
    Padding frames are left as they are. Returns a masked copy."""
    b, m, f = features.shape
    valid = feature_mask.bool()
    n = valid.sum(-1).clamp(min=1)
    mean = (features * valid[:, None, :]).sum((1, 2)) / (n * m)
    masked = torch.zeros(b, m, f, dtype=torch.bool, device=features.device)
    frames, bins = torch.arange(f, device=features.device), torch.arange(m, device=features.device)
    for _ in range(time_masks if time_mask_frames > 0 else 0):
        width = torch.minimum(torch.randint(0, time_mask_frames + 1, (b,), generator=generator).to(n.device), n)
        start = (torch.rand(b, generator=generator).to(n.device) * (n - width + 1)).long()
        masked |= ((frames[None] >= start[:, None]) & (frames[None] < (start + width)[:, None]))[:, None, :]
    for _ in range(freq_masks if freq_mask_bins > 0 else 0):
        width = torch.randint(0, min(freq_mask_bins, m) + 1, (b,), generator=generator).to(features.device)
        start = (torch.rand(b, generator=generator).to(features.device) * (m - width + 1)).long()
        band = (bins[None] >= start[:, None]) & (bins[None] < (start + width)[:, None])
        masked |= band[:, :, None] & valid[:, None, :]
    return torch.where(masked, mean[:, None, None].to(features.dtype), features)


class AudioCollate:
    """Log-mel features of a list of clips (picklable, for DataLoader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[tuple[int, np.ndarray]]) -> AudioBatch:
        features, mask = audio_features(self.processor, [w for _, w in items])
        return AudioBatch([i for i, _ in items], features, mask, audio_steps(mask, self.processor))


def length_sorted_batches(lengths: Sequence[float], batch_size: int) -> list[list[int]]:
    """Batches of clips of similar length (less padding), in length order."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def labelled_clips(ids: Sequence[str], labels: Sequence[str], fraction: float) -> np.ndarray:
    """Which clips keep their label when only `fraction` of them may: in each class, round(fraction x n) of
    its n clips (at least one), those first in the order of sha256(id). The choice depends on the clip ids
    only (not on their order or any seed: every method and seed sees the same labels), and a larger
    fraction keeps a superset."""
    keys = [hashlib.sha256(i.encode()).hexdigest() for i in ids]
    kept = np.zeros(len(ids), dtype=bool)
    for label in set(labels):
        members = sorted((k, j) for j, (k, l) in enumerate(zip(keys, labels)) if l == label)
        for _, j in members[: max(1, round(fraction * len(members)))]:
            kept[j] = True
    return kept
